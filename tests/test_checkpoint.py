"""Checkpoints: round trip of every model, weights_only loading, atomic saves, clear errors
for bad files, fine-tuning with a new head, summaries."""

import zipfile

import numpy as np
import pytest
import torch

from urbanseg import __version__
from urbanseg.checkpoint import (
    FORMAT_VERSION,
    build_payload,
    format_summary,
    load_checkpoint,
    load_pretrained,
    model_from_checkpoint,
    save_checkpoint,
    summarize_checkpoint,
)
from urbanseg.errors import UserError
from urbanseg.labels import get_label_set
from urbanseg.models import MODELS, create_model

SMALL = {"unet-original": {"base_channels": 8}}


def make(name, label_set, seed=0, **kwargs):
    torch.manual_seed(seed)
    return create_model(name, label_set.num_classes, **{**SMALL.get(name, {}), **kwargs})


def payload(model, label_set, **extra):
    return build_payload(
        model,
        label_set=label_set,
        input_size=(64, 32),
        config={"model": "x", "lr": 1e-3},
        step=12,
        epoch=2,
        metrics={"miou": 0.5, "per_class": [0.1, None]},
        **extra,
    )


def train_state(model):
    """What a trainer keeps: optimizer state after a step, RNG states as tensors/lists."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 32, 64) * 255).mean().backward()
    opt.step()
    rng = np.random.default_rng(0).bit_generator.state
    return {
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": {"state": str(rng["state"]["state"]), "inc": str(rng["state"]["inc"])},
        "position": [3, 17],
    }


# One model per library always (ours, torchvision, smp); the other families under `slow`.
QUICK = ("unet-original", "lraspp-mobilenetv3", "fpn-mobilenetv3")


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_round_trip_of_every_model(name, tmp_path):
    label_set = get_label_set("categories8")
    model = make(name, label_set)
    # Non-default BatchNorm statistics, so they must be saved too (state_dict shares storage).
    for key, value in model.state_dict().items():
        if "running_" in key:
            value.uniform_(0.5, 1.5)
    model.eval()
    save_checkpoint(tmp_path / "m.pt", payload(model, label_set))
    # weights_only loading works on the raw file (no urbanseg class is pickled).
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["model"] == model.model_args and raw["format_version"] == FORMAT_VERSION
    again = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    assert not again.training
    x = torch.rand(2, 3, 45, 70) * 255
    with torch.inference_mode():
        assert torch.equal(again(x), model(x))


def test_training_payload_loads_with_weights_only(tmp_path):
    label_set = get_label_set("categories7")
    model = make("unet-original", label_set)
    save_checkpoint(tmp_path / "last.pt", payload(model, label_set, train_state=train_state(model)))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["urbanseg_version"] == __version__
    assert ckpt["label_set"] == label_set.to_dict()
    assert ckpt["normalization"]["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert ckpt["input_size"] == [64, 32] and ckpt["step"] == 12 and ckpt["metrics"]["per_class"] == [0.1, None]
    assert set(ckpt["train_state"]["optimizer"]["state"]) and ckpt["train_state"]["position"] == [3, 17]


def test_values_weights_only_would_refuse_are_rejected_before_writing(tmp_path):
    label_set = get_label_set("categories8")
    model = make("unet-original", label_set)
    bad = payload(model, label_set, train_state={"numpy_rng": np.zeros(3)})
    with pytest.raises(TypeError, match=r"payload\['train_state'\]\['numpy_rng'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "x.pt", bad)
    bad = payload(model, label_set)
    bad["metrics"]["miou"] = np.float64(0.5)  # a float subclass that pickles as a numpy object
    with pytest.raises(TypeError, match=r"\['miou'\] is a numpy.float64"):
        save_checkpoint(tmp_path / "x.pt", bad)
    with pytest.raises(ValueError, match="lacks the keys"):
        save_checkpoint(tmp_path / "x.pt", {"model": model.model_args})
    assert list(tmp_path.iterdir()) == []


def test_a_failing_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    label_set = get_label_set("categories8")
    model = make("unet-original", label_set)
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload(model, label_set))
    before = path.read_bytes()

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, payload(make("unet-original", label_set, seed=1), label_set))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_bad_files_are_user_errors_naming_them(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint .*nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="a folder: give the .pt file inside"):
        load_checkpoint(tmp_path)
    label_set = get_label_set("categories8")
    save_checkpoint(tmp_path / "good.pt", payload(make("unet-original", label_set), label_set))
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello")
    for name in ("truncated.pt", "text.pt"):
        with pytest.raises(UserError, match=f"checkpoint .*{name} cannot be read .*truncated, corrupt"):
            load_checkpoint(tmp_path / name)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="foreign.pt is a PyTorch file but not an urbanseg checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    # A pickled class: torch.load(weights_only=True) refuses it, and so do we, clearly.
    torch.save({"format_version": 1, "model": zipfile.ZipInfo("x"), "model_state": {}}, tmp_path / "unsafe.pt")
    with pytest.raises(
        UserError,
        match=r"unsafe.pt refused: not a plain checkpoint \(it contains pickled Python "
        r"objects \(zipfile.ZipInfo\)",
    ):
        load_checkpoint(tmp_path / "unsafe.pt")
    newer = torch.load(tmp_path / "good.pt", weights_only=True)
    newer["format_version"] = FORMAT_VERSION + 1
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(UserError, match="upgrade urbanseg"):
        load_checkpoint(tmp_path / "newer.pt")


@pytest.mark.parametrize("name", ["unet-original", "lraspp-mobilenetv3", "deeplabv3plus-mobilenetv3"])
def test_load_pretrained_keeps_everything_but_a_new_head(name, tmp_path):
    old_set, new_set = get_label_set("categories8"), get_label_set("classes19")
    old = make(name, old_set)
    save_checkpoint(tmp_path / "best.pt", payload(old, old_set))
    new = make(name, new_set, seed=1)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    report = load_pretrained(new, tmp_path / "best.pt")
    state, old_state = new.state_dict(), old.state_dict()
    assert report.skipped and all(k.startswith(new.head_prefixes) for k in report.skipped)
    for k in report.skipped:  # the new head keeps its fresh initialisation, at the new size
        assert torch.equal(state[k], fresh[k])
    for k in report.loaded:
        assert torch.equal(state[k], old_state[k])
    assert len(report.loaded) + len(report.skipped) == len(state)
    assert "new head, not loaded" in str(report)
    with pytest.raises(UserError, match="expected shape"):
        load_pretrained(make(name, new_set), tmp_path / "best.pt", strict_head=True)


def test_load_pretrained_refuses_another_architecture(tmp_path):
    label_set = get_label_set("categories8")
    save_checkpoint(tmp_path / "best.pt", payload(make("unet-original", label_set), label_set))
    with pytest.raises(UserError, match="holds a unet-original .* the model is a lraspp-mobilenetv3"):
        load_pretrained(make("lraspp-mobilenetv3", label_set), tmp_path / "best.pt")
    with pytest.raises(UserError, match="base_channels"):
        load_pretrained(make("unet-original", label_set, base_channels=4), tmp_path / "best.pt")


def test_summary_names_the_model_classes_and_progress(tmp_path):
    label_set = get_label_set("categories8")
    model = make("unet-original", label_set)
    save_checkpoint(tmp_path / "last.pt", payload(model, label_set, train_state=train_state(model)))
    summary = summarize_checkpoint(load_checkpoint(tmp_path / "last.pt"))
    assert summary["model"] == "unet-original" and summary["label_set"] == "categories8"
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["step"] == 12 and summary["resumable"] and summary["metrics"]["miou"] == 0.5
    text = format_summary(summary)
    assert "validation mIoU 0.5000" in text and "void, flat, construction" in text and "64x32" in text

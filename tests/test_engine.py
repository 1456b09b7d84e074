"""The inference engines behind `--engine`: batch-norm folding equals the unfolded model,
the ONNX export cached beside a checkpoint (created, reused, rebuilt when the checkpoint
changes, only its own files removed, a read-only folder falls back to PyTorch), the
flags, and evaluate on the same path as predict: its per-image predictions are predict's
label PNGs pixel for pixel, and it scores an ONNX model as it scores the checkpoint."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.checkpoints import make_checkpoint
from helpers.mounts import read_only
from urbanseg.cli import main
from urbanseg.inference import engine as eng
from urbanseg.inference.fold import optimize_for_inference
from urbanseg.inference.predictor import OnnxPredictor, TorchPredictor


def _random_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Batch norms with statistics and affine parameters far from the identity, so that a
    fold that dropped or misapplied one would show in the logits."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


@pytest.mark.parametrize("name", ["lraspp-mobilenetv3", "fpn-resnet18", "deeplabv3plus-mobilenetv4", "unet-original"])
def test_folded_channels_last_model_equals_the_unfolded_one(name):
    from urbanseg.models import create_model

    torch.manual_seed(0)
    kwargs = {"base_channels": 4} if name == "unet-original" else {}
    model = _random_batch_norms(create_model(name, 8, **kwargs).eval())
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded, done = optimize_for_inference(copy.deepcopy(model), "cpu")
    assert bns > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert done == [f"{bns} of {bns} batch norms folded", "channels-last"]
    x = torch.rand(2, 3, 70, 150, generator=torch.Generator().manual_seed(1)) * 255  # not a multiple of the stride
    with torch.inference_mode():
        expected = model(x)
        got = folded(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == expected.shape
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-4 * max(scale, 1.0)


def test_torch_predictor_is_folded_and_agrees_with_the_plain_model(tmp_path):
    ckpt = make_checkpoint(tmp_path / "best.pt", "lraspp-mobilenetv3")
    fast = TorchPredictor(ckpt, "cpu")
    plain = TorchPredictor(ckpt, "cpu", optimize=False)
    assert fast.channels_last and fast.optimizations[0] == "47 of 47 batch norms folded" and not plain.optimizations
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 32, 64)).astype(np.float32)
    np.testing.assert_allclose(fast.logits(x), plain.logits(x), atol=1e-4)


# --------------------------------------------------------------------------- the cache


def _caches(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(f".*{eng.CACHE_SUFFIX}"))


def test_auto_on_cpu_exports_once_reuses_and_rebuilds_when_the_checkpoint_changes(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "best.pt")
    other = make_checkpoint(tmp_path / "last.pt")
    theirs = tmp_path / ".best.pt.notes"  # a user's file sharing the prefix
    theirs.write_text("mine")
    predictor = eng.load_engine(checkpoint=ckpt, engine="auto", device="cpu")
    out = capsys.readouterr().out
    digest = eng.checkpoint_hash(ckpt)
    first = tmp_path / f".best.pt.{digest[:16]}.engine.onnx"
    assert isinstance(predictor, OnnxPredictor) and predictor.source == first
    assert "exporting" in out and "engine: onnxruntime (cached ONNX export" in out
    assert eng.cache_marker(first) == {"format": eng.CACHE_FORMAT, "checkpoint": "best.pt", "sha256": digest}
    mtime = first.stat().st_mtime_ns

    eng.load_engine(checkpoint=ckpt, engine="auto", device="cpu")  # reused: no export
    out = capsys.readouterr().out
    assert "exporting" not in out and first.stat().st_mtime_ns == mtime
    eng.load_engine(checkpoint=other, engine="onnxruntime", device="cpu")
    other_cache = _caches(tmp_path)
    assert len(other_cache) == 2

    # A file with a cache's name but not urbanseg's marker is not ours: kept.
    foreign = tmp_path / ".best.pt.0123456789abcdef.engine.onnx"
    foreign.write_bytes(b"not an onnx model")
    make_checkpoint(tmp_path / "best.pt", "unet-original", base_channels=2)  # the checkpoint changes
    predictor = eng.load_engine(checkpoint=ckpt, engine="auto", device="cpu")
    second = tmp_path / f".best.pt.{eng.checkpoint_hash(ckpt)[:16]}.engine.onnx"
    assert second != first and predictor.source == second and not first.exists()
    assert "exporting" in capsys.readouterr().out
    assert foreign.read_bytes() == b"not an onnx model" and theirs.read_text() == "mine"
    assert sorted(_caches(tmp_path)) == sorted([second.name, foreign.name, *[n for n in other_cache if "last" in n]])
    # The rebuilt cache is the new checkpoint's: its logits are PyTorch's.
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 32, 64)).astype(np.float32)
    np.testing.assert_allclose(predictor.logits(x), TorchPredictor(ckpt, "cpu").logits(x), atol=1e-4)


def test_an_own_cache_of_an_older_format_is_exported_again(tmp_path, capsys, monkeypatch):
    """A cache an older urbanseg wrote (same checkpoint, same hash, older export format) is
    ours: replaced by a new export, not reused and not 'in the way'."""
    ckpt = make_checkpoint(tmp_path / "best.pt")
    monkeypatch.setattr(eng, "CACHE_FORMAT", eng.CACHE_FORMAT - 1)
    old = eng.load_engine(checkpoint=ckpt, engine="onnxruntime", device="cpu").source
    assert eng.cache_marker(old)["format"] == eng.CACHE_FORMAT
    monkeypatch.undo()
    capsys.readouterr()
    new = eng.load_engine(checkpoint=ckpt, engine="onnxruntime", device="cpu").source
    assert new == old and "exporting" in capsys.readouterr().out
    assert eng.cache_marker(new)["format"] == eng.CACHE_FORMAT and _caches(tmp_path) == [new.name]


def test_a_checkpoint_replaced_during_its_export_is_not_cached(tmp_path, monkeypatch):
    """The cache is named for the checkpoint's hash and holds the weights read after it: a
    checkpoint replaced in between (a training saving best.pt) must not leave a cache named
    for one checkpoint that holds the other (every later run would trust it)."""
    ckpt = make_checkpoint(tmp_path / "best.pt")
    other = make_checkpoint(tmp_path / "other.pt", base_channels=8)
    real_verify = eng.verify_onnx

    def verify_then_replace(*args, **kwargs):
        shutil.copy(other, ckpt)  # the training's save lands now
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(eng, "verify_onnx", verify_then_replace)
    with pytest.raises(eng.UserError, match="changed while it was being exported"):
        eng.cached_onnx(ckpt)
    assert _caches(tmp_path) == [] and not list(tmp_path.glob(".*.tmp*"))


def test_an_export_killed_mid_write_leaves_nothing_behind_after_the_next(tmp_path):
    """SIGKILL during an export leaves atomic_path's temporary file (12.9 MB for the default
    model): the next export removes those of writers no longer running, not a live one's."""
    import subprocess
    import sys

    ckpt = make_checkpoint(tmp_path / "best.pt")
    target = eng.cache_path(ckpt, eng.checkpoint_hash(ckpt))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = target.with_name(f".{target.name}.{int(gone.stdout)}-abcd1234.tmp.onnx")
    live = target.with_name(f".{target.name}.{os.getpid()}-efgh5678.tmp.onnx")
    for leftover in (dead, live):
        leftover.write_bytes(b"half an onnx file")
    assert eng.cached_onnx(ckpt) == target
    assert not dead.exists() and live.exists()


def test_a_file_in_the_caches_place_that_is_not_a_cache_is_an_error_or_a_fallback(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "best.pt")
    squatter = eng.cache_path(ckpt, eng.checkpoint_hash(ckpt))
    squatter.write_bytes(b"user data")
    with pytest.raises(Exception, match="is in the way"):
        eng.load_engine(checkpoint=ckpt, engine="onnxruntime", device="cpu")
    predictor = eng.load_engine(checkpoint=ckpt, engine="auto", device="cpu")
    assert isinstance(predictor, TorchPredictor) and "note: no ONNX Runtime engine" in capsys.readouterr().out
    assert squatter.read_bytes() == b"user data"


def test_read_only_folder_falls_back_to_pytorch_with_one_note(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    ckpt = make_checkpoint(folder / "best.pt")
    with read_only(folder):
        predictor = eng.load_engine(checkpoint=ckpt, engine="auto", device="cpu")
        out = capsys.readouterr().out
        assert isinstance(predictor, TorchPredictor)
        assert out.count("note:") == 1 and "cannot write the ONNX export cache" in out and "engine: torch" in out
        forced = eng.load_engine(checkpoint=ckpt, engine="onnxruntime", device="cpu")  # exported for this run only
        assert isinstance(forced, OnnxPredictor) and "for this run only" in capsys.readouterr().out
    assert _caches(folder) == []
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 32, 64)).astype(np.float32)
    np.testing.assert_allclose(forced.logits(x), predictor.logits(x), atol=1e-4)


def test_engine_flags(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "best.pt")
    image = tmp_path / "a.png"
    Image.fromarray(np.full((32, 64, 3), 90, np.uint8)).save(image)
    with pytest.raises(SystemExit) as bad:
        main(["predict", "--checkpoint", str(ckpt), "--input", str(image), "--engine", "gpu"])
    assert bad.value.code == 2 and "choose from 'auto', 'torch', 'onnxruntime'" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "m.onnx"), "--input", str(image), "--engine", "torch"]) == 2
    assert "--engine torch runs a checkpoint" in capsys.readouterr().err
    for engine, kind in (("torch", "torch"), ("onnxruntime", "onnxruntime")):
        out_dir = tmp_path / engine
        args = ["predict", "--checkpoint", str(ckpt), "--input", str(image), "--engine", engine, "-o", str(out_dir)]
        assert main([*args, "--device", "cpu"]) == 0
        assert f"engine: {kind}" in capsys.readouterr().out
    a, b = (np.asarray(Image.open(tmp_path / e / "a_labels.png")) for e in ("torch", "onnxruntime"))
    assert (a == b).mean() > 0.999


# --------------------------------------------------------------------------- evaluate == predict


def test_evaluate_predictions_are_predicts_label_pngs(tiny, tmp_path, monkeypatch):
    """evaluate and predict on the same images and settings: pixel for pixel, each engine."""
    from urbanseg.data.loader import ShardDataset
    from urbanseg.evaluation import evaluate as ev

    images = tmp_path / "images"
    for item in ShardDataset(tiny["shards"], "val"):
        images.mkdir(exist_ok=True)
        Image.fromarray(item["image"].permute(1, 2, 0).numpy()).save(images / f"{item['name']}.png")
    seen: dict[str, np.ndarray] = {}
    real = ev._score

    def spy(state, batch, imgs, preds, truths, label_set):
        seen.update(zip(batch["name"], preds, strict=True))
        return real(state, batch, imgs, preds, truths, label_set)

    monkeypatch.setattr(ev, "_score", spy)
    for engine in ("torch", "onnxruntime"):
        seen.clear()
        assert main(["evaluate", "--run", str(tiny["run"]), "--engine", engine, "--batch-size", "2"]) == 0
        out = tmp_path / f"pred-{engine}"
        args = ["predict", "--run", str(tiny["run"]), "--input", str(images), "-o", str(out), "--engine", engine]
        assert main([*args, "--outputs", "labels", "--batch-size", "3"]) == 0
        assert len(seen) == 5
        for name, pred in seen.items():
            assert np.array_equal(np.asarray(Image.open(out / f"{name}_labels.png")), pred), (engine, name)
        metrics = json.loads((tiny["run"] / "eval" / "val" / "metrics.json").read_text())
        assert metrics["engine"] == engine


def test_evaluate_scores_an_onnx_model_as_it_scores_the_checkpoint(tiny, tmp_path, capsys):
    run = tiny["run"]
    model = tmp_path / "best.onnx"
    assert main(["export", "--run", str(run), "--out", str(model)]) == 0
    assert main(["evaluate", "--run", str(run), "--engine", "torch", "--full-res"]) == 0
    reference = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    shutil.rmtree(run / "eval" / "val")
    assert main(["evaluate", "--run", str(run), "--model", str(model), "--full-res"]) == 0
    assert "engine: onnxruntime (ONNX model" in capsys.readouterr().out
    got = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert got["engine"] == "onnxruntime" and got["checkpoint"]["path"] == str(model)
    assert "**engine:** onnxruntime" in (run / "eval" / "val" / "report.md").read_text()
    assert got["checkpoint"]["step"] == reference["checkpoint"]["step"]
    assert got["metrics"]["miou"] == pytest.approx(reference["metrics"]["miou"], abs=1e-3)
    key = "mean_category_iou"  # categories8: the official category scores
    assert got["official"][key] == pytest.approx(reference["official"][key], abs=1e-3)
    shutil.rmtree(run / "eval" / "val")
    # `--checkpoint x.onnx` as predict takes it (it used to load the model, then call the file a corrupt checkpoint)
    assert main(["evaluate", "--run", str(run), "--checkpoint", str(model), "--full-res"]) == 0
    again = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert again["metrics"]["miou"] == got["metrics"]["miou"] and again["checkpoint"]["path"] == str(model)
    assert main(["evaluate", "--run", str(run), "--model", str(model), "--checkpoint", "best"]) == 2
    assert main(["evaluate", "--run", str(run), "--model", str(tmp_path / "missing.onnx")]) == 2
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(model), "--out", str(tmp_path / "again.onnx")]) == 2
    assert "is an ONNX model already" in capsys.readouterr().err

"""One typed reader per on-disk format: structurally wrong manifest.json, spec.json,
checkpoints, ONNX metadata and config.yaml fed to the real commands exit 2 with a message
naming the file and the field (never a traceback); label values outside the label set
are named by shard, record and value; each format round-trips through its class."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers.checkpoints import make_checkpoint
from helpers.training import TINY_MODEL
from urbanseg import config as cfg
from urbanseg.cli import main
from urbanseg.data import tfrecord
from urbanseg.data.formats import Manifest, ShardSpec
from urbanseg.errors import UserError
from urbanseg.labels import get_label_set
from urbanseg.rundir import RunDir

LS8 = get_label_set("categories8")


@pytest.fixture(scope="module")
def data(small_synth_data, tmp_path_factory):
    """Real `synth` -> `prepare` -> `pack` output (64x32, 4 train and 2 val images; shared,
    read-only) and a run folder with a tiny 8-class checkpoint and its config.yaml."""
    root = tmp_path_factory.mktemp("formats")
    shards = small_synth_data.shards
    run = root / "run"
    make_checkpoint(run / "best.pt")
    cfg.save(cfg.TrainConfig(data=shards, run=run), run / "config.yaml")
    return {"root": root, "shards": shards, "prepared": small_synth_data.prepared, "run": run}


def fails(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI: exit 2, no traceback, every needle in the message."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def edit_json(path: Path, change) -> None:
    """Rewrite a JSON file with `change(doc)` (returning a replacement, or None after editing in place)."""
    doc = json.loads(path.read_text())
    new = change(doc)
    path.write_text(new if isinstance(new, str) else json.dumps(doc if new is None else new))


def setter(dotted: str, value):
    """change(doc) that sets doc["a"]["b"][0] for "a.b.0" (or deletes it when value is DELETE)."""

    def change(doc):
        *parents, last = dotted.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value is DELETE:
            del node[key]
        else:
            node[key] = value

    return change


DELETE = object()


def seven_classes(doc, where="label_set"):
    """Drop the last class from the label set (its palette too): fewer classes than elsewhere."""
    ls = doc[where]
    ls["classes"], ls["palette"] = ls["classes"][:7], ls["palette"][:7]
    ls["id_to_class"] = [k if k < 7 else 255 for k in ls["id_to_class"]]
    ls["color_to_class"] = [[c, k] for c, k in ls["color_to_class"] if k < 7]


# --------------------------------------------------------------------------- manifest.json -> `urbanseg pack`

MANIFEST_CASES = {
    "a list": (lambda d: [1, 2, 3], "the file holds [1, 2, 3]"),
    "not JSON": (lambda d: "{", "not JSON"),
    "no label_set": (setter("label_set", DELETE), "`label_set` is missing"),
    "splits null": (setter("splits", None), "`splits` is null"),
    "split not an object": (setter("splits.train", 5), "`splits.train` is 5"),
    "size a string": (setter("size", "big"), '`size` is "big" (a string)'),
    "size of one number": (setter("size", [64]), "`size` is [64]"),
    "size zero": (setter("size", [0, 32]), "`size[0]` is 0"),
    "stems missing": (setter("splits.train.stems", DELETE), "`splits.train.stems` is missing"),
    "stems of numbers": (setter("splits.train.stems", [1, 2, 3, 4]), "`splits.train.stems[0]` is 1"),
    "negative count": (setter("splits.train.count", -1), "`splits.train.count` is -1"),
    "count disagrees": (setter("splits.train.count", 9), "`splits.train.count` is 9 but"),
    "file outside the folder": (setter("splits.train.files.0", "../../etc/passwd"), "`splits.train.files[0]`"),
    "pixel counts too short": (setter("splits.train.pixel_counts", [1, 2]), "`splits.train.pixel_counts`"),
    "negative pixel count": (setter("splits.train.pixel_counts.0", -5), "`splits.train.pixel_counts[0]` is -5"),
    "palette colour of 2": (setter("label_set.palette.0", [1, 2]), "`label_set.palette[0]`"),
    "palette value 300": (setter("label_set.palette.1.0", 300), "`label_set.palette[1][0]` is 300"),
    "fewer classes than the palette": (
        lambda d: d["label_set"].update(classes=d["label_set"]["classes"][:7]),
        "`label_set.palette`",
    ),
    "class index out of range": (setter("label_set.id_to_class.7", 9), "`label_set.id_to_class[7]` is 9"),
    "ignore index inside the classes": (setter("label_set.ignore_index", 3), "`label_set.ignore_index` is 3"),
    "unknown source": (setter("source", "jpeg"), '`source` is "jpeg"'),
    "version a string": (setter("format_version", "1"), '`format_version` is "1"'),
    "no version": (setter("format_version", DELETE), "`format_version` is missing"),
    "newer version": (setter("format_version", 99), "has manifest format 99"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_malformed_manifest_is_named_by_pack(case, data, tmp_path, capsys):
    change, needle = MANIFEST_CASES[case]
    prepared = tmp_path / "prepared"
    shutil.copytree(data["prepared"], prepared)
    edit_json(prepared / "manifest.json", change)
    err = fails(
        ["pack", "--prepared", str(prepared), "--out", str(tmp_path / "shards")],
        capsys,
        str(prepared / "manifest.json"),
        needle,
    )
    assert ("upgrade urbanseg" if case == "newer version" else "re-run `urbanseg prepare`") in err
    assert not (tmp_path / "shards" / "train").exists()


def test_malformed_manifest_is_named_by_evaluate_full_res(data, tmp_path, capsys):
    prepared, shards = tmp_path / "prepared", tmp_path / "shards"
    shutil.copytree(data["prepared"], prepared)
    shutil.copytree(data["shards"], shards)
    edit_json(prepared / "manifest.json", setter("splits.val.stems", None))
    edit_json(shards / "val" / "spec.json", lambda d: d.update(prepared=str(prepared), data=None))
    fails(
        ["evaluate", "--run", str(data["run"]), "--data", str(shards), "--full-res", "--gallery", "0"],
        capsys,
        str(prepared / "manifest.json"),
        "`splits.val.stems` is null",
    )


# --------------------------------------------------------------------------- spec.json -> train, evaluate, predict


SPEC_CASES = {
    "a list": (lambda d: [1, 2, 3], "the file holds [1, 2, 3]"),
    "not JSON": (lambda d: "{", "not JSON"),
    "no label_set": (setter("label_set", DELETE), "`label_set` is missing"),
    "shards null": (setter("shards", None), "`shards` is null"),
    "shards missing": (setter("shards", DELETE), "`shards` is missing"),
    "width a string": (setter("width", "big"), '`width` is "big" (a string)'),
    "height zero": (setter("height", 0), "`height` is 0"),
    "height a boolean": (setter("height", True), "`height` is true (a boolean), expected an integer >= 1"),
    "records a string": (setter("shards.0.records", "1"), '`shards[0].records` is "1"'),
    "negative records": (setter("shards.1.records", -1), "`shards[1].records` is -1"),
    "shard in another folder": (setter("shards.0.file", "../x.tfrecord"), "`shards[0].file`"),
    "first_id off": (setter("shards.1.first_id", 0), "`shards[1].first_id` is 0"),
    "data_length off": (setter("data_length", 99), "`data_length` is 99 but the shards hold"),
    "pixel counts of strings": (setter("pixel_counts", ["a"] * 8), "`pixel_counts[0]`"),
    "palette colour of 2": (setter("label_set.palette.0", [1, 2]), "`label_set.palette[0]`"),
    "label set of 7 classes, num_classes 8": (seven_classes, "`pixel_counts`"),
    "num_classes disagrees": (setter("num_classes", 9), "`num_classes` is 9"),
    "label_set classes not strings": (setter("label_set.classes", [1, 2]), "`label_set.classes[0]` is 1"),
    "newer version": (setter("format_version", 2), "has shard spec format 2"),
    "no version": (setter("format_version", DELETE), "`format_version` is missing"),
}
COMMANDS = {
    "train": lambda d, s: [
        "train",
        "--data",
        str(s),
        "--run",
        str(d["root"] / "new-run"),
        *TINY_MODEL,
        "--iters",
        "1",
        "--batch-size",
        "2",
        "--workers",
        "0",
    ],
    "evaluate": lambda d, s: ["evaluate", "--run", str(d["run"]), "--data", str(s), "--gallery", "0"],
    "predict --split": lambda d, s: [
        "predict",
        "--checkpoint",
        str(d["run"] / "best.pt"),
        "--data",
        str(s),
        "--split",
        "val",
        "--num",
        "1",
        "-o",
        str(d["root"] / "pictures"),
    ],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", SPEC_CASES)
def test_malformed_spec_is_named_by_every_reader(case, command, data, tmp_path, capsys):
    change, needle = SPEC_CASES[case]
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    for split in ("train", "val"):
        edit_json(shards / split / "spec.json", change)
    split = "train" if command == "train" else "val"
    err = fails(COMMANDS[command](data, shards), capsys, str(shards / split / "spec.json"), needle)
    assert ("upgrade urbanseg" if case == "newer version" else "re-run `urbanseg pack`") in err
    assert not (data["root"] / "new-run").exists() and not (data["root"] / "pictures").exists()


# --------------------------------------------------------------------------- checkpoints


class RunsCode:
    """Unpickling this would create the file `marker`: loading it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _edited_checkpoint(source: Path, target: Path, change) -> Path:
    ckpt = torch.load(source, weights_only=True)
    change(ckpt)
    torch.save(ckpt, target)
    return target


def seven_class_head_label_set(ckpt):
    ckpt["label_set"] = get_label_set("categories7").to_dict()


CHECKPOINT_CASES = {
    "input size 0x0": (setter("input_size", [0, 0]), "`input_size[0]` is 0"),
    "input size a string": (setter("input_size", "64x32"), '`input_size` is "64x32"'),
    "label set shorter than the head": (seven_class_head_label_set, "lists 7 classes, but the model's head has 8"),
    "label set without classes": (setter("label_set.classes", DELETE), "`label_set.classes` is missing"),
    "std of zero": (setter("normalization.std.1", 0.0), "`normalization.std[1]` is 0.0"),
    "mean of two": (setter("normalization.mean", [1.0, 2.0]), "`normalization.mean`"),
    "model kwargs not an object": (setter("model.kwargs", [8]), "`model.kwargs` is [8]"),
    "no step": (setter("step", DELETE), "`step` is missing"),
    "newer version": (setter("format_version", 2), "has checkpoint format 2"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_malformed_checkpoint_is_named(case, data, tmp_path, capsys):
    change, needle = CHECKPOINT_CASES[case]
    bad = _edited_checkpoint(data["run"] / "best.pt", tmp_path / "bad.pt", change)
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((32, 64, 3), np.uint8))
    for argv in (
        ["predict", "--checkpoint", str(bad), "-i", str(image), "-o", str(tmp_path / "out")],
        ["evaluate", "--run", str(data["run"]), "--checkpoint", str(bad), "--data", str(data["shards"])],
        ["export", "--checkpoint", str(bad)],
    ):
        fails(argv, capsys, f"checkpoint {bad}", needle)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 4", "plain pickle"])
def test_pickled_code_is_refused_and_never_run(how, data, tmp_path, capsys):
    import pickle

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    payload = {"format_version": 1, "model": RunsCode(marker), "model_state": {}}
    if how == "plain pickle":
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, evil, pickle_protocol=4 if how == "pickle protocol 4" else 2)
    for argv in (
        ["predict", "--checkpoint", str(evil), "-i", str(tmp_path)],
        ["evaluate", "--run", str(data["run"]), "--checkpoint", str(evil)],
        ["train", "--data", str(data["shards"]), "--run", str(tmp_path / "r"), "--init", str(evil)],
    ):
        err = fails(
            argv,
            capsys,
            f"checkpoint {evil} refused: not a plain checkpoint (it contains pickled Python "
            "objects (io.open), which urbanseg never loads because loading them can run code)",
        )
        assert "weights_only" not in err and "truncated" not in err
    fails(
        [
            "train",
            "--data",
            str(data["shards"]),
            "--run",
            str(tmp_path / "r"),
            "--batch-size",
            "2",
            "--encoder-weights",
            str(evil),
        ],
        capsys,
        f"encoder weights file {evil} refused: not a plain encoder weights file",
        "can run code",
    )
    assert not marker.exists()


def test_truncated_checkpoint_is_named(data, tmp_path, capsys):
    blob = (data["run"] / "best.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(blob[: len(blob) // 3])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")  # starts like a pickle: PyTorch's unpickler rejects it
    for bad in (cut, junk):
        err = fails(
            ["predict", "--checkpoint", str(bad), "-i", str(tmp_path)],
            capsys,
            str(bad),
            "cannot be read",
            "truncated, corrupt",
        )
        assert "refused" not in err and "weights_only" not in err


# --------------------------------------------------------------------------- ONNX metadata


@pytest.fixture(scope="module")
def onnx_model(data):
    pytest.importorskip("onnxruntime")
    path = data["root"] / "model.onnx"
    assert main(["export", "--checkpoint", str(data["run"] / "best.pt"), "-o", str(path)]) == 0
    return path


def _with_metadata(source: Path, target: Path, text: str | None) -> Path:
    import onnx

    proto = onnx.load(str(source))
    kept = [p for p in proto.metadata_props if p.key != "urbanseg"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    if text is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "urbanseg", text
    onnx.save(proto, str(target))
    return target


def _meta_with(onnx_model: Path, change) -> str:
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(onnx_model)).metadata_props}["urbanseg"])
    change(meta)
    return json.dumps(meta)


@pytest.mark.parametrize(
    "case", ["not JSON", "absent", "no label_set", "input size 0", "7 classes for 8 outputs", "a list", "newer version"]
)
def test_malformed_onnx_metadata_is_named(case, onnx_model, tmp_path, capsys):
    text, needle = {
        "not JSON": ("label_set: categories8", "metadata is not JSON"),
        "absent": (None, "has no 'urbanseg' metadata"),
        "no label_set": (_meta_with(onnx_model, setter("label_set", DELETE)), "`label_set` is missing"),
        "input size 0": (_meta_with(onnx_model, setter("input_size", [64, 0])), "`input_size[1]` is 0"),
        "7 classes for 8 outputs": (_meta_with(onnx_model, seven_classes), "outputs 8 classes"),
        "a list": ("[1, 2, 3]", "holds [1, 2, 3]"),
        "newer version": (_meta_with(onnx_model, setter("format_version", 5)), "upgrade urbanseg"),
    }[case]
    bad = _with_metadata(onnx_model, tmp_path / "bad.onnx", text)
    fails(["predict", "--model", str(bad), "-i", str(tmp_path)], capsys, f"ONNX model {bad}", needle)


# --------------------------------------------------------------------------- config.yaml


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- 1\n- 2\n", "expected a mapping"),
        ("data: [1, 2]\n", "`data` is [1, 2]"),
        ("data: shards\nbatch_size: big\n", '`batch_size` is "big"'),
        ("data: shards\nbatch_size: 0\n", "--batch-size 0 must be >= 1"),
        ("data: shards\noptimizer: adam\n", '`optimizer` is "adam"'),
        ("data: shards\nbogus: 1\n", "unknown keys ['bogus']"),
        ("batch_size: 2\n", "`data` is missing"),
        ("data: [unclosed\n", "cannot be read as YAML"),
    ],
)
def test_malformed_run_config_is_named(text, needle, data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(data["run"] / "best.pt", run / "best.pt")
    (run / "config.yaml").write_text(text)
    fails(["evaluate", "--run", str(run)], capsys, str(run / "config.yaml"), needle)
    fails(
        ["train", "--data", str(data["shards"]), "--run", str(run), "--resume"],
        capsys,
        str(run / "config.yaml"),
        needle,
    )


# --------------------------------------------------------------------------- label values (issue 8.4)


def _put_bad_label(split_dir: Path, record: int, value: int) -> Path:
    """Re-encode record `record` of a packed split with label `value` in a corner, with the
    real codec; returns the shard file. Index and spec follow, so only the value is wrong."""
    spec = ShardSpec.load(split_dir / "spec.json")
    shard = next(s for s in spec.shards if s.first_id <= record < s.first_id + s.records)
    path = split_dir / shard.file
    examples = [tfrecord.decode_example(d) for d in tfrecord.iter_records(path)]
    ex = examples[record - shard.first_id]
    label = cv2.imdecode(np.frombuffer(ex["label_data"][0], np.uint8), cv2.IMREAD_UNCHANGED)
    label[:2, :3] = value
    ex["label_data"] = [cv2.imencode(".png", label)[1].tobytes()]
    blob = b"".join(
        tfrecord.frame_record(tfrecord.encode_example({k: v if len(v) > 1 else v[0] for k, v in e.items()}))
        for e in examples
    )
    path.write_bytes(blob)
    tfrecord.build_index(path)
    shards = tuple(dataclasses.replace(s, bytes=len(blob)) if s.file == shard.file else s for s in spec.shards)
    dataclasses.replace(spec, shards=shards).save(split_dir / "spec.json")
    return path


@pytest.mark.parametrize("workers", ["0", "2"])
def test_label_outside_the_label_set_is_named_by_train(workers, data, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    shard = _put_bad_label(shards / "train", 3, 77)
    local = 3 - ShardSpec.load(shards / "train" / "spec.json").shards[-1].first_id
    argv = [
        "train",
        "--data",
        str(shards),
        "--run",
        str(tmp_path / "run"),
        *TINY_MODEL,
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--workers",
        workers,
        "--augment" if workers == "2" else "--no-augment",
    ]
    err = fails(argv, capsys, f"{shard}: record {local}", "label values [77]", "'categories8'", "0..7, 255 = ignore")
    assert "DataLoader worker" not in err and "Original Traceback" not in err


def test_label_outside_the_label_set_is_named_by_evaluate(data, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    shard = _put_bad_label(shards / "val", 0, 77)
    for workers in ("0", "2"):
        err = fails(
            ["evaluate", "--run", str(data["run"]), "--data", str(shards), "--workers", workers],
            capsys,
            f"{shard}: record 0",
            "label values [77]",
        )
        assert "Original Traceback" not in err
    assert tfrecord.verify_shards(shards / "val", progress=False)["records"] == 2  # the framing itself is fine


# --------------------------------------------------------------------------- round trips


def test_manifest_round_trip_and_todays_writer(data, tmp_path):
    path = data["prepared"] / "manifest.json"
    manifest = Manifest.load(path)
    assert manifest.to_json() == path.read_text()  # what `prepare` writes loads and saves byte for byte
    assert manifest.label_set == LS8 and manifest.size == (64, 32) and manifest.source == "labelIds"
    assert set(manifest.splits) == {"train", "val"} and manifest.splits["train"].count == 4
    manifest.save(tmp_path / "manifest.json")
    assert Manifest.load(tmp_path / "manifest.json") == manifest
    changed = dataclasses.replace(manifest, size=(32, 16), data=None)
    assert Manifest.parse(copy.deepcopy(changed.to_dict()), "x") == changed


def test_spec_round_trip_and_todays_writer(data, tmp_path):
    path = data["shards"] / "train" / "spec.json"
    spec = ShardSpec.load(path)
    assert spec.to_json() == path.read_text()  # what `pack` writes loads and saves byte for byte
    assert (spec.width, spec.height, spec.data_length, spec.label_set) == (64, 32, 4, LS8)
    spec.save(tmp_path / "spec.json")
    assert ShardSpec.load(tmp_path / "spec.json") == spec


def test_onnx_metadata_round_trip(onnx_model):
    import onnx

    from urbanseg.inference.metadata import OnnxMetadata

    text = {p.key: p.value for p in onnx.load(str(onnx_model)).metadata_props}["urbanseg"]
    meta = OnnxMetadata.parse(text, onnx_model)
    assert meta.to_json() == text and meta.label_set == LS8 and meta.input_size == (64, 32)
    assert OnnxMetadata.parse(meta.to_json(), "x") == meta


def test_run_config_round_trip(data, tmp_path):
    config = cfg.TrainConfig(
        data=data["shards"],
        run=tmp_path,
        model="unet-original",
        lr=0.01,
        epochs=3,
        crop="32x16",
        init=None,
        optimizer="sgd",
        clip_grad=1.0,
    )
    cfg.save(config, tmp_path / "config.yaml")
    run = RunDir(tmp_path)
    assert run.config() == config and run.data == data["shards"]
    # A key an older urbanseg did not write takes its default; `run` is the folder itself.
    (tmp_path / "config.yaml").write_text(f"data: {data['shards']}\n")
    assert run.config() == cfg.TrainConfig(data=data["shards"], run=tmp_path)


def test_run_data_is_found_from_any_folder(data, tmp_path, monkeypatch):
    """A run's shards, saved relative to the folder `train` ran in by older releases, are
    found from elsewhere through `run` as typed; a missing folder names config.yaml."""
    work = tmp_path / "work"
    shutil.copytree(data["shards"], work / "shards")
    (work / "runs" / "b").mkdir(parents=True)
    (work / "runs" / "b" / "config.yaml").write_text("data: shards\nrun: runs/b\n")
    monkeypatch.chdir(tmp_path)
    assert RunDir("work/runs/b").data == (work / "shards").absolute()
    monkeypatch.chdir(work)
    assert RunDir("runs/b").data == Path("shards")
    shutil.rmtree(work / "shards")
    with pytest.raises(UserError, match=r"shards folder shards \(`data` in runs/b/config.yaml\) does not exist here"):
        _ = RunDir("runs/b").data


def test_checkpoint_round_trip_keeps_the_summary(data, tmp_path):
    from urbanseg.checkpoint import (
        format_summary,
        load_checkpoint,
        save_checkpoint,
        summarize_checkpoint,
    )

    ckpt = load_checkpoint(data["run"] / "best.pt")
    save_checkpoint(tmp_path / "again.pt", ckpt)
    again = load_checkpoint(tmp_path / "again.pt")
    assert summarize_checkpoint(again) == summarize_checkpoint(ckpt)
    text = format_summary(summarize_checkpoint(again))
    assert "input size: 64x32" in text and "categories8 (8)" in text and "step 7, epoch 1" in text

"""`urbanseg predict` end to end on tiny inputs and a tiny checkpoint."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from helpers.checkpoints import make_checkpoint
from urbanseg.cli import main
from urbanseg.labels import get_label_set
from urbanseg.outputs import LOCK, MARKER


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def scene(h, w, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def write_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """One image per format under `folder` (with a sub-folder); returns stem -> (H, W)."""
    (folder / "sub").mkdir(parents=True)
    rgb = scene(45, 70)
    Image.fromarray(rgb).save(folder / "plain.png")
    Image.fromarray(np.dstack([scene(33, 50, 1), np.full((33, 50), 128, np.uint8)]), "RGBA").save(folder / "rgba.png")
    Image.fromarray(scene(40, 31, 2)[..., 0]).save(folder / "sub" / "grey.png")
    cv2.imwrite(str(folder / "deep.png"), scene(20, 90, 3).astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "deep.tif"), scene(25, 26, 4)[..., 0].astype(np.uint16) * 300)
    Image.fromarray(scene(50, 100, 5)).save(folder / "photo.jpg", quality=90)
    return {"plain": (45, 70), "rgba": (33, 50), "sub/grey": (40, 31), "deep": (20, 90), "photo": (50, 100)}


def test_folder_of_any_format_outputs_at_input_resolution(tmp_path, ckpt):
    sizes = write_inputs(tmp_path / "in")
    (tmp_path / "in" / "deep.tif").unlink()  # same stem as deep.png: tested separately below
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(out),
                "--cityscapes-ids",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    label_set = get_label_set("categories8")
    for stem, (h, w) in sizes.items():
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < label_set.num_classes
        color = np.asarray(Image.open(out / f"{stem}_color.png"))
        assert (color == label_set.colorize(labels)).all()
        assert np.asarray(Image.open(out / f"{stem}_overlay.png")).shape == (h, w, 3)
        ids = np.asarray(Image.open(out / f"{stem}_labelIds.png"))
        # Valid Cityscapes ids that map back to the predicted class.
        assert (label_set.labels_from_ids(ids) == labels).all()
    assert not list(out.rglob("*.tmp*"))


def test_cityscapes_ids_match_the_official_table(tmp_path):
    """classes19 predictions -> the label ids cityscapesscripts gives each trainId."""
    labels_mod = pytest.importorskip("cityscapesscripts.helpers.labels")
    ckpt = make_checkpoint(tmp_path / "c19.pt", labels="classes19")
    Image.fromarray(scene(60, 90)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "-i",
                str(tmp_path / "a.png"),
                "-o",
                str(out),
                "--outputs",
                "labels",
                "--cityscapes-ids",
            ]
        )
        == 0
    )
    train_ids = np.asarray(Image.open(out / "a_labels.png"))
    ids = np.asarray(Image.open(out / "a_labelIds.png"))
    official = np.array([labels_mod.trainId2label[t].id for t in range(19)])
    assert ids.shape == (60, 90) and (ids == official[train_ids]).all()
    assert (get_label_set("classes19").cityscapes_ids()[:19] == official).all()  # every class, not just those seen


def test_resize_native_and_tile_modes(tmp_path, ckpt):
    image = tmp_path / "big.png"
    Image.fromarray(scene(70, 150)).save(image)
    results = {}
    for mode, flags in {"resize": [], "native": ["--native"], "tile": ["--tile", "--tile-size", "200x100"]}.items():
        out = tmp_path / mode
        args = ["predict", "--checkpoint", str(ckpt), "-i", str(image), "-o", str(out), "--outputs", "labels"]
        assert main(args + flags) == 0
        results[mode] = np.asarray(Image.open(out / "big_labels.png"))
        assert results[mode].shape == (70, 150)
        assert sorted(p.name for p in out.iterdir()) == [MARKER, LOCK, "big_labels.png"]
    assert (results["tile"] == results["native"]).all()  # the window covers the image
    tiled = tmp_path / "tiled"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "-i",
                str(image),
                "-o",
                str(tiled),
                "--outputs",
                "labels",
                "--tile",
                "--tile-size",
                "64x32",
                "--tile-overlap",
                "0.5",
            ]
        )
        == 0
    )
    assert np.asarray(Image.open(tiled / "big_labels.png")).shape == (70, 150)


def test_glob_and_corrupt_file_and_empty_folder(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        Image.fromarray(scene(30 + k, 40, k)).save(src / f"ok{k}.png")
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "-i",
            str(src / "*.png"),
            str(tmp_path / "empty"),
            str(tmp_path / "missing.jpg"),
            "-o",
            str(out),
        ]
    )
    assert code == 2
    captured = capsys.readouterr()
    err = captured.err
    # 6 inputs: the glob's 4 files, the empty folder and the missing file
    assert "wrote predictions for 3 of 6 inputs" in captured.out
    assert "3 of 6 inputs failed" in err and "corrupt.png" in err and "empty" in err and "missing.jpg" in err
    assert "Traceback" not in err
    for k in range(3):
        assert np.asarray(Image.open(out / f"ok{k}_labels.png")).shape == (30 + k, 40)
    assert not (out / "corrupt_labels.png").exists()


def test_video_in_video_out(tmp_path, ckpt):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (48, 32))
    for k in range(5):
        writer.write(scene(32, 48, k))
    writer.release()
    assert (
        main(["predict", "--checkpoint", str(ckpt), "-i", str(video), "-o", str(tmp_path / "out"), "--batch-size", "2"])
        == 0
    )
    cap = cv2.VideoCapture(str(tmp_path / "out" / "clip_overlay.mp4"))
    frames = []
    while (frame := cap.read())[0]:
        frames.append(frame[1])
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)


def test_outputs_inside_the_input_folder_are_not_inputs(tmp_path, ckpt, monkeypatch, capsys):
    """`--out` inside `--input` (the default ./predictions of `--input .`): a rerun
    segments the same pictures, not its own overlays too; an urbanseg output folder
    below the input (another predict's) is skipped the same way. A video and a picture
    of one name do not clash (NAME_overlay.mp4 against NAME_*.png)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(scene(32, 48)).save(photos / "clip.png")
    writer = cv2.VideoWriter(str(photos / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (48, 32))
    writer.write(scene(32, 48, 1))
    writer.release()
    monkeypatch.chdir(photos)
    for _ in range(2):
        assert main(["predict", "--checkpoint", str(ckpt), "--input", "."]) == 0
        assert "for 2 of 2 inputs" in capsys.readouterr().out
    assert sorted(p.name for p in (photos / "predictions").iterdir() if not p.name.startswith(".")) == [
        "clip_color.png",
        "clip_labels.png",
        "clip_overlay.mp4",
        "clip_overlay.png",
    ]
    assert main(["predict", "--checkpoint", str(ckpt), "--input", ".", "--out", str(tmp_path / "elsewhere")]) == 0
    assert "for 2 of 2 inputs" in capsys.readouterr().out


def test_labels_without_a_mapping_names_the_checkpoint_and_the_fix(tmp_path, ckpt, capsys):
    """A categories8 model cannot write categories7 (no class -> class mapping): the error
    names the checkpoint (not its hidden engine cache) and predict's fix, not evaluate's."""
    Image.fromarray(scene(32, 48)).save(tmp_path / "a.png")
    args = ["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "a.png"), "-o", str(tmp_path / "o")]
    assert main([*args, "--labels", "categories7"]) == 2
    err = capsys.readouterr().err
    assert f"the model {ckpt} predicts categories8" in err and "Drop --labels" in err
    assert ".engine.onnx" not in err and "fine-tune" not in err


def test_a_foreign_output_folder_is_refused_before_the_model_loads(tmp_path, capsys):
    """An --out that urbanseg predict did not write: exit 2 naming it, before any model work
    (with `--engine auto` that would be an ONNX export cached beside the checkpoint)."""
    ckpt = make_checkpoint(tmp_path / "ckpt" / "best.pt")
    image = tmp_path / "a.png"
    Image.fromarray(scene(20, 20)).save(image)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    for mode in (["-i", str(image)], ["--split", "val", "--data", str(tmp_path / "no-shards")]):
        assert main(["predict", "--checkpoint", str(ckpt), *mode, "--out", str(theirs)]) == 2
        err = capsys.readouterr()
        assert f"--out {theirs} is not empty" in err.err and "model:" not in err.out
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best.pt"]  # no engine cache
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(scene(20, 20)).save(image)
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["predict", "--checkpoint", str(bogus), "-i", str(image)]) == 2
    assert "bogus.pt" in capsys.readouterr().err
    assert main(["predict", "--run", str(tmp_path), "-i", str(image)]) == 2
    assert "best.pt does not exist" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "no.onnx"), "-i", str(image)]) == 2
    assert "no.onnx does not exist" in capsys.readouterr().err


def test_onnx_model_runs_without_pytorch_and_agrees(tmp_path, ckpt):
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(onnx_path)]) == 0
    images = tmp_path / "in"
    images.mkdir()
    for k in range(3):
        Image.fromarray(scene(41 + 7 * k, 77, k)).save(images / f"im{k}.png")
    argv = ["predict", "--model", str(onnx_path), "-i", str(images), "-o", str(tmp_path / "onnx")]
    code = (
        "import sys; from urbanseg.cli import main; "
        f"rc = main({argv!r}); "
        "print(rc, sorted(m for m in ('torch', 'urbanseg.models', 'urbanseg.checkpoint') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "0 []"
    assert main(["predict", "--checkpoint", str(ckpt), "-i", str(images), "-o", str(tmp_path / "torch")]) == 0
    agree, total = 0, 0
    for k in range(3):
        a = np.asarray(Image.open(tmp_path / "onnx" / f"im{k}_labels.png"))
        b = np.asarray(Image.open(tmp_path / "torch" / f"im{k}_labels.png"))
        agree, total = agree + (a == b).sum(), total + a.size
        assert len(np.unique(b)) >= 3  # a meaningful comparison: several classes predicted
    assert agree / total >= 0.999


def test_split_mode_writes_side_by_side_pictures(tmp_path, ckpt):
    """The original's mode on shards packed from a tiny synthetic dataset."""
    pytest.importorskip("urbanseg.data")
    shards = tiny_shards(tmp_path)
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    make_checkpoint(run / "best.pt")
    (run / "config.yaml").write_text(f"data: {shards}\n")
    assert main(["predict", "--run", str(run), "--split", "val", "--num", "2"]) == 0
    from urbanseg.data.loader import ShardDataset

    names = [ShardDataset(shards, "val")[i]["name"] for i in range(2)]
    pictures = sorted((run / "predict" / "val").glob("*.png"))
    assert [p.name for p in pictures] == sorted(f"{Path(n).stem}.png" for n in names)
    h, w = ShardDataset(shards, "val").spec.height, ShardDataset(shards, "val").spec.width
    picture = np.asarray(Image.open(pictures[0]))
    assert picture.shape[1] == 2 * w + 6 and picture.shape[0] > h


def tiny_shards(tmp_path: Path) -> Path:
    raw, prepared, shards = tmp_path / "raw", tmp_path / "prepared", tmp_path / "shards"
    assert main(["synth", "--out", str(raw), "--train", "1", "--val", "3", "--size", "128x64", "--workers", "1"]) == 0
    assert main(["prepare", "--data", str(raw), "--out", str(prepared), "--size", "64x32", "--workers", "1"]) == 0
    assert main(["pack", "--prepared", str(prepared), "--out", str(shards), "--shards", "1"]) == 0
    return shards

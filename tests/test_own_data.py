"""Your own data, end to end: each layout `urbanseg prepare` reads goes through prepare ->
pack -> train (a few steps) -> evaluate (prepared size and --full-res) -> predict, on
synthetic scenes written in that layout, and is checked against the Cityscapes layout of
the same scenes: paired folders (`synth --layout pairs`), labelme JSON (`synth --layout
labelme`), a Cityscapes dataset with polygons only, KITTI semantics (Cityscapes label ids)
and BDD100K (the 19 training ids), each in that dataset's own file layout (docs/own-data.md)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from urbanseg.cli import main
from urbanseg.labels import get_label_set

pytestmark = pytest.mark.slow
SCENES = ["--train", "3", "--val", "2", "--size", "128x64", "--seed", "1", "--workers", "1"]
TRAIN = [
    "--model",
    "unet-original",
    "--model-args",
    '{"base_channels": 4}',
    "--iters",
    "2",
    "--batch-size",
    "2",
    "--workers",
    "0",
    "--val-every",
    "2",
    "--deterministic",
]


def run(*args: str | Path) -> None:
    assert main([str(a) for a in args]) == 0, args


def prepare(out: Path, *args: str | Path) -> None:
    run("prepare", "--out", out, "--size", "64x32", "--workers", "1", *args)


def files(root: Path, kind: str) -> dict[str, bytes]:
    """{<split>/<stem>: bytes} of a prepared folder's images or labels (whatever the groups)."""
    return {f"{p.parts[-3]}/{p.stem}": p.read_bytes() for p in sorted((root / kind).glob("*/*/*.png"))}


def metrics(run_dir: Path, split: str = "val") -> dict:
    return json.loads((run_dir / "eval" / split / "metrics.json").read_text())


def per_image(run_dir: Path, split: str = "val") -> dict[str, dict]:
    with open(run_dir / "eval" / split / "per_image.csv") as f:
        return {row.pop("name"): row for row in csv.DictReader(f)}


def pipeline(prepared: Path, root: Path, *, full_res: bool = True) -> Path:
    """pack -> train a few steps -> evaluate (both protocols) -> predict; returns the run."""
    shards, run_dir = root / f"{prepared.name}-shards", root / f"{prepared.name}-run"
    run("pack", "--prepared", prepared, "--out", shards, "--shards", "1", "--splits", "train", "val")
    run("train", "--data", shards, "--run", run_dir, *TRAIN)
    run("evaluate", "--run", run_dir, "--gallery", "1")
    assert metrics(run_dir)["protocol"] == "prepared"
    if full_res:
        run("evaluate", "--run", run_dir, "--gallery", "1", "--full-res")
        assert metrics(run_dir)["protocol"] == "full-res"
    run("predict", "--run", run_dir, "--split", "val", "--num", "1")
    assert len(list((run_dir / "predict" / "val").glob("*.png"))) == 1
    return run_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic scenes in Cityscapes layout, prepared with classes19 and with categories8,
    and a classes19 run trained on them: the reference every layout is compared with."""
    root = tmp_path_factory.mktemp("own")
    raw = root / "cityscapes"
    run("synth", "--out", raw, *SCENES)
    for labels in ("classes19", "categories8"):
        prepare(root / f"cs-{labels}", "--data", raw, "--labels", labels, "--splits", "train", "val")
    reference = pipeline(root / "cs-classes19", root)
    return {"root": root, "raw": raw, "run": reference}


def evaluate_with(world: dict, prepared: Path, split: str = "val") -> dict:
    """The reference run evaluated at full resolution on `prepared` (packed here)."""
    shards = prepared.parent / f"{prepared.name}-eval-shards"
    if not shards.exists():
        run("pack", "--prepared", prepared, "--out", shards, "--shards", "1", "--splits", "train", "val")
    run("evaluate", "--run", world["run"], "--data", shards, "--split", split, "--full-res", "--gallery", "0")
    return {"metrics": metrics(world["run"], split), "per_image": per_image(world["run"], split)}


def test_paired_folders_from_synth(world, capsys):
    """`synth --layout pairs` (categories8 class indices) read with prepare's defaults gives
    the Cityscapes layout's categories8 pairs byte for byte; a rerun writes nothing."""
    root = world["root"]
    run("synth", "--out", root / "pairs", "--layout", "pairs", *SCENES)
    prepared = root / "pairs-prepared"
    images, masks = root / "pairs" / "images", root / "pairs" / "masks"
    prepare(prepared, "--images", images, "--masks", masks)
    for kind in ("images", "labels"):
        assert files(prepared, kind) == files(root / "cs-categories8", kind)
    capsys.readouterr()
    prepare(prepared, "--images", images, "--masks", masks)
    assert "(0 written, 5 up to date)" in capsys.readouterr().out
    run_dir = pipeline(prepared, root)
    assert metrics(run_dir)["official"] is None  # class indices: no Cityscapes ids to score officially
    image = next(images.glob("val/*/*.png"))
    run("predict", "--run", run_dir, "--input", image, "--out", root / "pairs-predict")
    assert (root / "pairs-predict" / f"{image.stem}_overlay.png").is_file()


def test_labelme_from_synth(world):
    """`synth --layout labelme` read with --source labelme gives the Cityscapes layout's
    classes19 labels byte for byte, and the same full-resolution scores (no official ones:
    labelme names need not be Cityscapes labels)."""
    root = world["root"]
    run("synth", "--out", root / "labelme", "--layout", "labelme", *SCENES)
    prepared = root / "labelme-prepared"
    prepare(prepared, "--images", root / "labelme" / "images", "--source", "labelme", "--labels", "classes19")
    for kind in ("images", "labels"):
        assert files(prepared, kind) == files(root / "cs-classes19", kind)
    ours, reference = evaluate_with(world, prepared), evaluate_with(world, root / "cs-classes19")
    assert ours["metrics"]["metrics"] == reference["metrics"]["metrics"]
    assert ours["metrics"]["official"] is None and reference["metrics"]["official"] is not None
    pipeline(prepared, root)


def test_cityscapes_polygons_only(world):
    """A Cityscapes-layout dataset with *_gtFine_polygons.json and nothing else: the same
    labels as from *_labelIds.png, and --full-res gives the same official scores, iIoU
    included (the polygons give the instance ids too)."""
    root = world["root"]
    raw = Path(shutil.copytree(world["raw"], root / "polygons-only"))
    for kind in ("labelIds", "color", "instanceIds"):
        for p in raw.glob(f"gtFine/*/*/*_gtFine_{kind}.png"):
            p.unlink()
    prepared = root / "polygons-prepared"
    prepare(prepared, "--data", raw, "--source", "polygons", "--labels", "classes19", "--splits", "train", "val")
    for kind in ("images", "labels"):
        assert files(prepared, kind) == files(root / "cs-classes19", kind)
    ours, reference = evaluate_with(world, prepared), evaluate_with(world, root / "cs-classes19")
    assert ours["metrics"]["metrics"] == reference["metrics"]["metrics"]
    official = ours["metrics"]["official"]
    assert official == reference["metrics"]["official"] and official["mean_class_iiou"] is not None
    pipeline(prepared, root)


def kitti(world: dict) -> tuple[Path, dict[str, str]]:
    """data_semantics/ as KITTI ships it: training/image_2 + semantic (Cityscapes label
    ids) + semantic_rgb, testing/image_2; names <seq>_10.png. Returns (the folder, the
    KITTI name -> Cityscapes stem of each scene)."""
    root = world["root"] / "data_semantics"
    names = {}
    for k, image in enumerate(sorted(world["raw"].glob("leftImg8bit/*/*/*_leftImg8bit.png"))):
        stem = image.name[: -len("_leftImg8bit.png")]
        gt = world["raw"] / "gtFine" / image.parts[-3] / image.parts[-2] / stem
        name = f"{k:06d}_10"
        names[name] = stem
        for folder, source in (("image_2", image), ("semantic", f"{gt}_gtFine_labelIds.png")):
            (root / "training" / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / "training" / folder / f"{name}.png")
        (root / "training" / "semantic_rgb").mkdir(exist_ok=True)
        Image.open(f"{gt}_gtFine_color.png").convert("RGB").save(root / "training" / "semantic_rgb" / f"{name}.png")
    (root / "testing" / "image_2").mkdir(parents=True)
    shutil.copy(image, root / "testing" / "image_2" / "000000_10.png")
    return root, names


def test_kitti_semantics_recipe(world):
    """The KITTI recipe of docs/own-data.md: Cityscapes label ids, a seeded val split.
    Every image's full-resolution scores equal those of the same scene in Cityscapes
    layout, and the official class and category scores apply (iIoU n/a: no instances)."""
    root = world["root"]
    data, names = kitti(world)
    prepared = root / "kitti-prepared"
    prepare(
        prepared,
        "--images",
        data / "training" / "image_2",
        "--masks",
        data / "training" / "semantic",
        "--source",
        "labelIds",
        "--labels",
        "classes19",
        "--val-fraction",
        "0.4",
    )
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 3, "val": 2}
    reference = {}
    for split in ("train", "val"):
        reference.update(evaluate_with(world, root / "cs-classes19", split)["per_image"])
    for split in ("train", "val"):
        ours = evaluate_with(world, prepared, split)
        assert ours["per_image"] and all(row == reference[names[n]] for n, row in ours["per_image"].items())
        official = ours["metrics"]["official"]
        assert official["class_iou"] and official["category_iou"] and official["mean_category_iou"] is not None
        assert official["mean_class_iiou"] is None and set(official["class_iiou"].values()) == {None}
    run_dir = pipeline(prepared, root)
    run("predict", "--run", run_dir, "--input", data / "testing" / "image_2", "--cityscapes-ids", "--out", root / "kp")
    assert (root / "kp" / "000000_10_labelIds.png").is_file()


def test_colour_masks_with_a_label_map(world):
    """Paired folders of RGB colour masks (Cityscapes' *_color.png, any name) read with a
    labelmap.json of the categories8 colours: the categories8 labels byte for byte."""
    root = world["root"]
    ls = get_label_set("categories8")
    labelmap = {
        name: {"id": k, "colors": [list(c) for c, kk in ls.color_to_class if kk == k]}
        for k, name in enumerate(ls.classes)
    }
    (root / "colours.json").write_text(json.dumps(labelmap))
    for image in sorted(world["raw"].glob("leftImg8bit/*/*/*_leftImg8bit.png")):
        split, stem = image.parts[-3], image.name[: -len("_leftImg8bit.png")]
        for folder in ("photos", "painted"):
            (root / "colour" / folder / split).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, root / "colour" / "photos" / split / f"{stem}.png")
        color = world["raw"] / "gtFine" / split / image.parts[-2] / f"{stem}_gtFine_color.png"
        shutil.copy(color, root / "colour" / "painted" / split / f"{stem}_mask.png")
    prepared = root / "colour-prepared"
    images, masks = root / "colour" / "photos", root / "colour" / "painted"
    args = ["--source", "color", "--labels", root / "colours.json", "--mask-suffix", "_mask.png"]
    prepare(prepared, "--images", images, "--masks", masks, *args)
    assert files(prepared, "labels") == files(root / "cs-categories8", "labels")
    pipeline(prepared, root)


def bdd100k(world: dict, masks: str) -> Path:
    """bdd100k/ as its 10k images and semantic masks unzip: images/10k/{train,val,test}/*.jpg
    and labels/sem_seg/masks/{train,val}/*.png of the 19 training ids (255 ignore); with
    masks="labelIds", the same JPEGs with Cityscapes label-id masks instead (the reference)."""
    root = world["root"] / f"bdd100k-{masks}"
    classes19 = get_label_set("classes19")
    for image in sorted(world["raw"].glob("leftImg8bit/*/*/*_leftImg8bit.png")):
        split, stem = image.parts[-3], image.name[: -len("_leftImg8bit.png")]
        ids = np.asarray(Image.open(world["raw"] / "gtFine" / split / image.parts[-2] / f"{stem}_gtFine_labelIds.png"))
        values = classes19.labels_from_ids(ids) if masks == "trainIds" else ids  # classes19 indices are trainIds
        for path, array in (
            (root / "images" / "10k" / split / f"{stem}.jpg", np.asarray(Image.open(image))),
            (root / "labels" / "sem_seg" / "masks" / split / f"{stem}.png", values),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    test = root / "images" / "10k" / "test" / "t.jpg"  # the test split has images only
    test.parent.mkdir()
    Image.open(image).save(test, quality=90)
    return root


def test_bdd100k_recipe(world):
    """The BDD100K recipe of docs/own-data.md: training-id masks in its own layout (its
    test images, without masks, left out by --splits). Its official class and category
    scores equal those computed from Cityscapes label ids of the same scenes and JPEGs."""
    root = world["root"]
    prepared = {}
    for masks in ("trainIds", "labelIds"):
        data = bdd100k(world, masks)
        prepared[masks] = root / f"bdd-{masks}-prepared"
        prepare(
            prepared[masks],
            "--images",
            data / "images" / "10k",
            "--masks",
            data / "labels" / "sem_seg" / "masks",
            "--source",
            masks,
            "--labels",
            "classes19",
            "--splits",
            "train",
            "val",
        )
    assert files(prepared["trainIds"], "labels") == files(prepared["labelIds"], "labels")
    ours, reference = evaluate_with(world, prepared["trainIds"]), evaluate_with(world, prepared["labelIds"])
    assert ours["metrics"]["metrics"] == reference["metrics"]["metrics"]
    for key in ("class_iou", "mean_class_iou", "category_iou", "mean_category_iou"):
        assert ours["metrics"]["official"][key] == reference["metrics"]["official"][key], key
    assert ours["metrics"]["official"]["mean_category_iou"] is not None
    pipeline(prepared["trainIds"], root)


def test_errors_name_the_file_and_write_nothing(world, capsys):
    """Unknown values and size mismatches in paired folders: exit 2 before anything is
    written, naming the file and the fix."""
    root = world["root"]
    run("synth", "--out", root / "bad", "--layout", "pairs", *SCENES)
    images, masks = root / "bad" / "images", root / "bad" / "masks"
    mask = sorted(masks.glob("train/*/*.png"))[0]
    Image.fromarray(np.full((64, 128), 9, np.uint8)).save(mask)
    out = root / "bad-prepared"
    args = ["prepare", "--images", str(images), "--masks", str(masks), "--out", str(out), "--workers", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{mask}: values [9] are not class indices of label set 'categories8'" in err and "Traceback" not in err
    assert "1 of 5 pairs cannot be prepared" in err and not (out / "manifest.json").exists()
    assert not (out / "labels" / "train" / mask.parent.name / mask.name).exists()  # the other pairs are kept
    assert len(list(out.rglob("*.png"))) == 8
    Image.fromarray(np.zeros((32, 128), np.uint8)).save(mask)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"is 128x64 but {mask} is 128x32" in err and "found before writing: nothing was written" in err


def test_synth_layouts_do_not_mix(tmp_path, capsys):
    """A synth folder of one layout is not completed in another; the same flags complete it."""
    out = tmp_path / "scenes"
    run("synth", "--out", out, "--layout", "labelme", *SCENES)
    assert main(["synth", "--out", str(out), *SCENES]) == 2
    assert "--layout labelme, not" in capsys.readouterr().err
    doc = json.loads(next(out.glob("images/train/*/*.json")).read_text())
    assert doc["imagePath"].endswith(".png") and doc["shapes"][0]["shape_type"] == "polygon"
    before = {p: p.stat().st_mtime_ns for p in out.glob("images/*/*/*")}
    assert len(before) == 10  # 5 photos and their JSON
    run("synth", "--out", out, "--layout", "labelme", *SCENES)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # identical files are not rewritten

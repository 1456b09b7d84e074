"""Finding pairs in paired folders (`urbanseg.data.sources`): matching by stem at any
depth with configurable endings, the splits (sub-folders, list files, --splits NAME,
--val-fraction), and every pairing problem as one clear error (exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from urbanseg.cli import main
from urbanseg.config import PrepareConfig
from urbanseg.data.sources import find
from urbanseg.errors import UserError

SIZE = (16, 16)


def put(path: Path, kind: str = "image", value: int = 1, size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "image":
        Image.fromarray(np.full((size[1], size[0], 3), 40 * value % 256, np.uint8)).save(path)
    else:
        Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(path)
    return path


def dataset(root: Path, names: dict[str, str], image_ext: str = ".png", mask_ext: str = ".png") -> tuple[Path, Path]:
    """images/<rel><image_ext> and masks/<rel><mask_ext> for each rel -> mask rel."""
    for rel, mask_rel in names.items():
        put(root / "images" / f"{rel}{image_ext}")
        put(root / "masks" / f"{mask_rel}{mask_ext}", "mask", value=len(rel) % 8)
    return root / "images", root / "masks"


def prepare(images: Path, out: Path, *args: str, masks: Path | None = None) -> int:
    flags = ["--masks", str(masks)] if masks is not None else []
    return main(
        ["prepare", "--images", str(images), *flags, "--out", str(out), "--workers", "1", "--size", "8x8", *args]
    )


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def err(capsys) -> str:
    text = capsys.readouterr().err
    assert "Traceback" not in text
    return text


def test_split_folders_any_depth_and_groups(tmp_path):
    """train/ and validation/ (another dataset's name for val) give the splits; images and
    masks pair by stem whatever their sub-folders; the group is the first folder below the
    split; a JPEG photo pairs with a PNG mask."""
    images, masks = dataset(
        tmp_path,
        {
            "train/a/deep/x1": "train/x1",
            "train/a/x2": "train/elsewhere/x2",
            "train/x3": "train/x3",
            "validation/b/y1": "validation/b/y1",
        },
        image_ext=".jpg",
    )
    out = tmp_path / "out"
    assert prepare(images, out, masks=masks) == 0
    m = manifest(out)
    assert m["layout"] == "pairs" and m["masks"] == str(masks.resolve()) and m["data"] == str(images.resolve())
    assert m["splits"]["train"]["files"] == ["a/x1", "a/x2", "all/x3"]
    assert m["splits"]["train"]["annotations"] == ["train/x1.png", "train/elsewhere/x2.png", "train/x3.png"]
    assert m["splits"]["val"]["files"] == ["b/y1"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == sorted(
        f"{kind}/{split}/{f}.png"
        for kind in ("images", "labels")
        for split, f in [("train", "a/x1"), ("train", "a/x2"), ("train", "all/x3"), ("val", "b/y1")]
    )


def test_same_stem_in_two_splits_pairs_within_its_split(tmp_path):
    images, masks = dataset(tmp_path, {"train/x": "train/x", "val/x": "val/x"})
    assert prepare(images, tmp_path / "out", masks=masks) == 0
    assert {s: e["stems"] for s, e in manifest(tmp_path / "out")["splits"].items()} == {"train": ["x"], "val": ["x"]}


def test_suffixes_and_one_folder_for_both(tmp_path):
    """Cityscapes-style endings as --image-suffix / --mask-suffix, images and masks side by side."""
    folder = tmp_path / "all"
    for stem in ("aachen_000000_000019", "bremen_000001_000019"):
        put(folder / "train" / f"{stem}_leftImg8bit.png")
        put(folder / "train" / f"{stem}_gtFine_labelIds.png", "mask", 7)
        put(folder / "train" / f"{stem}_gtFine_color.png")  # neither: left alone
        put(folder / "val" / f"{stem}_leftImg8bit.png")
        put(folder / "val" / f"{stem}_gtFine_labelIds.png", "mask", 26)
    args = ["--image-suffix", "_leftImg8bit.png", "--mask-suffix", "_gtFine_labelIds.png", "--source", "labelIds"]
    assert prepare(folder, tmp_path / "out", *args) == 0
    m = manifest(tmp_path / "out")
    assert m["splits"]["train"]["stems"] == ["aachen_000000_000019", "bremen_000001_000019"]
    assert m["splits"]["train"]["pixel_counts"][1] == 2 * 8 * 8  # id 7 road -> flat
    assert m["splits"]["val"]["pixel_counts"][7] == 2 * 8 * 8  # id 26 car -> vehicle


def test_same_folder_and_same_ending_is_refused(tmp_path, capsys):
    images, _ = dataset(tmp_path, {"train/x": "train/x"})
    assert prepare(images, tmp_path / "out") == 2
    assert "--images and --masks are the same folder and .png files would be both" in err(capsys)
    assert not (tmp_path / "out").exists()


def test_split_files_text_and_yaml(tmp_path, capsys):
    images, masks = dataset(tmp_path, {f"s{i}": f"m/s{i}" for i in range(5)})
    (tmp_path / "train.txt").write_text("# my split\ns0\nimages/s1.png  masks/m/s1.png\n\ns2.png\n")
    (tmp_path / "val.txt").write_text("s3\n")
    out = tmp_path / "out"
    assert (
        prepare(images, out, "--split-file", str(tmp_path / "train.txt"), str(tmp_path / "val.txt"), masks=masks) == 0
    )
    assert "1 pairs are in no --split-file and are left out" in err(capsys)
    assert {s: e["stems"] for s, e in manifest(out)["splits"].items()} == {"train": ["s0", "s1", "s2"], "val": ["s3"]}
    (tmp_path / "splits.yaml").write_text("train: [s0, s1]\nval: [s2]\ntest: [s3, s4]\n")
    assert prepare(images, tmp_path / "out2", "--split-file", str(tmp_path / "splits.yaml"), masks=masks) == 0
    assert manifest(tmp_path / "out2")["splits"]["test"]["stems"] == ["s3", "s4"]


def test_split_file_problems(tmp_path, capsys):
    images, masks = dataset(tmp_path, {f"s{i}": f"s{i}" for i in range(3)})
    (tmp_path / "train.txt").write_text("s0\ns1\nnope\n")
    (tmp_path / "val.txt").write_text("s1\n")
    assert (
        prepare(
            images,
            tmp_path / "out",
            "--split-file",
            str(tmp_path / "train.txt"),
            str(tmp_path / "val.txt"),
            masks=masks,
        )
        == 2
    )
    text = err(capsys)
    assert "'s1' is listed in two splits (train, val)" in text
    assert "1 names listed for split 'train' have no image/annotation pair (e.g. nope)" in text
    (tmp_path / "bad.json").write_text('{"train": "s0"}')
    assert prepare(images, tmp_path / "out", "--split-file", str(tmp_path / "bad.json"), masks=masks) == 2
    assert "expected a mapping of split -> list of names" in err(capsys)
    assert not (tmp_path / "out").exists()


def _val_stems(images: Path, masks: Path, out: Path, fraction: float, seed: int = 0) -> set[str]:
    config = PrepareConfig(out=out, images=images, masks=masks, val_fraction=fraction, seed=seed)
    found = find(config, out, {})
    assert set(found.splits) == {"train", "val"}
    return {p.stem for p in found.splits["val"]}


def test_val_fraction_is_seeded_exact_and_stable(tmp_path):
    images, masks = dataset(tmp_path, {f"img{i:03d}": f"img{i:03d}" for i in range(40)})
    val = _val_stems(images, masks, tmp_path / "o", 0.25)
    assert len(val) == 10 and val == _val_stems(images, masks, tmp_path / "o", 0.25)
    assert val != _val_stems(images, masks, tmp_path / "o", 0.25, seed=1)
    for i in range(40, 44):  # new files move at most as many old ones as they add to val
        put(images / f"img{i:03d}.png")
        put(masks / f"img{i:03d}.png", "mask")
    grown = _val_stems(images, masks, tmp_path / "o", 0.25)
    assert len(grown) == 11 and len(val - grown) <= 1


def test_flat_folder_needs_a_split_rule(tmp_path, capsys):
    images, masks = dataset(tmp_path, {"a": "a", "b": "b", "c": "c"})
    assert prepare(images, tmp_path / "out", masks=masks) == 2
    assert "has no split sub-folders (train/, val/, test/)" in err(capsys) and not (tmp_path / "out").exists()
    assert prepare(images, tmp_path / "out", "--splits", "test", masks=masks) == 0
    assert manifest(tmp_path / "out")["splits"]["test"]["count"] == 3
    assert prepare(images, tmp_path / "o2", "--val-fraction", "0.3", "--splits", "train", "test", masks=masks) == 2
    assert "--splits must include train and val" in err(capsys)


def test_val_fraction_with_a_val_folder_is_refused(tmp_path, capsys):
    images, masks = dataset(tmp_path, {"train/a": "train/a", "train/b": "train/b", "val/c": "val/c"})
    assert prepare(images, tmp_path / "out", "--val-fraction", "0.5", masks=masks) == 2
    assert "split 'val' already has pairs" in err(capsys)


def test_pairing_problems_are_listed_together(tmp_path, capsys):
    images, masks = dataset(
        tmp_path, {"train/a": "train/a", "train/b": "x/b", "train/sub/a": "train/c", "d": "train/d"}
    )
    put(masks / "train" / "orphan.png", "mask")
    assert prepare(images, tmp_path / "out", masks=masks) == 2
    text = err(capsys)
    assert (
        "stem 'a' is in --images twice (train/a.png, train/sub/a.png); stems must be unique within split 'train'"
        in text
    )
    assert (
        "images have no annotation <stem>.png in --masks" in text
        and "add them, or set the annotation ending with --mask-suffix" in text
    )
    assert "annotations have no image of the same stem" in text and "train/orphan.png" in text
    assert not (tmp_path / "out").exists()


def test_images_outside_the_split_folders(tmp_path, capsys):
    images, masks = dataset(tmp_path, {"train/a": "a", "val/b": "b", "c": "c"})
    assert prepare(images, tmp_path / "out", masks=masks) == 2
    assert "1 images are outside the split folders (train, val/) of --images" in err(capsys)


def test_splits_not_asked_for_are_left_out(tmp_path, capsys):
    """BDD100K's test images have no masks: --splits train val leaves them alone."""
    images, masks = dataset(tmp_path, {"train/a": "train/a", "val/b": "val/b"})
    put(images / "test" / "t.png")
    assert prepare(images, tmp_path / "out", "--splits", "train", "val", masks=masks) == 0
    assert set(manifest(tmp_path / "out")["splits"]) == {"train", "val"}


def test_out_inside_images_is_not_read_back(tmp_path, capsys):
    images, masks = dataset(tmp_path, {"train/a": "train/a", "val/b": "val/b"})
    out = images / "prepared"
    assert prepare(images, out, masks=masks) == 0
    assert prepare(images, out, masks=masks) == 0
    assert "(0 written, 2 up to date)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data", "x", "--images", "y"], "give --data DIR (a Cityscapes-layout dataset) or --images DIR"),
        (["--data", "x", "--val-fraction", "0.1"], "--val-fraction applies to paired folders"),
        (["--data", "x", "--source", "indices"], "--source indices reads paired folders"),
        (["--images", "y", "--val-fraction", "1.5"], "--val-fraction 1.5 must be in [0, 1)"),
        (["--images", "y", "--mask-suffix", "a/b.png"], "suffix 'a/b.png' must be the end of a file name"),
        (["--images", "y", "--split-file", "a.yaml", "b.txt"], "a .json/.yaml file names every split; give it alone"),
        (["--images", "nope"], "--images nope is not a folder"),
    ],
)
def test_bad_flags(tmp_path, capsys, args, needle):
    assert main(["prepare", "--out", str(tmp_path / "out"), *args]) == 2
    assert needle in err(capsys)
    assert not (tmp_path / "out").exists()


def test_colour_only_label_set_with_id_masks_is_refused(tmp_path, capsys):
    images, masks = dataset(tmp_path, {"train/a": "train/a"})
    (tmp_path / "map.json").write_text(json.dumps({"thing": {"id": 0, "colors": [[1, 2, 3]]}}))
    assert (
        prepare(images, tmp_path / "out", "--labels", str(tmp_path / "map.json"), "--source", "trainIds", masks=masks)
        == 2
    )
    assert "defines colours only, not Cityscapes training ids: read colour masks with --source color" in err(capsys)


def test_found_requires_nothing_but_the_folders(tmp_path):
    """find() on its own (what prepare calls first) raises UserError, never writes."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "masks").mkdir()
    config = PrepareConfig(out=tmp_path / "o", images=tmp_path / "empty", masks=tmp_path / "masks", val_fraction=0.5)
    with pytest.raises(UserError, match="holds no image files"):
        find(config, tmp_path / "o", {})
    assert not (tmp_path / "o").exists()


def pngs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_reruns_redo_what_changed_and_move_pairs_between_splits(tmp_path, capsys):
    images, masks = dataset(tmp_path, {f"s{i}": f"s{i}" for i in range(6)})
    out = tmp_path / "out"
    assert prepare(images, out, "--val-fraction", "0.5", masks=masks) == 0
    assert "(6 written, 0 up to date)" in capsys.readouterr().out
    mask = masks / "s0.png"
    put(mask, "mask", 3)  # an edited annotation: only its pair is redone
    assert prepare(images, out, "--val-fraction", "0.5", masks=masks) == 0
    assert "(1 written, 5 up to date)" in capsys.readouterr().out
    (images / "s1.png").unlink()
    (masks / "s1.png").unlink()
    assert prepare(images, out, "--val-fraction", "0.34", masks=masks) == 0  # other splits: pairs move
    m = manifest(out)
    stems = {s: set(e["stems"]) for s, e in m["splits"].items()}
    assert stems["train"] | stems["val"] == {"s0", "s2", "s3", "s4", "s5"} and len(stems["val"]) == 2
    on_disk = {(p.parts[-3], p.stem) for p in (out / "labels").rglob("*.png")}
    assert on_disk == {(s, stem) for s, names in stems.items() for stem in names}  # no stale pair left


def test_other_layout_in_the_same_out_is_refused(tmp_path, capsys):
    images, masks = dataset(tmp_path, {"train/a": "train/a", "val/b": "val/b"})
    out = tmp_path / "out"
    assert prepare(images, out, masks=masks) == 0
    other = dataset(tmp_path / "other", {"train/a": "train/a", "val/b": "val/b"})
    assert prepare(other[0], out, masks=other[1]) == 2
    assert f"--images {images.resolve()} (now {other[0].resolve()})" in err(capsys)
    assert prepare(images, out, "--source", "labelIds", masks=masks) == 2
    assert "--source indices (now labelIds)" in err(capsys)
    assert prepare(images, out, "--source", "labelIds", "--overwrite", masks=masks) == 0


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    images, masks = dataset(tmp_path, {f"train/s{i}": f"train/s{i}" for i in range(3)} | {"val/v": "val/v"})
    assert prepare(images, tmp_path / "straight", masks=masks) == 0
    real_save, calls = Image.Image.save, []

    def save_then_die(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    out = tmp_path / "resumed"
    assert prepare(images, out, masks=masks) == 130
    assert not (out / "manifest.json").exists() and 0 < len(pngs(out)) < 8
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert prepare(images, out, masks=masks) == 0
    assert pngs(out) == pngs(tmp_path / "straight")
    assert (out / "manifest.json").read_text() == (tmp_path / "straight" / "manifest.json").read_text()


def test_labelme_notes_are_printed(tmp_path, capsys):
    folder = tmp_path / "lm"
    for split in ("train", "val"):
        put(folder / split / "a.jpg")
        doc = {
            "imageWidth": SIZE[0],
            "imageHeight": SIZE[1],
            "flags": {"blurry": split == "val"},
            "shapes": [
                {"label": "road", "points": [[0, 8], [15, 8], [15, 15], [0, 15]], "shape_type": "polygon"},
                {"label": "pole", "points": [[3, 0], [3, 9]], "shape_type": "linestrip"},
            ],
        }
        (folder / split / "a.json").write_text(json.dumps(doc))
    assert prepare(folder, tmp_path / "out", "--source", "labelme") == 0
    text = err(capsys)
    assert "note: 3 things in the annotations are not drawn" in text
    assert "val/a.json: image flags ['blurry'] set" in text and "a linestrip shape 'pole' has no area" in text

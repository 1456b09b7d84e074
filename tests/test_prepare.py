import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers.cityscapes import render
from helpers.worlds import RAW_CITYSCAPES_SIZE, writable_copy
from urbanseg import labels as L
from urbanseg.cli import main
from urbanseg.imaging import resize_labels
from urbanseg.outputs import LOCK

RAW_SIZE = RAW_CITYSCAPES_SIZE  # of the shared `raw_cityscapes` scenes (tests/conftest.py)


@pytest.fixture
def raw(raw_cityscapes, tmp_path):
    """A private copy each test may damage."""
    return writable_copy(raw_cityscapes, tmp_path / "raw")


def prepare(data, out, *args):
    return main(["prepare", "--data", str(data), "--out", str(out), "--workers", "1", *args])


def pngs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def mtimes(root: Path) -> dict[str, int]:
    """Every file's mtime but the lock's (each run records its PID there)."""
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def raw_pairs(data: Path):
    """(split, city, stem, image path, labelIds path, color path) of a raw dataset."""
    for image in sorted((data / "leftImg8bit").glob("*/*/*_leftImg8bit.png")):
        split, city, stem = image.parts[-3], image.parts[-2], image.name[: -len("_leftImg8bit.png")]
        gt = data / "gtFine" / split / city
        yield split, city, stem, image, gt / f"{stem}_gtFine_labelIds.png", gt / f"{stem}_gtFine_color.png"


def official_lut(name: str) -> np.ndarray:
    """Label id -> class from cityscapesScripts' own table (the reference, not ours)."""
    official = pytest.importorskip("cityscapesscripts.helpers.labels")
    lut = np.full(256, 254, np.uint8)
    for label in official.labels:
        if name == "categories8":
            lut[label.id & 0xFF] = label.categoryId
        elif name == "categories7":
            lut[label.id & 0xFF] = 255 if label.ignoreInEval else label.categoryId - 1
        else:
            lut[label.id & 0xFF] = 255 if label.trainId in (-1, 255) else label.trainId
    return lut


def assert_no_temp_files(root: Path):
    assert not [p for p in root.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


# --------------------------------------------------------------------------- outputs


def test_layout_dtypes_and_manifest(raw, tmp_path):
    out = tmp_path / "out"
    assert prepare(raw, out, "--size", "32x16") == 0
    expected = set()
    for split, city, stem, *_ in raw_pairs(raw):
        for kind in ("images", "labels"):
            expected.add(f"{kind}/{split}/{city}/{stem}.png")
        image = Image.open(out / "images" / split / city / f"{stem}.png")
        label = Image.open(out / "labels" / split / city / f"{stem}.png")
        assert (image.mode, image.size, label.mode, label.size) == ("RGB", (32, 16), "L", (32, 16))
        assert np.asarray(label).dtype == np.uint8 and np.asarray(label).max() < 8
    assert set(pngs(out)) == expected
    assert_no_temp_files(out)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["label_set"] == L.get_label_set("categories8").to_dict()
    assert manifest["size"] == [32, 16] and manifest["source"] == "labelIds"
    assert manifest["data"] == str(raw.resolve())
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 4, "val": 2, "test": 2}
    for split, entry in manifest["splits"].items():
        assert entry["stems"] == [Path(f).name for f in entry["files"]]
        assert sum(entry["pixel_counts"]) + entry["ignored_pixels"] == 32 * 16 * entry["count"]
        counts = sum(
            np.bincount(np.asarray(Image.open(out / "labels" / split / f"{f}.png")).ravel(), minlength=256)
            for f in entry["files"]
        )
        assert entry["pixel_counts"] == counts[:8].tolist()
    config = yaml.safe_load((out / "prepare_config.yaml").read_text())
    assert config["size"] == "32x16" and config["labels"] == "categories8" and config["data"] == str(raw)


@pytest.mark.parametrize("name", ["categories8", "categories7", "classes19"])
@pytest.mark.parametrize("size", [(32, 16), (24, 13)])
def test_labels_equal_official_table_after_pil_nearest(raw_cityscapes, tmp_path, name, size):
    """Reference: PIL's nearest-neighbour resize of the label ids, then cityscapesScripts'
    table. A non-integer scale (24x13) checks the sampling positions too."""
    out, lut = tmp_path / "out", official_lut(name)
    assert prepare(raw_cityscapes, out, "--labels", name, "--size", f"{size[0]}x{size[1]}") == 0
    for split, city, stem, _, ids_path, _ in raw_pairs(raw_cityscapes):
        ids = Image.open(ids_path)
        expected = lut[np.asarray(ids.resize(size, Image.NEAREST))]
        got = np.asarray(Image.open(out / "labels" / split / city / f"{stem}.png"))
        np.testing.assert_array_equal(got, expected)
        assert set(np.unique(got)) <= set(np.unique(lut[np.asarray(ids)]))  # no value invented


def test_nearest_resize_commutes_with_the_lookup():
    rng = np.random.default_rng(0)
    lut = L.get_label_set("classes19").id_lut()
    ids = rng.choice([l.id for l in L.LABELS if l.id >= 0], (37, 71)).astype(np.uint8)
    for size in [(17, 9), (71, 37), (140, 80), (30, 50)]:
        np.testing.assert_array_equal(resize_labels(lut[ids], size), lut[resize_labels(ids, size)])


def _single_pair(root: Path, image: np.ndarray, ids: np.ndarray, color: np.ndarray | None = None):
    stem = "aachen_000000_000019"
    (root / "leftImg8bit/train/aachen").mkdir(parents=True)
    (root / "gtFine/train/aachen").mkdir(parents=True)
    Image.fromarray(image).save(root / f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png")
    Image.fromarray(ids).save(root / f"gtFine/train/aachen/{stem}_gtFine_labelIds.png")
    if color is not None:
        Image.fromarray(color).save(root / f"gtFine/train/aachen/{stem}_gtFine_color.png")
    return stem


def test_images_are_antialiased(tmp_path):
    """A 1-pixel checkerboard shrunk 4x is flat grey (nearest sampling would keep 0/255),
    and a random image shrunk 4x is the mean of each 4x4 block."""
    h, w = 32, 64
    checker = ((np.indices((h, w)).sum(0) % 2) * 255).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = np.concatenate([np.repeat(checker[..., None], 3, 2), noise], axis=1)  # (32, 128, 3)
    _single_pair(tmp_path / "raw", image, np.full((h, 2 * w), 7, np.uint8))
    assert prepare(tmp_path / "raw", tmp_path / "out", "--size", "32x8") == 0
    small = np.asarray(Image.open(tmp_path / "out/images/train/aachen/aachen_000000_000019.png")).astype(int)
    assert np.abs(small[:, :16] - 127.5).max() <= 1
    block_mean = noise.reshape(8, 4, 16, 4, 3).mean(axis=(1, 3))
    assert np.abs(small[:, 16:] - block_mean).max() <= 1


@pytest.mark.parametrize("name", ["categories8", "categories7", "classes19"])
def test_color_source_equals_label_ids(raw_cityscapes, tmp_path, name):
    """On colour images drawn like Cityscapes' (official renderer and colours), the colour
    path equals the id path; for sets that split pole and polegroup, polegroup pixels read
    as pole (they share a colour) and nothing else differs."""
    a, b = tmp_path / "ids", tmp_path / "color"
    assert prepare(raw_cityscapes, a, "--labels", name, "--size", "32x16") == 0
    assert prepare(raw_cityscapes, b, "--labels", name, "--size", "32x16", "--source", "color") == 0
    images = {k: v for k, v in pngs(a).items() if k.startswith("images")}
    assert images == {k: v for k, v in pngs(b).items() if k.startswith("images")}
    ls, polegroup_pixels = L.get_label_set(name), 0
    for split, city, stem, _, ids_path, _ in raw_pairs(raw_cityscapes):
        rel = f"labels/{split}/{city}/{stem}.png"
        from_ids, from_colors = (np.asarray(Image.open(root / rel)) for root in (a, b))
        polegroup = np.asarray(Image.open(ids_path).resize((32, 16), Image.NEAREST)) == 18
        polegroup_pixels += polegroup.sum()
        if name == "categories8":
            np.testing.assert_array_equal(from_ids, from_colors)
        else:
            np.testing.assert_array_equal(from_ids[~polegroup], from_colors[~polegroup])
            assert (from_ids[polegroup] == 255).all()
            assert (from_colors[polegroup] == ls.id_to_class[17]).all()  # pole's class
    assert polegroup_pixels > 0  # the fixture must exercise the shared colour


def test_custom_labelmap_needs_color_source(raw_cityscapes, tmp_path, capsys):
    """The original project's labelmap.json (categories by colour) reproduces categories8."""
    colours: dict[str, list] = {}
    for label in L.LABELS:
        if label.id >= 0 and list(label.color) not in colours.setdefault(label.category, []):
            colours[label.category].append(list(label.color))
    labelmap = {c: {"id": L.CATEGORIES.index(c), "colors": colours[c]} for c in L.CATEGORIES}
    (tmp_path / "labelmap.json").write_text(json.dumps(labelmap))
    args = ["--labels", str(tmp_path / "labelmap.json"), "--size", "32x16"]
    assert prepare(raw_cityscapes, tmp_path / "custom", *args) == 2
    assert "--source color" in capsys.readouterr().err and not (tmp_path / "custom").exists()
    assert prepare(raw_cityscapes, tmp_path / "custom", *args, "--source", "color") == 0
    assert prepare(raw_cityscapes, tmp_path / "builtin", "--size", "32x16") == 0
    labels = {k: v for k, v in pngs(tmp_path / "builtin").items() if k.startswith("labels")}
    assert labels == {k: v for k, v in pngs(tmp_path / "custom").items() if k.startswith("labels")}


def test_test_split_of_void_is_prepared(raw_cityscapes, tmp_path):
    for name, key in (("categories8", "pixel_counts"), ("classes19", "ignored_pixels")):
        assert prepare(raw_cityscapes, tmp_path / name, "--labels", name, "--size", "32x16", "--splits", "test") == 0
        entry = json.loads((tmp_path / name / "manifest.json").read_text())["splits"]["test"]
        total = 32 * 16 * entry["count"]
        assert entry["count"] == 2
        assert (entry[key][0] if key == "pixel_counts" else entry[key]) == total


def test_workers_and_console_script_give_identical_bytes(raw_cityscapes, tmp_path):
    assert prepare(raw_cityscapes, tmp_path / "one", "--size", "32x16") == 0
    cmd = [
        sys.executable,
        "-m",
        "urbanseg",
        "prepare",
        "--data",
        str(raw_cityscapes),
        "--out",
        str(tmp_path / "two"),
        "--size",
        "32x16",
        "--workers",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "prepared 8 pairs" in done.stdout
    assert pngs(tmp_path / "one") == pngs(tmp_path / "two")
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two")]
    assert manifests[0] == manifests[1]


# --------------------------------------------------------------------------- re-runs


def test_rerun_skips_up_to_date_and_redoes_changed(raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare(raw, out, "--size", "32x16") == 0
    before = mtimes(out)
    assert prepare(raw, out, "--size", "32x16") == 0
    assert mtimes(out) == before and "(0 written, 8 up to date)" in capsys.readouterr().out

    split, city, stem, image, ids, _ = next(raw_pairs(raw))
    later = before[f"labels/{split}/{city}/{stem}.png"] + 10**9
    os.utime(ids, ns=(later, later))  # an edited annotation
    (out / "labels/val/aachen/aachen_000000_000019.png").write_bytes(b"garbage")  # a damaged output
    assert prepare(raw, out, "--size", "32x16") == 0
    after = mtimes(out)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {
        f"images/{split}/{city}/{stem}.png",
        f"labels/{split}/{city}/{stem}.png",
        "images/val/aachen/aachen_000000_000019.png",
        "labels/val/aachen/aachen_000000_000019.png",
        "manifest.json",
    }  # removed while outputs change, written again at the end
    Image.open(out / "labels/val/aachen/aachen_000000_000019.png").load()

    image.unlink()  # a pair removed from the raw data disappears from the outputs
    ids.unlink()
    ids.with_name(f"{stem}_gtFine_color.png").unlink()
    assert prepare(raw, out, "--size", "32x16") == 0
    assert not (out / f"images/{split}/{city}/{stem}.png").exists()
    assert stem not in json.loads((out / "manifest.json").read_text())["splits"][split]["stems"]


def test_other_settings_are_refused_unless_overwrite(raw_cityscapes, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare(raw_cityscapes, out, "--size", "32x16") == 0
    before = mtimes(out)
    assert prepare(raw_cityscapes, out, "--size", "16x8") == 2
    err = capsys.readouterr().err
    assert "--size 32x16 (now 16x8)" in err and "--overwrite" in err
    assert prepare(raw_cityscapes, out, "--size", "32x16", "--labels", "classes19") == 2
    assert "label set categories8 (now classes19)" in capsys.readouterr().err
    assert mtimes(out) == before
    assert prepare(raw_cityscapes, out, "--size", "16x8", "--overwrite") == 0
    assert json.loads((out / "manifest.json").read_text())["size"] == [16, 8]
    assert {Image.open(p).size for p in out.rglob("*.png")} == {(16, 8)}


def test_other_data_folder_and_replaced_files_are_noticed(raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare(raw, out, "--size", "32x16") == 0
    other = Path(shutil.copytree(raw, tmp_path / "other"))
    assert prepare(other, out, "--size", "32x16") == 2
    assert f"--data {raw.resolve()} (now {other.resolve()})" in _err(capsys)

    split, city, stem, image, *_ = next(raw_pairs(raw))
    output = out / f"images/{split}/{city}/{stem}.png"
    before = output.read_bytes()
    old = image.stat().st_mtime_ns - 10**12
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)  # new content, as from an archive:
    os.utime(image, ns=(old, old))  # with an old modification time
    assert prepare(raw, out, "--size", "32x16") == 0
    assert output.read_bytes() != before
    assert "(1 written, 7 up to date)" in capsys.readouterr().out


def test_splits_prepared_separately_share_one_manifest(raw_cityscapes, tmp_path):
    out = tmp_path / "out"
    assert prepare(raw_cityscapes, out, "--size", "32x16", "--splits", "val") == 0
    assert prepare(raw_cityscapes, out, "--size", "32x16", "--splits", "train") == 0
    assert set(json.loads((out / "manifest.json").read_text())["splits"]) == {"train", "val"}


def test_foreign_out_folder_is_refused(raw_cityscapes, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert prepare(raw_cityscapes, tmp_path / "mine") == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert prepare(raw_cityscapes, raw_cityscapes) == 2  # --out pointing at the raw data


def test_interrupted_run_resumes_to_the_uninterrupted_result(raw_cityscapes, tmp_path, monkeypatch):
    assert prepare(raw_cityscapes, tmp_path / "straight", "--size", "32x16") == 0
    real_save, calls = Image.Image.save, []

    def save_then_die(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 5:  # half a PNG, then Ctrl-C
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    out = tmp_path / "resumed"
    assert prepare(raw_cityscapes, out, "--size", "32x16") == 130
    assert not (out / "manifest.json").exists()
    assert_no_temp_files(out)
    assert 0 < len(list(out.rglob("*.png"))) < 16
    for p in out.rglob("*.png"):
        Image.open(p).load()  # every file left behind is complete
    monkeypatch.setattr(Image.Image, "save", real_save)
    (out / "images/train/aachen/.x.png.k2j3.tmp.png").write_bytes(b"left by a killed run")
    assert prepare(raw_cityscapes, out, "--size", "32x16") == 0
    assert pngs(out) == pngs(tmp_path / "straight")
    assert_no_temp_files(out)
    assert (out / "manifest.json").read_text() == (tmp_path / "straight" / "manifest.json").read_text()


# --------------------------------------------------------------------------- bad input


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_data_folders(raw, tmp_path, capsys):
    assert prepare(tmp_path / "nope", tmp_path / "out") == 2
    assert "nope is not a folder" in _err(capsys)
    assert prepare(tmp_path, tmp_path / "out") == 2  # the parent of the dataset
    assert f"did you mean --data {raw}" in _err(capsys)
    shutil.rmtree(raw / "gtFine")
    assert prepare(raw, tmp_path / "out") == 2
    assert "no gtFine/ folder" in _err(capsys)
    assert not (tmp_path / "out").exists()


def test_unpaired_files_are_listed(raw, tmp_path, capsys):
    for stem in ("aachen_000000_000019", "bremen_000001_000019"):
        (raw / f"gtFine/train/{stem.split('_')[0]}/{stem}_gtFine_labelIds.png").unlink()
    (raw / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png").unlink()
    assert prepare(raw, tmp_path / "out") == 2
    err = _err(capsys)
    assert "2 images have no" in err and "aachen/aachen_000000_000019, bremen/bremen_000001_000019" in err
    assert "1 annotations have no" in err and "leftImg8bit/val/<city>/<stem>_leftImg8bit.png" in err
    assert not (tmp_path / "out").exists()


def test_color_only_annotations_suggest_the_color_source(raw, tmp_path, capsys):
    for p in raw.glob("gtFine/*/*/*_labelIds.png"):
        p.unlink()
    assert prepare(raw, tmp_path / "out") == 2
    assert "use --source color" in _err(capsys)


def test_empty_split_and_missing_splits(raw, tmp_path, capsys):
    for p in (raw / "leftImg8bit/val").glob("*/*.png"):
        p.unlink()
    assert prepare(raw, tmp_path / "out", "--splits", "val") == 2
    assert "split 'val' has no images" in _err(capsys)
    assert prepare(raw, tmp_path / "out", "--splits", "trian") == 2
    assert "none of the splits ['trian']" in _err(capsys)


def test_size_mismatch_and_wrong_mode_write_nothing(raw, tmp_path, capsys):
    _, _, _, image, ids, _ = next(raw_pairs(raw))
    Image.open(image).resize((60, 30)).save(image)
    assert prepare(raw, tmp_path / "out") == 2
    err = _err(capsys)
    assert f"{image} is 60x30 but {ids} is 64x32" in err and "found before writing: nothing was written" in err
    assert not (tmp_path / "out").exists()
    Image.open(image).resize(RAW_SIZE).save(image)
    Image.open(ids).convert("RGB").save(ids)
    assert prepare(raw, tmp_path / "out") == 2
    assert f"{ids}: mode RGB is not an 8-bit single-channel label-id image" in _err(capsys)


def test_unknown_ids_and_colours_are_named_and_nothing_half_done(raw, tmp_path, capsys):
    split, city, stem, _, ids_path, color_path = next(raw_pairs(raw))
    ids = np.array(Image.open(ids_path))
    ids[3, 5], ids[7, 9] = 40, 77
    Image.fromarray(ids).save(ids_path)
    out = tmp_path / "out"
    assert prepare(raw, out) == 2
    err = _err(capsys)
    assert f"{ids_path}: unknown Cityscapes label ids [40, 77]" in err and "1 of 8 pairs" in err
    assert not (out / "manifest.json").exists()
    assert not (out / f"images/{split}/{city}/{stem}.png").exists()
    assert not (out / f"labels/{split}/{city}/{stem}.png").exists()
    assert len(list(out.rglob("*.png"))) == 14  # the 7 good pairs are kept for the next run
    assert_no_temp_files(out)

    color = np.array(Image.open(color_path))
    color[0, 0, :3] = (1, 2, 3)
    Image.fromarray(color).save(color_path)
    assert prepare(raw, tmp_path / "out_color", "--source", "color") == 2
    assert f"{color_path}: colours with no class in label set 'categories8': [(1, 2, 3)]" in _err(capsys)


def test_corrupt_input_keeps_previous_outputs(raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare(raw, out) == 0
    split, city, stem, image, *_ = next(raw_pairs(raw))
    previous = (out / f"images/{split}/{city}/{stem}.png").read_bytes()
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    assert prepare(raw, out) == 2
    err = _err(capsys)
    assert f"{image}: unreadable" in err and "truncated" in err
    assert (out / f"images/{split}/{city}/{stem}.png").read_bytes() == previous
    assert not (out / "manifest.json").exists()  # the folder is not complete any more
    image.write_text("not a png")
    assert prepare(raw, out) == 2
    assert f"{image}: unreadable (UnidentifiedImageError" in _err(capsys)


def test_bad_flags(raw_cityscapes, tmp_path, capsys):
    assert prepare(raw_cityscapes, tmp_path / "o", "--splits", "train", "train") == 2
    assert "repeats a split" in _err(capsys)
    assert prepare(raw_cityscapes, tmp_path / "o", "--labels", "categories9") == 2
    assert "unknown label set 'categories9'" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_render_matches_fixture_files(raw_cityscapes):
    """The fixture's colour images are the official renderer's output (guards the helper)."""
    polygons = next(raw_cityscapes.glob("gtFine/train/*/*_polygons.json"))
    objects = json.loads(polygons.read_text())["objects"]
    color = polygons.with_name(polygons.name.replace("polygons.json", "color.png"))
    assert np.array_equal(np.asarray(render(objects, *RAW_SIZE, "color")), np.asarray(Image.open(color)))


def test_overwrite_with_bad_input_deletes_nothing(raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare(raw, out, "--size", "32x16") == 0
    before = mtimes(out)
    image = next(raw_pairs(raw))[3]
    Image.open(image).resize((60, 30)).save(image)
    assert prepare(raw, out, "--size", "16x8", "--overwrite") == 2
    assert "is 60x30 but" in _err(capsys)
    assert mtimes(out) == before  # the checks come before the old outputs are deleted


def test_synth_then_prepare_end_to_end(tmp_path):
    """`urbanseg synth` output goes through prepare (both sources agree, labels equal the
    official table applied to PIL's nearest resize of synth's labelIds) and then pack."""
    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path / "raw"),
                "--train",
                "2",
                "--val",
                "1",
                "--size",
                "128x64",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    for source in ("labelIds", "color"):
        assert prepare(tmp_path / "raw", tmp_path / source, "--size", "64x32", "--source", source) == 0
    labels = [{k: v for k, v in pngs(tmp_path / s).items() if k.startswith("labels")} for s in ("labelIds", "color")]
    assert labels[0] == labels[1] and len(labels[0]) == 3
    lut = official_lut("categories8")
    for split, city, stem, _, ids_path, _ in raw_pairs(tmp_path / "raw"):
        expected = lut[np.asarray(Image.open(ids_path).resize((64, 32), Image.NEAREST))]
        got = np.asarray(Image.open(tmp_path / "labelIds" / "labels" / split / city / f"{stem}.png"))
        np.testing.assert_array_equal(got, expected)
    manifest = json.loads((tmp_path / "labelIds" / "manifest.json").read_text())
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 2, "val": 1}
    # The next stage accepts the folder (the contract: manifest + images/ + labels/).
    assert main(["pack", "--prepared", str(tmp_path / "labelIds"), "--out", str(tmp_path / "shards")]) == 0
    spec = json.loads((tmp_path / "shards" / "train" / "spec.json").read_text())
    assert (spec["width"], spec["height"], spec["data_length"]) == (64, 32, 2)
    assert spec["pixel_counts"] == manifest["splits"]["train"]["pixel_counts"]


def test_repeated_calls_with_worker_processes_do_not_hang(tmp_path):
    """prepare() with forked workers from a process whose OpenCV thread pool has been busy
    (a user's script, or an earlier in-process run): a worker that touches the inherited
    pool (cv2.setNumThreads) waits forever, so the run is given a timeout."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
import cv2, numpy as np
from helpers.cityscapes import write_raw_cityscapes
from urbanseg.cli import main
root = Path({str(tmp_path)!r})
write_raw_cityscapes(root / "raw", {{"train": 4}}, size=(128, 64))
big = np.random.default_rng(0).integers(0, 256, (1024, 2048, 3), dtype=np.uint8)
for _ in range(6):
    for _ in range(5):
        cv2.resize(big, (512, 256), interpolation=cv2.INTER_AREA)
    assert main(["prepare", "--data", str(root / "raw"), "--out", str(root / "out"), "--workers", "2",
                 "--overwrite", "--splits", "train"]) == 0
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung workers too, not only their parent
        proc.communicate()
        pytest.fail("prepare with --workers 2 hung")
    assert proc.returncode == 0, err[-2000:]


def test_damaged_output_is_redone_even_with_its_size_and_time(raw, tmp_path):
    """A prepared image whose bytes changed (same length, same mtime) is not up to date:
    `pack` copies the bytes as they are, so the damage would reach the shards."""
    out = tmp_path / "out"
    assert prepare(raw, out, "--size", "32x16") == 0
    before = pngs(out)
    split, city, stem, *_ = next(raw_pairs(raw))
    target = out / f"images/{split}/{city}/{stem}.png"
    stat, data = target.stat(), bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prepare(raw, out, "--size", "32x16") == 0
    assert pngs(out) == before


def _paired(root: Path, count: int) -> list[str]:
    """`count` random pictures with index masks in flat paired folders; the prepare flags."""
    rng = np.random.default_rng(0)
    (root / "i").mkdir(parents=True)
    (root / "m").mkdir()
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 32, 3), np.uint8)).save(root / "i" / f"p{k}.png")
        Image.fromarray(rng.integers(0, 8, (16, 32), np.uint8)).save(root / "m" / f"p{k}.png")
    return ["--images", str(root / "i"), "--masks", str(root / "m"), "--source", "indices", "--size", "32x16"]


def test_a_pair_in_a_kept_split_is_refused(tmp_path, capsys):
    """A split not in `--splits` stays as an earlier run prepared it; a picture of it that
    this run puts in train would be in both splits: refused before anything is written.
    A stem alone proves nothing (train/0001.png and val/0001.png may be two pictures)."""
    flags, out = _paired(tmp_path, 12), tmp_path / "out"
    assert main(["prepare", *flags, "--out", str(out), "--val-fraction", "0.25"]) == 0
    val = json.loads((out / "manifest.json").read_text())["splits"]["val"]["stems"]
    before = mtimes(out)
    assert main(["prepare", *flags, "--out", str(out), "--splits", "train"]) == 2
    err = _err(capsys)
    assert f"{val[0]} (val -> train)" in err and "in two splits" in err
    assert mtimes(out) == before
    # the same stem for another picture is no move
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(tmp_path / "i" / f"{val[0]}.png")
    for stem in val[1:]:
        (tmp_path / "i" / f"{stem}.png").unlink()
        (tmp_path / "m" / f"{stem}.png").unlink()
    assert main(["prepare", *flags, "--out", str(out), "--splits", "train"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())["splits"]
    assert val[0] in manifest["train"]["stems"] and manifest["val"]["stems"] == val


def test_a_split_asked_for_without_pairs_now_is_removed(raw, tmp_path):
    out = tmp_path / "out"
    assert prepare(raw, out, "--size", "32x16", "--splits", "train", "val") == 0
    shutil.rmtree(raw / "leftImg8bit" / "val")
    shutil.rmtree(raw / "gtFine" / "val")
    assert prepare(raw, out, "--size", "32x16", "--splits", "train", "val") == 0
    assert set(json.loads((out / "manifest.json").read_text())["splits"]) == {"train"}
    assert not (out / "images/val").exists() and not (out / "labels/val").exists()


def test_photo_exif_orientation_is_applied_and_checked_first(tmp_path, capsys):
    """A photo is read upright as its EXIF orientation says (as labelme, viewers and
    `predict` show it); its annotation as stored. The header check uses the upright size,
    so a mask of the stored size is refused before anything is written."""
    images, masks = tmp_path / "i", tmp_path / "m"
    images.mkdir()
    masks.mkdir()
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = 255  # left half white as stored; upright (orientation 6: 90 degrees clockwise) the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(images / "a.png", exif=exif.tobytes())
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(masks / "a.png")  # the stored size: wrong
    args = ["--images", str(images), "--masks", str(masks), "--source", "indices", "--splits", "train"]
    assert main(["prepare", *args, "--out", str(tmp_path / "o"), "--size", "32x64"]) == 2
    err = _err(capsys)
    assert "is 32x64 (turned upright as its EXIF orientation says)" in err and "found before writing" in err
    Image.fromarray(np.zeros((64, 32), np.uint8)).save(masks / "a.png")  # the upright size
    assert main(["prepare", *args, "--out", str(tmp_path / "o"), "--size", "32x64"]) == 0
    upright = np.asarray(Image.open(tmp_path / "o/images/train/all/a.png"))
    assert upright[:32].min() == 255 and upright[32:].max() == 0

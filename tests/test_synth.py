import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from urbanseg.cli import main
from urbanseg.config import SynthConfig
from urbanseg.errors import UserError
from urbanseg.labels import CATEGORIES, ID_TO_LABEL, NAME_TO_LABEL, get_label_set
from urbanseg.outputs import LOCK, MARKER
from urbanseg.synth import CITIES, CONFIG_NAME, generate, synthesize

SIZE = "256x128"
STEM = re.compile(r"^([a-z]+)_(\d{6})_(\d{6})$")


def files(root: Path) -> dict[str, bytes]:
    """Every file's bytes but the marker and lock (they record when and by which process)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MARKER, LOCK)
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(SynthConfig(out=out, train=3, val=2, test=1, size=SIZE, seed=7, workers=1))
    return out


def scenes(root: Path) -> list[Path]:
    return sorted(root.glob("gtFine/*/*/*_gtFine_polygons.json"))


def test_layout_and_names(dataset):
    images = sorted(dataset.glob("leftImg8bit/*/*/*_leftImg8bit.png"))
    assert [p.parts[-3] for p in images].count("train") == 3 and len(images) == 6
    for img in images:
        split, city = img.parts[-3], img.parts[-2]
        stem = img.name[: -len("_leftImg8bit.png")]
        m = STEM.match(stem)
        assert m and m.group(1) == city and city in CITIES[split] and m.group(3) == "000019"
        gt = dataset / "gtFine" / split / city
        with Image.open(img) as im:
            assert (im.mode, im.size) == ("RGB", (256, 128))
        with Image.open(gt / f"{stem}_gtFine_labelIds.png") as im:
            assert (im.mode, im.size) == ("L", (256, 128))
        with Image.open(gt / f"{stem}_gtFine_color.png") as im:
            assert (im.mode, im.size) == ("RGBA", (256, 128))
        with Image.open(gt / f"{stem}_gtFine_instanceIds.png") as im:  # 16-bit like the official files
            assert im.mode in ("I", "I;16") and im.size == (256, 128)
        poly = json.loads((gt / f"{stem}_gtFine_polygons.json").read_text())
        assert (poly["imgWidth"], poly["imgHeight"]) == (256, 128)
        for obj in poly["objects"]:
            name = obj["label"][:-5] if obj["label"].endswith("group") else obj["label"]
            assert name in NAME_TO_LABEL
            pts = np.asarray(obj["polygon"])
            assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 3
            assert pts.min() >= 0 and (pts[:, 0] <= 255).all() and (pts[:, 1] <= 127).all()
    saved = (dataset / CONFIG_NAME).read_text()
    assert "seed: 7" in saved and "size: 256x128" in saved
    assert not list(dataset.rglob("*.tmp*"))


def test_json2labelImg_reproduces_label_images(dataset, tmp_path):
    """The official converters, run on our polygons, give our labelIds, color and
    instanceIds bit for bit (license plates, id -1, are listed and skipped by both)."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    labels_seen = set()
    for js in scenes(dataset):
        base = str(js)[: -len("polygons.json")]
        labels_seen |= {o["label"] for o in json.loads(js.read_text())["objects"]}
        for kind, enc in (("labelIds", "ids"), ("color", "color")):
            ref = tmp_path / f"{kind}.png"
            json2labelImg(str(js), str(ref), enc)
            ours = np.asarray(Image.open(base + f"{kind}.png"))
            np.testing.assert_array_equal(ours, np.asarray(Image.open(ref)), err_msg=f"{js.name} {kind}")
        # json2instanceImg itself cannot save its 32-bit "I" image with Pillow 13: compare the image it draws
        annotation = Annotation()
        annotation.fromJsonFile(str(js))
        ref = np.asarray(createInstanceImage(annotation, "ids"))
        ours = np.asarray(Image.open(base + "instanceIds.png"))
        np.testing.assert_array_equal(ours.astype(np.int64), ref.astype(np.int64), err_msg=f"{js.name} instanceIds")
    assert {"license plate", "cargroup", "car", "person", "ego vehicle", "rectification border"} <= labels_seen


def test_instance_ids_follow_cityscapes(dataset):
    many = 0
    for js in scenes(dataset):
        base = str(js)[: -len("polygons.json")]
        ids = np.asarray(Image.open(base + "labelIds.png")).astype(np.int64)
        inst = np.asarray(Image.open(base + "instanceIds.png")).astype(np.int64)
        has = np.array([ID_TO_LABEL[i].hasInstances if i in ID_TO_LABEL else False for i in range(256)])
        objects = inst >= 1000
        np.testing.assert_array_equal(inst[objects] // 1000, ids[objects])
        assert has[ids[objects]].all()
        # stuff, and "cargroup" regions, keep the plain label id
        np.testing.assert_array_equal(inst[~objects], ids[~objects])
        assert not has[ids[~objects]].any() or (ids[~objects][has[ids[~objects]]] == 26).all()
        many = max(many, len(np.unique(inst[inst // 1000 == 26])))
    assert many >= 2  # several cars in one scene, numbered 26000, 26001, ...


def test_all_categories_in_every_split(dataset):
    lut = get_label_set("categories8")
    for split in ("train", "val", "test"):
        present = set()
        for p in dataset.glob(f"gtFine/{split}/*/*_labelIds.png"):
            present |= set(np.unique(lut.labels_from_ids(np.asarray(Image.open(p)))).tolist())
        assert present == set(range(8)), (split, present)


def test_same_bytes_for_any_worker_count(dataset, tmp_path):
    synthesize(SynthConfig(out=tmp_path / "w2", train=3, val=2, test=1, size=SIZE, seed=7, workers=2))
    a, b = files(dataset), files(tmp_path / "w2")
    a.pop(CONFIG_NAME), b.pop(CONFIG_NAME)  # records --workers itself
    assert a == b
    other = generate(8, "train", 0, 256, 128)["image"]
    assert not np.array_equal(other, np.asarray(Image.open(next(dataset.glob("leftImg8bit/train/*/*")))))


def test_pixel_shares_look_like_cityscapes():
    """Measured over 60 scenes at 512x256: void 7, flat 36, construction 24, object 2.6,
    nature 15, sky 6, human 1.0, vehicle 9 (%). Bounds leave room for 16 smaller scenes."""
    total = sum(generate(0, "train", i, 256, 128)["categories"] for i in range(16))
    share = dict(zip(CATEGORIES, 100 * total / total.sum()))
    bounds = {
        "void": (4, 11),
        "flat": (28, 45),
        "construction": (14, 32),
        "object": (1, 5),
        "nature": (8, 24),
        "sky": (2, 10),
        "human": (0.3, 3),
        "vehicle": (3, 16),
    }
    for name, (lo, hi) in bounds.items():
        assert lo <= share[name] <= hi, (name, share[name])
    assert share["flat"] == max(share.values()) and share["construction"] > share["vehicle"]


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--train", "2", "--val", "1", "--size", SIZE, "--workers", "1"]) == 0
    assert len(list(out.glob("leftImg8bit/*/*/*.png"))) == 3 and len(list(out.glob("gtFine/*/*/*"))) == 12
    assert "pixel shares" in capsys.readouterr().out


def test_rerun_removes_a_killed_runs_temporary_files(tmp_path):
    """A run killed mid-write leaves `atomic_path`'s temporary file; rerunning the same
    command completes the folder and removes it (it is no scene of another run)."""
    from urbanseg.util import temporary_glob

    out = tmp_path / "d"
    args = ["synth", "--out", str(out), "--train", "1", "--val", "1", "--size", SIZE, "--workers", "1"]
    assert main(args) == 0
    before = files(out)
    label = next(out.glob("gtFine/train/*/*_labelIds.png"))
    leftover = label.with_name(temporary_glob(label.name).replace("*", "x7k2"))
    leftover.write_bytes(label.read_bytes()[:100])
    assert main(args) == 0
    assert not leftover.exists() and files(out) == before


def test_rerun_extends_and_refuses_to_mix(tmp_path, capsys):
    out = tmp_path / "d"
    args = ["synth", "--out", str(out), "--val", "1", "--size", SIZE, "--workers", "1"]
    assert main(args + ["--train", "1"]) == 0
    first = files(out)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main(args + ["--train", "2"]) == 0  # a bigger run extends the smaller one
    assert all(files(out)[k] == v for k, v in first.items() if k != CONFIG_NAME)
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())  # identical files left alone
    capsys.readouterr()
    assert main(args + ["--train", "2", "--seed", "1"]) == 2
    assert "--seed 0" in capsys.readouterr().err
    assert main(args + ["--train", "1"]) == 2  # would leave a stale scene behind
    assert "more scenes" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not written by `urbanseg synth`"):
        synthesize(SynthConfig(out=foreign, train=1, val=0, size=SIZE, workers=1))


def test_failure_leaves_no_partial_files_and_rerun_completes(tmp_path, monkeypatch):
    import urbanseg.synth.writer as synth

    real = synth._png
    calls = {"n": 0}

    def flaky(array):
        calls["n"] += 1
        if calls["n"] == 6:  # second scene, second file
            raise OSError("disk full")
        return real(array)

    monkeypatch.setattr(synth, "_png", flaky)
    config = SynthConfig(out=tmp_path / "x", train=2, val=0, size=SIZE, workers=1)
    with pytest.raises(OSError):
        synthesize(config)
    assert not [p for p in (tmp_path / "x").rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(synth, "_png", real)
    synthesize(config)
    synthesize(SynthConfig(out=tmp_path / "y", train=2, val=0, size=SIZE, workers=1))
    a, b = files(tmp_path / "x"), files(tmp_path / "y")
    a.pop(CONFIG_NAME), b.pop(CONFIG_NAME)
    assert a == b


def _colour_lookup_miou(train: list[dict], val: list[dict]) -> float:
    """mIoU (8 categories, val) of the best per-pixel colour rule: RGB quantised to 5 bits
    per channel -> majority category of that colour bin on the train pixels."""
    lut = get_label_set("categories8")

    def code(img):
        q = img.astype(np.int64) >> 3
        return ((q[..., 0] << 10) | (q[..., 1] << 5) | q[..., 2]).ravel()

    def cats(scene):
        return lut.labels_from_ids(scene["labelIds"]).ravel().astype(np.int64)

    counts = sum(np.bincount(code(s["image"]) * 8 + cats(s), minlength=8 << 15) for s in train).reshape(-1, 8)
    table = counts.argmax(1)
    cm = sum(np.bincount(cats(s) * 8 + table[code(s["image"])], minlength=64) for s in val).reshape(8, 8)
    inter, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    return float(np.mean(inter / np.maximum(union, 1)))


def test_colour_alone_does_not_solve_it():
    """The best per-pixel colour rule stays far below what a small CNN reaches on the same
    data (benchmarks/bench_synth_colour.py, see .readme/synth.md). Measured here (24 train /
    8 val scenes at 256x128): 0.25, 0.20, 0.19 for seeds 0, 1, 2; the bound 0.35 fails if
    colour alone starts to separate the categories."""
    train = [generate(0, "train", i, 256, 128) for i in range(24)]
    val = [generate(0, "val", i, 256, 128) for i in range(8)]
    m = _colour_lookup_miou(train, val)
    assert 0.05 < m < 0.35, m

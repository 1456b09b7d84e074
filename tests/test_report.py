"""Report files from hand-made numbers and arrays: figures, markdown, HTML (rendered in
headless Chromium), metrics.json and per_image.csv."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from helpers.browser import CHROMIUM, SKIP_REASON, chromium, images_loaded
from urbanseg.evaluation.metrics import ConfusionMatrix, format_table, image_scores
from urbanseg.evaluation.report import (
    ERROR_COLOR,
    IGNORE_COLOR,
    error_map,
    gallery_picture,
    markdown_report,
    normalize_rows,
    official_tables,
    write_report,
)
from urbanseg.labels import get_label_set

LS = get_label_set("categories8")


def _scene(i: int, h: int = 48, w: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small image, ground truth with an ignored band, and a prediction with a wrong box."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[:h, :w]
    label = ((yy // 12 + xx // 24 + i) % 8).astype(np.uint8)
    label[label == 5] = 4  # class 5 (sky) absent everywhere: n/a
    label[:4] = 255
    pred = np.where(label == 255, 0, label).astype(np.uint8)
    pred[16:32, 10 : 10 + 8 * i] = 3
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return image, label, pred


def _report_inputs(n: int = 5) -> dict:
    cm, per_image, picks = ConfusionMatrix(LS.num_classes), [], []
    for i in range(n):
        image, label, pred = _scene(i)
        cm.update(pred, label)
        row = {"name": f"zurich/zurich_{i:06d}_000019", **image_scores(pred[None], label[None], LS.num_classes)[0]}
        per_image.append(row)
        picks.append(
            {**{k: row[k] for k in ("name", "miou", "pixel_accuracy")}, "image": image, "label": label, "pred": pred}
        )
    return dict(
        result=cm.compute(),
        matrix=cm.matrix,
        label_set=LS,
        title="Evaluation of <demo> & co on val",
        header=[("date", "2026-01-02T03:04:05+00:00"), ("model", "unet-original (width=8)")],
        per_image=per_image,
        picks={"best": picks[:2], "worst": picks[-2:][::-1]},
        info={"split": "val"},
    )


OFFICIAL = {
    "images": 5,
    "pixels": 23040,
    "category_iou": {
        "flat": 0.5,
        "construction": None,
        "object": 0.25,
        "nature": 1.0,
        "sky": None,
        "human": 0.75,
        "vehicle": 0.125,
    },
    "category_iiou": {"human": 0.5, "vehicle": None},
    "mean_category_iou": 0.525,
    "mean_category_iiou": 0.5,
}


def test_normalize_rows_fractions_and_blank_rows():
    m = np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    norm = normalize_rows(m)
    np.testing.assert_allclose(norm[0], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(norm[2], [0.25, 0.25, 0.5])
    assert np.isnan(norm[1]).all()  # no ground truth: blank, not "never right"


def test_error_map_colours_wrong_ignored_and_correct_pixels():
    image = np.full((2, 3, 3), 200, np.uint8)
    label = np.array([[0, 1, 255], [2, 2, 255]], np.uint8)
    pred = np.array([[0, 0, 1], [2, 1, 255]], np.uint8)
    out = error_map(image, label, pred)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert tuple(out[0, 1]) == ERROR_COLOR and tuple(out[1, 1]) == ERROR_COLOR
    assert tuple(out[0, 2]) == IGNORE_COLOR and tuple(out[1, 2]) == IGNORE_COLOR
    correct = out[0, 0]  # a dimmed grey copy of the image
    assert correct[0] == correct[1] == correct[2] and 0 < correct[0] < 200


def test_gallery_picture_shrinks_wide_panels(tmp_path):
    image, label, pred = _scene(1, h=200, w=1600)
    gallery_picture(image, label, pred, LS, tmp_path / "g.png", title="worst #1", max_panel_width=256)
    with Image.open(tmp_path / "g.png") as im:
        w, h = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert 4 * 256 <= w <= 4 * 256 + 100 and h < 200  # four 256-wide panels, height scaled with them
    assert (np.abs(pixels.astype(int) - ERROR_COLOR).sum(-1) < 30).any()  # the error box is drawn


def test_markdown_has_original_table_header_and_links():
    inputs = _report_inputs()
    gallery = {"best": [{"file": "gallery/best_01_x.png", "name": "x", "miou": 0.5, "pixel_accuracy": None}]}
    md = markdown_report(inputs["result"], LS.classes, title="T", header=inputs["header"], gallery=gallery)
    assert format_table(inputs["result"], LS.classes).strip() in md
    assert "| sky | n/a | n/a | n/a | n/a |" in md
    assert "- **model:** unet-original (width=8)" in md
    assert f"pixel accuracy: {inputs['result']['pixel_accuracy']:.4f}" in md
    assert "![x](gallery/best_01_x.png)" in md and "pixel accuracy n/a" in md
    assert "![confusion matrix](confusion.png)" in md


def test_official_tables_mark_missing_iiou_and_nan():
    md, page = official_tables(OFFICIAL)
    assert "| flat | 0.5000 | - |" in md
    assert "| construction | n/a | - |" in md
    assert "| vehicle | 0.1250 | n/a |" in md
    assert "| average | 0.5250 | 0.5000 |" in md
    assert "class | IoU" not in md  # only the levels present
    assert "<h3>categories</h3>" in page


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs, self.hrefs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        if tag == "a":
            self.hrefs.append(a["href"])

    def handle_data(self, data):
        self.text.append(data)


def test_write_report_files(tmp_path):
    inputs = _report_inputs()
    (tmp_path / "gallery").mkdir()
    (tmp_path / "gallery" / "best_09_stale.png").write_bytes(b"old")  # from an earlier evaluation
    paths = write_report(tmp_path, official=OFFICIAL, **inputs)
    assert all(p.is_file() for p in paths.values())
    doc = json.loads(paths["metrics"].read_text())
    assert doc["metrics"] == inputs["result"] and doc["confusion_matrix"] == inputs["matrix"].tolist()
    assert doc["official"] == OFFICIAL and doc["split"] == "val" and doc["classes"] == list(LS.classes)
    assert [e["name"] for e in doc["gallery"]["worst"]] == [p["name"] for p in inputs["picks"]["worst"]]
    rows = list(csv.DictReader(paths["per_image"].open()))
    assert [r["name"] for r in rows] == [r["name"] for r in inputs["per_image"]]
    assert float(rows[2]["miou"]) == pytest.approx(inputs["per_image"][2]["miou"], abs=1e-6)
    gallery = sorted(p.name for p in (tmp_path / "gallery").iterdir())
    assert gallery == [
        "best_01_zurich_000000_000019.png",
        "best_02_zurich_000001_000019.png",
        "worst_01_zurich_000004_000019.png",
        "worst_02_zurich_000003_000019.png",
    ]
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes left no temporary files
    page = _Collect()
    page.feed(paths["html"].read_text())
    assert page.srcs == [
        "confusion.png",
        *(f"gallery/{g}" for g in gallery[:2]),
        *(f"gallery/{g}" for g in gallery[2:]),
    ]
    assert all((tmp_path / href).is_file() for href in page.hrefs)  # every link is a file beside the page
    text = "".join(page.text)
    assert "Evaluation of <demo> & co on val" in text  # escaped in the source, shown as typed
    assert "Official Cityscapes scores" in text and "n/a" in text


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_html_renders_in_chromium_with_every_image(tmp_path):
    paths = write_report(tmp_path, official=OFFICIAL, **_report_inputs())
    loaded, total, dom = images_loaded(paths["html"])
    assert (loaded, total) == (5, 5)  # confusion + 2 best + 2 worst
    assert "Scores per class" in dom
    chromium(paths["html"], "--window-size=1200,2400", f"--screenshot={tmp_path / 'shot.png'}")
    with Image.open(tmp_path / "shot.png") as im:
        assert im.size == (1200, 2400)
        assert len(np.unique(np.asarray(im.convert("L")))) > 20  # rendered content, not a blank page
    # The same check fails when a picture is missing (the page warns the reader too).
    (tmp_path / "confusion.png").unlink()
    loaded, total, dom = images_loaded(paths["html"])
    assert (loaded, total) == (4, 5)
    assert re.search(r'id="img-warning" style="display: block;"', dom)

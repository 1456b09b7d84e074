"""`urbanseg evaluate` end to end on a tiny trained run: every file, figures equal to an
independent computation from the model's predictions, the full-resolution protocol and
the official scores, the gallery ranking, the HTML in Chromium, and the user errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers.browser import CHROMIUM, images_loaded
from urbanseg.cli import main
from urbanseg.evaluation.evaluate import EvalState
from urbanseg.labels import get_label_set

LS = get_label_set("categories8")


def _predictions(run: Path, shards: Path, split: str = "val", full_res_raw: Path | None = None):
    """Independently of evaluate.py: (name, prediction, ground truth) per image, from the
    checkpoint and the shards (and the raw label ids at full resolution)."""
    from urbanseg.checkpoint import load_checkpoint, model_from_checkpoint
    from urbanseg.data.loader import ShardDataset

    model = model_from_checkpoint(load_checkpoint(run / "best.pt")).eval()
    out = []
    for item in ShardDataset(shards, split):
        with torch.no_grad():
            logits = model(item["image"][None].float())
        if full_res_raw is None:
            out.append((item["name"], logits.argmax(1)[0].numpy(), item["label"].numpy()))
            continue
        (ids_path,) = (full_res_raw / "gtFine" / split).glob(f"*/{item['name']}_gtFine_labelIds.png")
        ids = np.asarray(Image.open(ids_path))
        inst = np.asarray(Image.open(str(ids_path).replace("labelIds", "instanceIds")))
        # Bilinear in channels-last layout, as evaluate does: NCHW differs by float rounding
        # (~1e-6), enough to flip an argmax at a near-tie now and then.
        logits = logits.contiguous(memory_format=torch.channels_last)
        up = F.interpolate(logits, size=ids.shape, mode="bilinear", align_corners=False)
        out.append((item["name"], up.argmax(1)[0].numpy(), LS.labels_from_ids(ids), ids, inst))
    return out


def _plain_confusion(pairs, c: int) -> np.ndarray:
    """Confusion matrix by np.add.at over the valid pixels: a second way of counting."""
    m = np.zeros((c, c), np.int64)
    for pred, gt in pairs:
        valid = gt != 255
        np.add.at(m, (gt[valid].astype(int), pred[valid].astype(int)), 1)
    return m


def _per_image_miou(pred: np.ndarray, gt: np.ndarray, c: int) -> float:
    valid = gt != 255
    ious = []
    for k in range(c):
        p, g = (pred == k) & valid, (gt == k) & valid
        if (p | g).any():
            ious.append((p & g).sum() / (p | g).sum())
    return float(np.mean(ious))


def test_evaluate_writes_every_file_with_independently_checked_figures(tiny):
    from urbanseg.evaluation.metrics import ConfusionMatrix

    assert main(["evaluate", "--run", str(tiny["run"]), "--gallery", "2", "--batch-size", "3"]) == 0
    out = tiny["run"] / "eval" / "val"
    for name in ("report.md", "report.html", "metrics.json", "per_image.csv", "confusion.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "metrics.json").read_text())
    preds = _predictions(tiny["run"], tiny["shards"])
    reference = ConfusionMatrix(LS.num_classes)
    for _, pred, gt in preds:
        reference.update(pred, gt)
    assert doc["metrics"] == reference.compute()
    assert doc["confusion_matrix"] == _plain_confusion([(p, g) for _, p, g in preds], LS.num_classes).tolist()
    assert (
        doc["protocol"] == "prepared"
        and doc["num_images"] == 5
        and doc["checkpoint"]["model"]["name"] == "unet-original"
    )
    rows = {r["name"]: r for r in csv.DictReader((out / "per_image.csv").open())}
    assert sorted(rows) == sorted(name for name, _, _ in preds)
    for name, pred, gt in preds:
        assert float(rows[name]["miou"]) == pytest.approx(_per_image_miou(pred, gt, LS.num_classes), abs=1e-6)
        assert float(rows[name]["pixel_accuracy"]) == pytest.approx((pred == gt).mean(), abs=1e-6)
    # The gallery holds the two best and two worst images by per-image mIoU, named after their stems.
    ranked = sorted(rows, key=lambda n: (-float(rows[n]["miou"]), n))
    expected = [
        f"best_01_{ranked[0]}.png",
        f"best_02_{ranked[1]}.png",
        f"worst_01_{ranked[-1]}.png",
        f"worst_02_{ranked[-2]}.png",
    ]
    assert sorted(p.name for p in (out / "gallery").iterdir()) == sorted(expected)
    md = (out / "report.md").read_text()
    assert "| class | iou | precision | recall | f1_score |" in md and "| average |" in md
    step = doc["checkpoint"]["step"]
    assert isinstance(step, int) and step > 0
    for text in (
        "**checkpoint:**",
        f"best.pt (step {step}",
        "**hardware:**",
        "torch " + torch.__version__,
        "unet-original",
    ):
        assert text in md, text


def test_full_res_scores_at_raw_size_with_official_scores(tiny):
    from urbanseg.evaluation.metrics import ConfusionMatrix
    from urbanseg.evaluation.official import OfficialEvaluator

    assert main(["evaluate", "--run", str(tiny["run"]), "--full-res", "--gallery", "1"]) == 0
    out = tiny["run"] / "eval" / "val"
    doc = json.loads((out / "metrics.json").read_text())
    preds = _predictions(tiny["run"], tiny["shards"], full_res_raw=tiny["raw"])
    assert preds[0][1].shape == (64, 128)  # the raw size, not the prepared 32x64
    reference, official = ConfusionMatrix(LS.num_classes), OfficialEvaluator(LS)
    for name, pred, gt, ids, inst in preds:
        reference.update(pred, gt)
        official.update_classes(pred, ids, inst, name=name)
    assert doc["protocol"] == "full-res" and doc["data"]["raw"] == tiny["raw"].resolve().as_posix()
    assert doc["metrics"] == reference.compute() and doc["metrics"]["pixels"] == 5 * 64 * 128 - int(
        sum((g == 255).sum() for _, _, g, _, _ in preds)
    )
    assert doc["official"] == official.compute() and "category_iou" in doc["official"]
    md = (out / "report.md").read_text()
    assert "## Official Cityscapes scores" in md and "| category | IoU | iIoU |" in md
    assert len(list((out / "gallery").iterdir())) == 2  # stale pictures of the previous run are gone


def test_full_res_with_a_colour_only_label_set_reads_gtfine_color(tiny, tmp_path):
    """A label set defined by colours (labelmap.json) is scored against *_gtFine_color.png.
    With the categories8 classes and colours, that equals the labelIds-based evaluation."""
    from urbanseg.checkpoint import load_checkpoint, save_checkpoint

    labelmap = {
        name: {"id": k, "colors": [list(c) for c, kk in LS.color_to_class if kk == k]}
        for k, name in enumerate(LS.classes)
    }
    (tmp_path / "colours.json").write_text(json.dumps(labelmap))
    prepared, shards = tmp_path / "prepared", tmp_path / "shards"
    assert (
        main(
            [
                "prepare",
                "--data",
                str(tiny["raw"]),
                "--out",
                str(prepared),
                "--size",
                "64x32",
                "--labels",
                str(tmp_path / "colours.json"),
                "--source",
                "color",
                "--splits",
                "val",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert main(["pack", "--prepared", str(prepared), "--out", str(shards), "--splits", "val"]) == 0
    ckpt = load_checkpoint(tiny["run"] / "best.pt")
    ckpt["label_set"] = json.loads((shards / "val" / "spec.json").read_text())["label_set"]
    assert ckpt["label_set"]["id_to_class"] is None  # really colour-only
    save_checkpoint(tmp_path / "colours.pt", ckpt)
    run = tmp_path / "run"
    run.mkdir()
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(run),
                "--checkpoint",
                str(tmp_path / "colours.pt"),
                "--data",
                str(shards),
                "--full-res",
                "--gallery",
                "0",
            ]
        )
        == 0
    )
    colour = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(tiny["run"]), "--full-res", "--gallery", "0"]) == 0
    ids = json.loads((tiny["run"] / "eval" / "val" / "metrics.json").read_text())
    assert colour["official"] is None and ids["official"] is not None
    assert colour["confusion_matrix"] == ids["confusion_matrix"] and colour["metrics"] == ids["metrics"]
    assert not list((run / "eval" / "val" / "gallery").glob("*.png"))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (`make test` installs Debian's package)")
def test_report_html_renders_with_every_image(tiny):
    run = tiny["run"]
    assert main(["evaluate", "--run", str(run), "--gallery", "2", "--checkpoint", "last"]) == 0
    loaded, total, dom = images_loaded(run / "eval" / "val" / "report.html")
    assert (loaded, total) == (5, 5)  # confusion matrix + 2 best + 2 worst
    assert "last.pt" in dom and "Scores per class" in dom


def test_user_errors_exit_2_naming_the_problem(tiny, tmp_path, capsys):
    run = tiny["run"]

    def fails(args: list[str], *needles: str) -> None:
        assert main(["evaluate", *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        for needle in needles:
            assert needle in err, (needle, err)

    fails(["--run", str(tmp_path / "nope")], "run folder", "nope", "urbanseg train")
    fails(["--run", str(run), "--checkpoint", str(tmp_path / "x.pt")], "x.pt", "does not exist")
    fails(["--run", str(run), "--split", "test"], "'test'", "val")
    fails(["--run", str(run), "--data", str(tmp_path / "no-shards")], "no-shards")
    # --full-res without the raw dataset: the error names where it looked.
    moved = tmp_path / "elsewhere"
    shutil.move(tiny["raw"] / "gtFine", moved)
    try:
        fails(["--run", str(run), "--full-res"], str(tiny["raw"] / "gtFine"), "drop --full-res")
    finally:
        shutil.move(moved, tiny["raw"] / "gtFine")
    # Shards with another label set than the model's.
    other = tmp_path / "prepared19"
    assert (
        main(
            [
                "prepare",
                "--data",
                str(tiny["raw"]),
                "--out",
                str(other),
                "--size",
                "64x32",
                "--labels",
                "classes19",
                "--splits",
                "val",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert main(["pack", "--prepared", str(other), "--out", str(tmp_path / "shards19"), "--splits", "val"]) == 0
    capsys.readouterr()
    fails(["--run", str(run), "--data", str(tmp_path / "shards19")], "categories8", "classes19", "--labels")


def _row(name: str, miou: float | None) -> dict:
    return {"name": name, "miou": miou, "pixel_accuracy": miou, "pixels": 10 if miou is not None else 0}


def test_eval_state_keeps_best_and_worst_disjoint_and_ordered():
    state = EvalState(confusion=None, official=None, k_best=2, k_worst=2)
    made = []
    for name, miou in [("a", 0.5), ("b", 0.9), ("c", None), ("d", 0.1), ("e", 0.9), ("f", 0.3)]:
        state.offer(_row(name, miou), lambda name=name, miou=miou: made.append(name) or {"name": name, "miou": miou})
    picks = state.picks()
    assert [p["name"] for p in picks["best"]] == ["b", "e"]  # ties: the earlier image first
    assert [p["name"] for p in picks["worst"]] == ["d", "f"]
    assert "c" not in made and [r["name"] for r in state.per_image] == list("abcdef")
    # Fewer images than 2k: the two groups never share an image.
    state = EvalState(confusion=None, official=None, k_best=2, k_worst=1)
    for name, miou in [("a", 0.5), ("b", 0.6), ("c", 0.7)]:
        state.offer(_row(name, miou), lambda name=name, miou=miou: {"name": name, "miou": miou})
    assert [p["name"] for p in state.picks()["best"]] == ["c", "b"]
    assert [p["name"] for p in state.picks()["worst"]] == ["a"]

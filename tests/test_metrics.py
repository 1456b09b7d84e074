"""Metrics against hand-computed fractions, an independent per-pixel reference, and the
official cityscapesscripts evaluation (run on the same PNG files)."""

from __future__ import annotations

import copy
import math
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.scenes import Numpy24Shim, flat_scores, make_scene
from urbanseg.errors import UserError
from urbanseg.evaluation import official as ce
from urbanseg.evaluation.metrics import ConfusionMatrix, format_table, image_scores
from urbanseg.labels import CATEGORIES, ID_TO_LABEL, get_label_set

# ----------------------------------------------------------------- confusion matrix

# Two images, 4 classes, ignore 255. Valid (gt, pred) pairs: (0,0) x2, (0,1), (0,255),
# (1,1) x3, (2,0); class 3 appears nowhere (n/a). Written out by hand:
#   class 0: tp 2, fp 1, fn 2 (one of them the 255 prediction)
#   class 1: tp 3, fp 1, fn 0
#   class 2: tp 0, fp 0, fn 1
HAND_GT = [np.array([[0, 0, 1], [1, 2, 255]]), np.array([[0, 0], [255, 1]])]
HAND_PRED = [np.array([[0, 1, 1], [1, 0, 2]]), np.array([[0, 255], [2, 1]])]
HAND = {
    "iou": [F(2, 5), F(3, 4), F(0), None],
    "precision": [F(2, 3), F(3, 4), F(0), None],
    "recall": [F(1, 2), F(1), F(0), None],
    "f1": [F(4, 7), F(6, 7), F(0), None],
}


def _hand_matrix(kind: str) -> ConfusionMatrix:
    cm = ConfusionMatrix(4)
    for p, t in zip(HAND_PRED, HAND_GT):
        cm.update(
            torch.from_numpy(p) if kind == "torch" else p.astype(np.uint8),
            torch.from_numpy(t) if kind == "torch" else t.astype(np.uint8),
        )
    return cm


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_hand_computed_exact_fractions(kind):
    cm = _hand_matrix(kind)
    np.testing.assert_array_equal(cm.matrix, [[2, 1, 0, 0], [0, 3, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    r = cm.compute()
    for key, expected in HAND.items():
        # a / b of exact integers is the correctly rounded float, as is float(Fraction).
        assert r["per_class"][key] == [None if e is None else float(e) for e in expected], key
    assert r["miou"] == pytest.approx(float(F(2, 5) + F(3, 4)) / 3, abs=1e-15)
    assert r["mean_f1"] == pytest.approx(float((F(4, 7) + F(6, 7)) / 3), abs=1e-15)
    assert r["pixel_accuracy"] == float(F(5, 8))
    assert r["mean_accuracy"] == pytest.approx(float((F(1, 2) + 1 + 0) / 3), abs=1e-15)
    assert (r["pixels"], r["invalid_predictions"], r["scored_classes"]) == (8, 1, 3)
    assert r["per_class"]["gt_pixels"] == [4, 3, 1, 0] and r["per_class"]["pred_pixels"] == [3, 4, 0, 0]


def test_format_table_layout_and_na_footnote():
    text = format_table(_hand_matrix("numpy").compute(), ["void", "flat", "sky", "human"])
    assert text.splitlines() == [
        "| class | iou | precision | recall | f1_score |",
        "|-|-|-|-|-|",
        "| void | 0.4000 | 0.6667 | 0.5000 | 0.5714 |",
        "| flat | 0.7500 | 0.7500 | 1.0000 | 0.8571 |",
        "| sky | 0.0000 | 0.0000 | 0.0000 | 0.0000 |",
        "| human | n/a | n/a | n/a | n/a |",
        "| average | 0.3833 | 0.4722 | 0.5000 | 0.4762 |",
        "",
        (
            "Averages over the 3 classes that are not n/a; n/a = absent from both ground truth and prediction: "
            "human. Scores are dataset-level (pixel counts summed over all images)."
        ),
    ]
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        format_table(_hand_matrix("numpy").compute(), ["a", "b", "c"])


def _slow_reference(preds, gts, c, ignore=255):
    """Per-pixel Python loop, written from the definitions without numpy tricks."""
    tp, gt_n, pred_n = [0] * c, [0] * c, [0] * c
    correct = total = 0
    for p_img, g_img in zip(preds, gts):
        for p, g in zip(p_img.ravel().tolist(), g_img.ravel().tolist()):
            if g == ignore:
                continue
            total += 1
            gt_n[g] += 1
            if 0 <= p < c:
                pred_n[p] += 1
            if p == g:
                tp[g] += 1
                correct += 1
    out = {k: [] for k in ("iou", "precision", "recall", "f1")}
    for k in range(c):
        fp, fn = pred_n[k] - tp[k], gt_n[k] - tp[k]
        if tp[k] + fp + fn == 0:
            for values in out.values():
                values.append(None)
            continue
        out["iou"].append(tp[k] / (tp[k] + fp + fn))
        out["precision"].append(tp[k] / (tp[k] + fp) if tp[k] + fp else 0.0)
        out["recall"].append(tp[k] / (tp[k] + fn) if tp[k] + fn else 0.0)
        p, r = out["precision"][-1], out["recall"][-1]
        out["f1"].append(2 * p * r / (p + r) if p + r else 0.0)
    return out, correct / total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_batches_match_slow_reference(seed):
    rng = np.random.default_rng(seed)
    c = 6
    gts = [rng.integers(0, c - 1, (n, 13, 17)) for n in (1, 3, 2)]  # class c-1 never in gt
    for g in gts:
        g[rng.random(g.shape) < 0.1] = 255
    preds = [np.where(rng.random(g.shape) < 0.6, g, rng.integers(0, c + 2, g.shape)) for g in gts]
    preds[0][0, 0, :3] = [-1, 255, 1000]  # out-of-range predictions: misses, nobody's fp
    cm = ConfusionMatrix(c)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    expected, accuracy = _slow_reference(preds, gts, c)
    r = cm.compute()
    for key, values in expected.items():
        assert r["per_class"][key] == pytest.approx(values, rel=1e-12), key
    assert r["pixel_accuracy"] == pytest.approx(accuracy, rel=1e-12)
    assert r["per_class"]["iou"][c - 1] == 0.0  # predicted but absent from gt: 0, not n/a


def test_dataset_level_differs_from_mean_of_per_image_scores():
    # Image A: 16 pixels, perfect. Image B: 2 pixels, class 1 missed.
    gt_a, pred_a = np.array([[0] * 8 + [1] * 8]), np.array([[0] * 8 + [1] * 8])
    gt_b, pred_b = np.array([[0, 1]]), np.array([[0, 0]])
    cm = ConfusionMatrix(2)
    cm.update(pred_a, gt_a)
    cm.update(pred_b, gt_b)
    # Summed counts: class 0 tp 9 fp 1 fn 0, class 1 tp 8 fp 0 fn 1.
    assert cm.compute()["miou"] == pytest.approx(float((F(9, 10) + F(8, 9)) / 2), abs=1e-15)
    per_image = [image_scores(p[None], g[None], 2)[0]["miou"] for p, g in ((pred_a, gt_a), (pred_b, gt_b))]
    assert per_image == [1.0, 0.25]
    # The original project's averaging: the small image weighs as much as the large one.
    assert np.mean(per_image) == 0.625 and cm.compute()["miou"] - 0.625 > 0.25


def test_image_scores_match_one_matrix_per_image_and_handle_empty_images():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 5, (4, 9, 11))
    pred = np.where(rng.random(gt.shape) < 0.5, gt, rng.integers(0, 5, gt.shape))
    gt[2] = 255  # nothing to score in image 2
    scores = image_scores(torch.from_numpy(pred), torch.from_numpy(gt), 5)
    for i, s in enumerate(scores):
        cm = ConfusionMatrix(5)
        cm.update(pred[i], gt[i])
        r = cm.compute()
        assert (s["miou"], s["pixel_accuracy"], s["pixels"]) == (r["miou"], r["pixel_accuracy"], r["pixels"])
    assert scores[2] == {"miou": None, "pixel_accuracy": None, "pixels": 0}
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        image_scores(pred[0], gt[0], 5)
    assert image_scores(pred[:0], gt[:0], 5) == []


def test_bad_ground_truth_and_shape_errors_name_the_values():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"values \[3, 7\] outside the class indices 0..2"):
        cm.update(np.zeros((2, 2), int), np.array([[0, 3], [7, 255]]))
    with pytest.raises(ValueError, match=r"shape \(2, 2\) differs from ground truth shape \(2, 3\)"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    assert cm.matrix.sum() == 0  # a rejected batch adds nothing
    with pytest.raises(ValueError, match="cannot merge a 4-class"):
        cm.merge(ConfusionMatrix(4))


def test_torch_counts_stay_on_device_and_equal_numpy():
    rng = np.random.default_rng(4)
    gt = rng.integers(0, 7, (2, 32, 48)).astype(np.uint8)
    pred = rng.integers(0, 7, (2, 32, 48)).astype(np.int64)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ref = ConfusionMatrix(7)
    ref.update(pred, gt)
    for device in devices:
        cm = ConfusionMatrix(7)
        cm.update(torch.from_numpy(pred).to(device), torch.from_numpy(gt).to(device))
        assert isinstance(cm._counts, torch.Tensor) and cm._counts.device.type == device
        cm.update(pred, gt)  # a numpy batch joins the tensor on its device
        np.testing.assert_array_equal(cm.matrix, 2 * ref.matrix)


def test_merge_equals_one_pass():
    rng = np.random.default_rng(5)
    batches = [(rng.integers(0, 4, (5, 6)), rng.integers(0, 4, (5, 6))) for _ in range(6)]
    whole, a, b = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    for i, (p, g) in enumerate(batches):
        whole.update(p, g)
        (a if i % 2 else b).update(torch.from_numpy(p) if i % 3 else p, g)
    assert a.merge(b).compute() == whole.compute()
    assert a.merge(ConfusionMatrix(4)).compute() == whole.compute()  # an empty one adds nothing


def _all_reduce_worker(rank, world_size, port, out_dir):
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cm = ConfusionMatrix(3)
        if rank == 0:  # rank 1 saw no images and must still take part
            cm.update(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(cm.all_reduce().matrix.tolist()))
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers start without re-importing torch (spawn takes seconds per process)
    mp.start_processes(_all_reduce_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    expected = [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)] == [expected, expected]
    assert ConfusionMatrix(3).all_reduce().matrix.sum() == 0  # not initialised: no-op


# ------------------------------------------------------- official Cityscapes scores


def _write_scenes(folder: Path, scenes, preds):
    """PNG files in the official layout; returns (prediction files, gt labelIds files)."""
    from PIL import Image

    pred_files, gt_files = [], []
    for i, ((gt, inst, _), pred) in enumerate(zip(scenes, preds)):
        stem = folder / f"city_000000_{i:06d}"
        Image.fromarray(gt).save(f"{stem}_gtFine_labelIds.png")
        Image.fromarray(inst.astype(np.uint16)).save(f"{stem}_gtFine_instanceIds.png")  # 16-bit, as gtFine
        Image.fromarray(pred).save(f"{stem}_pred.png")
        pred_files.append(f"{stem}_pred.png")
        gt_files.append(f"{stem}_gtFine_labelIds.png")
    return pred_files, gt_files


def _official(monkeypatch, pred_files, gt_files) -> dict:
    """evalPixelLevelSemanticLabeling on the files: its pure-Python path, numpy shimmed."""
    mod = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    monkeypatch.setattr(mod, "np", Numpy24Shim())  # restored by monkeypatch after the test
    monkeypatch.setattr(mod, "CSUPPORT", False)
    args = copy.copy(mod.args)
    args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, True
    return mod.evaluateImgLists(pred_files, gt_files, args)


def _assert_equal_scores(ours: dict, theirs: dict, names) -> None:
    for name in names:
        t = theirs[name]
        assert (ours[name] is None) == math.isnan(t), name
        if ours[name] is not None:
            assert abs(ours[name] - t) <= 1e-9, (name, ours[name], t)


def _compare(ours: dict, theirs: dict, levels) -> None:
    pairs = {
        "classes": [
            ("class_iou", "classScores", "mean_class_iou", "averageScoreClasses"),
            ("class_iiou", "classInstScores", "mean_class_iiou", "averageScoreInstClasses"),
        ],
        "categories": [
            ("category_iou", "categoryScores", "mean_category_iou", "averageScoreCategories"),
            ("category_iiou", "categoryInstScores", "mean_category_iiou", "averageScoreInstCategories"),
        ],
    }
    for level in levels:
        for key, official_key, mean_key, official_mean in pairs[level]:
            _assert_equal_scores(ours[key], theirs[official_key], ours[key])
            # every score the official script does not leave NaN is in ours
            assert {k for k, v in theirs[official_key].items() if not math.isnan(v)} <= set(ours[key])
            assert abs(ours[mean_key] - theirs[official_mean]) <= 1e-9
    assert ours["pixels"] == int(np.asarray(theirs["confMatrix"]).sum())


def test_avg_class_size_equals_official_script():
    mod = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    assert mod.args.avgClassSize == ce.AVG_CLASS_SIZE


def test_official_scores_equal_cityscapesscripts(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, h, w) for h, w in ((1024, 2048), (512, 1024), (300, 400))]
    preds = [s[2] for s in scenes]
    theirs = _official(monkeypatch, *_write_scenes(tmp_path, scenes, preds))
    evaluator = ce.OfficialEvaluator()
    for name in sorted(p.name for p in tmp_path.glob("*_labelIds.png")):
        gt, inst = ce.read_ground_truth(tmp_path / name)
        pred = np.asarray(__import__("PIL.Image").Image.open(tmp_path / name.replace("gtFine_labelIds", "pred")))
        evaluator.update(pred, gt, inst, name=name)
    ours = evaluator.compute()
    _compare(ours, theirs, ("classes", "categories"))
    np.testing.assert_array_equal(evaluator.confusion, np.asarray(theirs["confMatrix"]))
    # The scenes make every kind of value appear: NaN (train), 0 (bus: fp only), in between.
    assert ours["class_iou"]["train"] is None and ours["class_iou"]["bus"] == 0.0
    assert 0 < ours["mean_class_iiou"] < ours["mean_class_iou"] < 1
    assert ours["category_iiou"]["vehicle"] > ours["class_iiou"]["car"]  # car -> truck hits the category


@pytest.mark.parametrize("name", ["classes19", "categories8", "categories7"])
def test_label_set_predictions_equal_cityscapesscripts(tmp_path, monkeypatch, name):
    """A model's class indices, mapped by LabelSet.cityscapes_ids, scored at the levels
    the label set supports, equal the official script on the mapped PNGs."""
    label_set = get_label_set(name)
    rng = np.random.default_rng(1)
    scenes = [make_scene(rng, 256, 512, block=16) for _ in range(3)]
    classes = [label_set.labels_from_ids(s[2]) for s in scenes]  # 255 where a label is ignored
    lut = label_set.cityscapes_ids()
    theirs = _official(monkeypatch, *_write_scenes(tmp_path, scenes, [lut[c] for c in classes]))
    evaluator = ce.OfficialEvaluator(label_set)
    for (gt, inst, _), c in zip(scenes, classes):
        evaluator.update_classes(c, gt, inst)
    ours = evaluator.compute()
    _compare(ours, theirs, evaluator.levels)
    assert ("class_iou" in ours) == (name == "classes19")
    assert list(ours["category_iou"]) == list(CATEGORIES[1:])


def test_cityscapes_ids_of_each_label_set_and_levels():
    c19 = get_label_set("classes19").cityscapes_ids()
    for label in ID_TO_LABEL.values():
        if 0 <= label.trainId < 255:
            assert c19[label.trainId] == label.id
    assert c19[19] == c19[255] == 0  # no class: unlabeled, a miss
    c8 = get_label_set("categories8").cityscapes_ids()
    assert [ID_TO_LABEL[int(i)].name for i in c8[:8]] == [
        "unlabeled",
        "road",
        "building",
        "pole",
        "vegetation",
        "sky",
        "person",
        "car",
    ]
    c7 = get_label_set("categories7").cityscapes_ids()
    assert c7[:7].tolist() == c8[1:8].tolist()
    assert ce.official_levels(get_label_set("classes19")) == ("classes", "categories")
    assert ce.official_levels(get_label_set("categories8")) == ("categories",)
    colour_only = get_label_set("classes19").__class__("mine", ("a",), ((0, 0, 0),), None, (((0, 0, 0), 0),))
    with pytest.raises(UserError, match="colours only"):
        colour_only.cityscapes_ids()


def test_official_evaluator_errors_and_merge(tmp_path):
    rng = np.random.default_rng(2)
    gt, inst, pred = make_scene(rng, 64, 96, block=8)
    ev = ce.OfficialEvaluator()
    with pytest.raises(ValueError, match=r"predicted label ids in a.png holds ids \[40\]"):
        ev.update(np.where(pred == pred[0, 0], 40, pred), gt, inst, name="a.png")
    with pytest.raises(ValueError, match="upsample the prediction"):
        ev.update(pred[:10], gt, inst)
    bad = inst.copy()
    bad[:2, :2] = 7001  # an "instance" of road
    with pytest.raises(ValueError, match=r"labels without instances: \['road'\]"):
        ev.update(pred, gt, bad)
    with pytest.raises(UserError, match="missing_gtFine_instanceIds.png"):
        from PIL import Image

        Image.fromarray(gt).save(tmp_path / "missing_gtFine_labelIds.png")
        ce.read_ground_truth(tmp_path / "missing_gtFine_labelIds.png")
    assert ev.images == 0 and ev.confusion.sum() == 0  # rejected images add nothing
    halves = ce.OfficialEvaluator(), ce.OfficialEvaluator()
    for i in range(4):
        g, n, p = make_scene(rng, 64, 96, block=8)
        ev.update(p, g, n)
        halves[i % 2].update(p, g, n)
    merged, single = flat_scores(halves[0].merge(halves[1]).compute()), flat_scores(ev.compute())
    assert merged.keys() == single.keys() and single["images"] == 4
    for key, value in single.items():
        assert merged[key] == pytest.approx(value, abs=1e-12), key


def test_read_ground_truth_matches_pil_for_gray_16bit_and_palette(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(6)
    gt, inst, _ = make_scene(rng, 40, 60, block=8)
    palette = Image.fromarray(gt, mode="L").convert("P")  # same indices, stored with a palette
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    palette.save(tmp_path / "a_gtFine_labelIds.png")
    Image.fromarray(inst.astype(np.uint16)).save(tmp_path / "a_gtFine_instanceIds.png")
    ids, instances = ce.read_ground_truth(tmp_path / "a_gtFine_labelIds.png")
    assert ids.dtype == np.uint8 and instances.dtype == np.int32
    np.testing.assert_array_equal(ids, np.asarray(Image.open(tmp_path / "a_gtFine_labelIds.png")))
    np.testing.assert_array_equal(ids, gt)
    np.testing.assert_array_equal(instances, inst)
    Image.fromarray(np.dstack([gt] * 3)).save(tmp_path / "b_gtFine_labelIds.png")
    with pytest.raises(UserError, match=r"shape \(40, 60, 3\); expected one channel"):
        ce.read_ground_truth(tmp_path / "b_gtFine_labelIds.png")

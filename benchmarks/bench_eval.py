"""Official Cityscapes evaluation time per image: urbanseg.evaluation.official against
cityscapesscripts' evalPixelLevelSemanticLabeling (its pure-Python path), on the same
PNG files, in the same run, with the figures checked equal (1e-9).

    python benchmarks/bench_eval.py                    # 8 synthetic 2048x1024 scenes
    python benchmarks/bench_eval.py --images 20 --size 1024x512
    python benchmarks/bench_eval.py --data /path/to/cityscapes --split val --images 50

With --data, the ground truth is a real Cityscapes layout (gtFine/<split>/<city>/
*_gtFine_labelIds.png and *_gtFine_instanceIds.png) and the predictions are derived
from it (shifted, with random blocks and car -> truck swaps) so that the scores are not
trivial. Both sides read the same PNG files (the official script with PIL, ours with
OpenCV); "update only" is our time once the arrays are in memory. The two run image by
image in turn so that the varying load of a shared machine hits both alike. The official
script needs a shim for numpy >= 2.4 (np.in1d).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the scenes of the correctness test

from helpers.scenes import Numpy24Shim, corrupt_prediction, flat_scores, make_scene
from urbanseg.evaluation import official as ce


def make_files(folder: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(prediction PNG, gt labelIds PNG) pairs; writes predictions (and synthetic gt)."""
    rng = np.random.default_rng(0)
    pairs = []
    if args.data:
        gts = sorted((Path(args.data) / "gtFine" / args.split).glob("*/*_gtFine_labelIds.png"))[: args.images]
        if not gts:
            sys.exit(f"no *_gtFine_labelIds.png under {args.data}/gtFine/{args.split}/<city>/")
        for gt_path in gts:
            gt, inst = ce.read_ground_truth(gt_path)
            pred_path = folder / gt_path.name.replace("gtFine_labelIds", "pred")
            Image.fromarray(corrupt_prediction(rng, gt, inst)).save(pred_path)
            pairs.append((str(pred_path), str(gt_path)))
        return pairs
    w, h = (int(v) for v in args.size.split("x"))
    for i in range(args.images):
        gt, inst, pred = make_scene(rng, h, w)
        stem = folder / f"city_000000_{i:06d}"
        Image.fromarray(gt).save(f"{stem}_gtFine_labelIds.png")
        Image.fromarray(inst.astype(np.uint16)).save(f"{stem}_gtFine_instanceIds.png")
        Image.fromarray(pred).save(f"{stem}_pred.png")
        pairs.append((f"{stem}_pred.png", f"{stem}_gtFine_labelIds.png"))
    return pairs


def run_both(pairs: list[tuple[str, str]]) -> tuple[dict, dict, dict[str, list[float]]]:
    """Official evaluatePair and ours on each image in turn (interleaved, so a change in
    the load of a shared machine hits both), then each side's scoring. Returns (official
    scores, ours, per-image seconds: "official", "ours" (read + update), "update")."""
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as mod

    saved = mod.np, mod.CSUPPORT
    mod.np, mod.CSUPPORT = Numpy24Shim(), False
    try:
        args = copy.copy(mod.args)
        args.quiet, args.JSONOutput = True, False
        conf, inst_stats = mod.generateMatrix(args), mod.generateInstanceStats(args)
        evaluator, times = ce.OfficialEvaluator(), {"official": [], "ours": [], "update": []}
        for pred_path, gt_path in pairs:
            t0 = time.perf_counter()
            mod.evaluatePair(pred_path, gt_path, conf, inst_stats, {}, args)
            t1 = time.perf_counter()
            gt, inst = ce.read_ground_truth(gt_path)
            pred = ce._read_single_channel(Path(pred_path))
            t2 = time.perf_counter()
            evaluator.update(pred, gt, inst, name=pred_path)
            t3 = time.perf_counter()
            times["official"].append(t1 - t0)
            times["ours"].append(t3 - t1)
            times["update"].append(t3 - t2)
        return score_official(mod, conf, inst_stats, args), evaluator.compute(), times
    finally:
        mod.np, mod.CSUPPORT = saved


def score_official(mod, conf, inst_stats, args) -> dict:
    """The official scoring functions applied to the accumulated matrix and instance stats."""
    classes = {mod.id2label[l].name: mod.getIouScoreForLabel(l, conf, args) for l in args.evalLabels}
    inst = {mod.id2label[l].name: mod.getInstanceIouScoreForLabel(l, conf, inst_stats, args) for l in args.evalLabels}
    cats = {c: mod.getIouScoreForCategory(c, conf, args) for c in mod.category2labels}
    cat_inst = {c: mod.getInstanceIouScoreForCategory(c, conf, inst_stats, args) for c in mod.category2labels}
    return {
        "class_iou": classes,
        "class_iiou": inst,
        "category_iou": cats,
        "category_iiou": cat_inst,
        "mean_class_iou": mod.getScoreAverage(classes, args),
        "mean_class_iiou": mod.getScoreAverage(inst, args),
        "mean_category_iou": mod.getScoreAverage(cats, args),
        "mean_category_iiou": mod.getScoreAverage(cat_inst, args),
    }


def max_difference(ours: dict, theirs: dict) -> float:
    """Largest |ours - official| over every score ours reports; inf if a NaN disagrees."""
    worst = 0.0
    for key, value in flat_scores(ours).items():
        if "/" not in key and not key.startswith("mean_"):
            continue
        group, _, name = key.partition("/")
        t = theirs[group][name] if name else theirs[group]
        if (value is None) != math.isnan(t):
            return math.inf
        if value is not None:
            worst = max(worst, abs(value - t))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", default="2048x1024", help="synthetic scene size WxH")
    parser.add_argument("--data", help="a Cityscapes layout to take the ground truth from")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_files(Path(tmp), args)
        theirs, ours, times = run_both(pairs)
        h, w = np.asarray(Image.open(pairs[0][1])).shape
    diff = max_difference(ours, theirs)
    per = {k: 1000 * float(np.median(v)) for k, v in times.items()}
    source = args.data or "synthetic scenes"
    print(f"\n{len(pairs)} images {w}x{h} from {source}; median ms per image (read PNGs + evaluate)\n")
    print("| implementation | ms / image | speed-up over official (official ms / ours) |")
    print("|-|-|-|")
    print(f"| cityscapesscripts evalPixelLevelSemanticLabeling (Python path) | {per['official']:.1f} | 1.00 |")
    print(f"| urbanseg OfficialEvaluator (read + update) | {per['ours']:.1f} | {per['official'] / per['ours']:.2f}x |")
    print(
        f"| urbanseg OfficialEvaluator (update only, arrays in memory) | {per['update']:.1f} | "
        f"{per['official'] / per['update']:.2f}x |"
    )
    print(
        f"\nlargest |difference| over all class/category IoU and iIoU scores and means: {diff:.2e} "
        f"({'equal to 1e-9' if diff <= 1e-9 else 'NOT EQUAL'})"
    )
    print(
        f"mean class IoU {ours['mean_class_iou']:.4f}, class iIoU {ours['mean_class_iiou']:.4f}, "
        f"category IoU {ours['mean_category_iou']:.4f}, category iIoU {ours['mean_category_iiou']:.4f}"
    )
    if diff > 1e-9:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Test-time augmentation: the mIoU it gains on synthetic val and the time it costs, side
by side in one run (`urbanseg.inference.segment.TTA`, `--tta flip` / `--scales`).

Builds a small synthetic dataset and trains a model briefly (the `urbanseg demo --quick`
chain: synth -> prepare -> pack -> train) in a scratch folder, then segments the val split
through `urbanseg.inference.segment` as `evaluate --tta ...` does (the images as stored,
"native") with four settings: plain, flip, scales 0.75,1,1.25, both; and prints, per
setting, the mIoU (dataset-level, `ConfusionMatrix`), its gain over plain and the time
relative to plain. The settings run in turn within each repeat, so a change in the
machine's load hits them alike; the median time per setting is reported.

    python benchmarks/bench_tta.py                          # ~ demo --quick sizes
    python benchmarks/bench_tta.py --train 16 --val 6 --size 128x64 --iters 100 \
        --model unet-original --model-args '{"base_channels": 8}'          # small, on a loaded machine
    python benchmarks/bench_tta.py --out /tmp/tta --reuse   # keep and reuse the trained run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from urbanseg.config import PackConfig, PrepareConfig, SynthConfig, TrainConfig
from urbanseg.data.loader import ShardDataset
from urbanseg.data.pack import pack
from urbanseg.data.prepare import prepare
from urbanseg.evaluation.metrics import ConfusionMatrix
from urbanseg.inference.predictor import TorchPredictor
from urbanseg.inference.segment import TTA, segment
from urbanseg.synth import synthesize

SETTINGS = {
    "plain": TTA(),
    "flip": TTA(flip=True),
    "scales 0.75,1,1.25": TTA((0.75, 1.0, 1.25)),
    "flip + scales 0.75,1,1.25": TTA((0.75, 1.0, 1.25), flip=True),
}


def build(out: Path, args: argparse.Namespace) -> Path:
    """Synthetic scenes -> prepared pairs -> shards -> a briefly trained run; returns best.pt."""
    from urbanseg.training.train import train

    data, prepared, shards, run = out / "data", out / "prepared", out / "shards", out / "run"
    best = run / "best.pt"
    if args.reuse and best.is_file():
        return best
    w, h = (int(v) for v in args.size.split("x"))
    synthesize(SynthConfig(out=data, train=args.train, val=args.val, size=f"{2 * w}x{2 * h}", seed=0, workers=0))
    prepare(PrepareConfig(data=data, out=prepared, size=args.size, splits=["train", "val"], workers=0))
    pack(PackConfig(prepared=prepared, out=shards, shards=2, splits=["train", "val"]))
    config = TrainConfig(
        data=shards,
        run=run,
        model=args.model,
        model_args=args.model_args,
        iters=args.iters,
        batch_size=8,
        lr=args.lr,
        seed=0,
        val_every=max(args.iters // 2, 1),
        workers=1,
    )
    if train(config) != 0:
        raise SystemExit("training failed; see above")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=24, help="synthetic training scenes")
    parser.add_argument("--val", type=int, default=8, help="synthetic val scenes (the scored set)")
    parser.add_argument("--size", default="256x128", help="prepared size WxH (scenes are rendered at twice it)")
    parser.add_argument("--iters", type=int, default=150, help="training steps")
    parser.add_argument("--model", default=None, help="architecture (default: urbanseg's default model)")
    parser.add_argument(
        "--model-args", default="", help="its create_model arguments as JSON, e.g. '{\"base_channels\": 8}'"
    )
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: train's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per setting (the median is shown)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    parser.add_argument("--out", type=Path, help="scratch folder to keep (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="with --out: reuse its trained run")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_tta_") as tmp:
        out = args.out or Path(tmp)
        ckpt = build(out, args)
        predictor = TorchPredictor(ckpt, "cpu")
        items = list(ShardDataset(out / "shards", "val"))
        images = [item["image"].permute(1, 2, 0).numpy() for item in items]
        labels = [item["label"].numpy() for item in items]
        results = run_settings(predictor, images, labels, args.repeats)
    print_table(results, predictor, images, args)


def run_settings(predictor, images, labels, repeats: int) -> dict[str, dict]:
    """mIoU and median seconds of each setting over the images; the settings interleave."""
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    miou: dict[str, float] = {}
    segment(predictor, images[:1], mode="native")  # warm-up (first-call allocations)
    for _ in range(repeats):
        for name, tta in SETTINGS.items():
            start = time.perf_counter()
            preds = segment(predictor, images, mode="native", tta=tta, batch_size=4)
            times[name].append(time.perf_counter() - start)
            cm = ConfusionMatrix(predictor.label_set.num_classes, predictor.label_set.ignore_index)
            for pred, gt in zip(preds, labels):
                cm.update(pred, gt)
            miou[name] = cm.compute()["miou"]
    return {name: {"miou": miou[name], "seconds": statistics.median(times[name])} for name in SETTINGS}


def print_table(results: dict[str, dict], predictor, images, args: argparse.Namespace) -> None:
    h, w = images[0].shape[:2]
    model = (predictor.info.get("model") or {}).get("name", "?")
    plain = results["plain"]
    print(
        f"\n{model} trained {args.iters} steps on {args.train} synthetic scenes; {len(images)} val images "
        f"{w}x{h}, PyTorch on the CPU ({args.threads} threads), median of {args.repeats}\n"
    )
    print("| TTA | views | mIoU | gain over plain | s per image | time / plain |")
    print("|-|-|-|-|-|-|")
    for name, r in results.items():
        views = len(SETTINGS[name].views())
        gain = r["miou"] - plain["miou"]
        print(
            f"| {name} | {views} | {r['miou']:.4f} | {gain:+.4f} | {r['seconds'] / len(images):.3f} | "
            f"{r['seconds'] / plain['seconds']:.2f}x |"
        )


if __name__ == "__main__":
    main()

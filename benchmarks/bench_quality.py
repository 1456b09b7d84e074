"""Quality at equal CPU time: unet-original and the fast models trained on the same
synthetic data for the same CPU budget, evaluated on the same validation split.

1. Data: `urbanseg synth` scenes -> `prepare` at 512x256 -> `pack` (cached in --work).
2. Candidates: models whose batch-1 CPU inference at 512x256 is >= 20x faster than
   unet-original (measured side by side here, or read from model_figures.json).
3. Each model: a few timed training steps give its CPU seconds per step; it then trains
   `urbanseg train --iters budget/step-cost` (one thread, the full LR schedule inside
   the budget) in a subprocess whose CPU time is recorded.
4. Each best.pt is scored on the val split (dataset-level ConfusionMatrix); the mIoU tables
   and a summary are printed; the best eligible model is the recommended default.

    python benchmarks/bench_quality.py --budget 240            # ~5 min per model
    python benchmarks/bench_quality.py --models lraspp-mobilenetv3 fpn-mobilenetv4 --budget 60
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from urbanseg.config import parse_size

BASE = "unet-original"
REQUIRED_SPEEDUP = 20.0


def make_data(work: Path, train: int, val: int, size: str) -> Path:
    from urbanseg.config import PackConfig, PrepareConfig, SynthConfig
    from urbanseg.data.pack import pack
    from urbanseg.data.prepare import prepare
    from urbanseg.synth import synthesize

    shards = work / "shards"
    if (shards / "val" / "spec.json").is_file():
        return shards
    w, h = parse_size(size)
    synthesize(SynthConfig(out=work / "raw", train=train, val=val, size=f"{2 * w}x{2 * h}", seed=0))
    prepare(PrepareConfig(data=work / "raw", out=work / "prepared", size=size, splits=["train", "val"]))
    pack(PackConfig(prepared=work / "prepared", out=shards, shards=4, splits=["train", "val"]))
    return shards


def speedups(names: list[str]) -> dict[str, float]:
    """Inference speed-up over unet-original at 512x256 (batch 1, one thread)."""
    from urbanseg.models.latency import measure_latency
    from urbanseg.models.listing import load_figures

    figures = (load_figures() or {}).get("latency_ms", {}).get("512x256")
    if not figures or not all(n in figures for n in [BASE, *names]):
        figures = measure_latency([BASE, *names], (512, 256), repeats=3)
    return {n: figures[BASE] / figures[n] for n in names}


def seconds_per_step(shards: Path, name: str, batch: int, steps: int = 3) -> float:
    """CPU seconds of one real training step (data loading included), after a warm-up step."""
    from urbanseg.config import TrainConfig
    from urbanseg.training.distributed import DistInfo
    from urbanseg.training.loop import make_loader, train_step
    from urbanseg.training.train import resolve_config, setup
    from urbanseg.training.trainer import LoopState

    config = resolve_config(
        TrainConfig(
            data=shards, run=Path("/nonexistent"), model=name, batch_size=batch, workers=0, threads=1, iters=1000
        )
    )
    t = setup(config, DistInfo(), torch.device("cpu"))
    it = iter(make_loader(t, "train", LoopState()))
    start = time.process_time()
    train_step(t, next(it), False)
    if time.process_time() - start > 10:  # a slow model: one more step is precise enough
        steps = 1
    start = time.process_time()
    for _ in range(steps):
        train_step(t, next(it), False)
    return (time.process_time() - start) / steps


def train(shards: Path, run: Path, name: str, iters: int, batch: int) -> tuple[float, float]:
    """Train in a subprocess; returns (its CPU seconds, wall seconds)."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "urbanseg",
        "train",
        "--data",
        str(shards),
        "--run",
        str(run),
        "--model",
        name,
        "--iters",
        str(iters),
        "--batch-size",
        str(batch),
        "--workers",
        "0",
        "--threads",
        "1",
        "--val-every",
        str(max(1, iters // 4)),
        "--log-every",
        "5",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, time.perf_counter() - start


@torch.no_grad()
def evaluate(shards: Path, checkpoint: Path) -> dict:
    """Dataset-level scores of `checkpoint` on the val split."""
    from urbanseg.checkpoint import load_checkpoint, model_from_checkpoint
    from urbanseg.data.loader import build_loader
    from urbanseg.evaluation.metrics import ConfusionMatrix

    model = model_from_checkpoint(load_checkpoint(checkpoint))
    cm = ConfusionMatrix(model.num_classes)
    for batch in build_loader(shards, "val", batch_size=4, train=False, workers=0):
        cm.update(model(batch["image"].float()).argmax(1), batch["label"])
    return cm.compute()


def main() -> None:
    from urbanseg.evaluation.metrics import format_table
    from urbanseg.models import DEFAULT_MODEL, MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=240, help="training CPU seconds per model")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: every eligible model")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_quality"), help="data and runs go here")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", default="512x256", help="training image size WxH (inference speed: 512x256)")
    parser.add_argument("--train", type=int, default=60, help="synthetic training scenes")
    parser.add_argument("--val", type=int, default=16, help="synthetic validation scenes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards = make_data(args.work, args.train, args.val, args.size)
    others = [n for n in (args.models or MODELS) if n != BASE]
    fast = speedups(others)
    names = [BASE] + [n for n in others if args.models or fast[n] >= REQUIRED_SPEEDUP]
    rows, results = [], {}
    for name in names:
        cost = seconds_per_step(shards, name, args.batch_size)
        iters = max(1, int(args.budget / cost))
        run = args.work / "runs" / f"{name}-{int(time.time())}"
        cpu, wall = train(shards, run, name, iters, args.batch_size)
        results[name] = evaluate(shards, run / "best.pt")
        rows.append((name, fast.get(name, 1.0), cost, iters, cpu, wall, results[name]["miou"]))
        print(f"{name}: {iters} steps, {cpu:.0f} CPU s, val mIoU {results[name]['miou']:.4f}", flush=True)
    from urbanseg.labels import get_label_set

    classes = get_label_set("categories8").classes
    for name in names:
        print(f"\n### {name}\n\n{format_table(results[name], classes)}")
    print(
        f"\nbudget {args.budget:.0f} CPU s per model (1 thread), batch {args.batch_size}, {args.size}, "
        f"{args.train} train / {args.val} val synthetic scenes\n"
    )
    print(
        "| model | inference x unet-original | CPU s/step | steps | train CPU s (with start-up, val) | wall s "
        "| val mIoU |"
    )
    print("|-|-|-|-|-|-|-|")
    for name, speed, cost, iters, cpu, wall, miou in rows:
        mark = " (current default)" if name == DEFAULT_MODEL else ""
        print(f"| {name}{mark} | {speed:.1f} | {cost:.2f} | {iters} | {cpu:.0f} | {wall:.0f} | {miou:.4f} |")
    eligible = [r for r in rows if r[1] >= REQUIRED_SPEEDUP]
    if eligible:
        best = max(eligible, key=lambda r: r[6])
        print(
            f"\nrecommended default: {best[0]} (best val mIoU {best[6]:.4f} among models >= "
            f"{REQUIRED_SPEEDUP:.0f}x faster than {BASE} at inference)"
        )


if __name__ == "__main__":
    main()

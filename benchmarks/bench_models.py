"""CPU inference latency of every model in urbanseg.models.MODELS, batch 1, side by side.

Times all models round-robin in one run (so machine load hits them alike), at 512x256
(the training size) and 2048x1024 (full Cityscapes), prints a table with each model's
speed-up over unet-original, and writes the figures to src/urbanseg/model_figures.json,
which `urbanseg models` prints.

    python benchmarks/bench_models.py                 # all sizes, write the JSON
    python benchmarks/bench_models.py --sizes 512x256 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch

from urbanseg.config import parse_size
from urbanseg.models import DEFAULT_MODEL, MODELS, model_stats
from urbanseg.models.latency import measure_latency
from urbanseg.models.listing import FIGURES_PATH
from urbanseg.util import atomic_write_text

BASE = "unet-original"
REQUIRED_SPEEDUP = 20.0  # issue 3: the default model must be >= 20x faster than unet-original


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {threads} thread(s) of {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512x256", "2048x1024"], help="input sizes WxH")
    parser.add_argument(
        "--repeats", nargs="+", type=int, default=[7, 2], help="timed passes per model for each size (median reported)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per model (1: stable ratios on a shared machine)"
    )
    parser.add_argument("--no-write", action="store_true", help=f"do not update {FIGURES_PATH.name}")
    args = parser.parse_args()
    names = args.models if BASE in args.models else [BASE, *args.models]

    figures: dict[str, dict] = {n: {} for n in names}
    repeats_per_size = dict(zip(args.sizes, args.repeats + args.repeats[-1:] * len(args.sizes), strict=False))
    for size_text, repeats in repeats_per_size.items():
        size = parse_size(size_text)
        ms = measure_latency(names, size, repeats=repeats, threads=args.threads, desc=f"latency {size_text}")
        for n in names:
            figures[n][size_text] = {"ms": round(ms[n], 2), "speedup": round(ms[BASE] / ms[n], 2)}

    first = args.sizes[0]
    print(
        f"\nCPU latency, batch 1, median; speed-up = {BASE} ms / model ms in the same run ({machine(args.threads)})\n"
    )
    head = " | ".join(f"ms @ {s} | x @ {s}" for s in args.sizes)
    print(f"| model | params (M) | GFLOPs @ {first} | {head} | >= {REQUIRED_SPEEDUP:.0f}x @ {first} |")
    print("|-|-|-|" + "-|-|" * len(args.sizes) + "-|")
    for n in names:
        params, flops = model_stats(n, parse_size(first))
        cells = " | ".join(f"{figures[n][s]['ms']:.0f} | {figures[n][s]['speedup']:.1f}" for s in args.sizes)
        ok = "yes" if figures[n][first]["speedup"] >= REQUIRED_SPEEDUP else "no"
        mark = " (default)" if n == DEFAULT_MODEL else ""
        print(f"| {n}{mark} | {params / 1e6:.2f} | {flops / 1e9:.2f} | {cells} | {ok} |")

    if not args.no_write:
        # Merge into earlier figures (each ratio is still taken within one run).
        old = json.loads(FIGURES_PATH.read_text())["models"] if FIGURES_PATH.exists() else {}
        for n in names:
            figures[n] = {**old.get(n, {}), **figures[n]}
        data = {
            "measured": datetime.date.today().isoformat(),
            "machine": machine(args.threads),
            "batch": 1,
            "threads": args.threads,
            "repeats": repeats_per_size,
            "baseline": BASE,
            "models": {**old, **figures},
        }
        atomic_write_text(FIGURES_PATH, json.dumps(data, indent=2) + "\n")
        print(f"\nwrote {FIGURES_PATH}")


if __name__ == "__main__":
    main()

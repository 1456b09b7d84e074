"""urbanseg's training loader against the original project's tf.data pipeline, side by side.

The original fed training with (tf.data, TensorFlow's own reader of the same shards):

    TFRecordDataset(shards) -> map(parse Example, decode_png image and label, random
    horizontal flip of both, cast the image to float32, num_parallel_calls=2) -> batch(16)
    -> prefetch(AUTOTUNE)

measured here against `urbanseg.data.build_loader` on the same shards with 2 workers and
batch 16, doing the same work: decode, random flip (augment = flip only), the image to
float32 in the main process per batch (where the trainer does it, on its device); and
urbanseg's full default augmentation next to it. Shards are built first: `urbanseg synth`
scenes -> `prepare` at 512x256 -> `pack` (or `--shards` for an existing folder).

    python benchmarks/bench_loader_vs_tfdata.py                 # 128 scenes, 5 rounds
    python benchmarks/bench_loader_vs_tfdata.py --images 256 --rounds 7
    python benchmarks/bench_loader_vs_tfdata.py --shards /path/to/shards

Each pipeline lives in a process of its own (TensorFlow's thread pools and DataLoader's
forked workers must not share a process), is built once and warmed up, then the pipelines
take turns, one round of `--epochs` epochs each, so the load of a shared machine hits them
alike; the table gives each pipeline's median round and its ratio to tf.data. Compare
ratios, not times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
PIPELINES = ("tfdata", "urbanseg-flip", "urbanseg-default")
TITLES = {
    "tfdata": "original tf.data: decode + flip + float, 2 parallel calls",
    "urbanseg-flip": "urbanseg: decode + flip + float, 2 workers",
    "urbanseg-default": "urbanseg: decode + default augmentation + float, 2 workers",
}
FLIP_ONLY = {"scale": (1.0, 1.0), "flip": 0.5, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def build_shards(root: Path, images: int) -> Path:
    from urbanseg.cli import main

    raw, prepared, shards = root / "raw", root / "prepared", root / "shards"
    steps = [
        ["synth", "--out", str(raw), "--train", str(images), "--val", "0", "--size", "1024x512"],
        ["prepare", "--data", str(raw), "--out", str(prepared), "--size", "512x256", "--splits", "train"],
        ["pack", "--prepared", str(prepared), "--out", str(shards), "--shards", "4", "--splits", "train"],
    ]
    for argv in steps:
        if main(argv) != 0:
            sys.exit(f"failed: urbanseg {' '.join(argv)}")
    return shards


# ----------------------------------------------------------------------------- pipelines


def tfdata_epochs(shards: Path, batch_size: int, parallel: int):
    """The original project's input pipeline over `shards`/train, as a function running
    `epochs` epochs and returning the samples seen."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    features = {"image_data": tf.io.FixedLenFeature([], tf.string), "label_data": tf.io.FixedLenFeature([], tf.string)}

    def parse(record):
        example = tf.io.parse_single_example(record, features)
        image = tf.io.decode_png(example["image_data"], channels=3)
        label = tf.io.decode_png(example["label_data"], channels=1)
        flip = tf.random.uniform(()) < 0.5
        image, label = tf.cond(
            flip, lambda: (tf.image.flip_left_right(image), tf.image.flip_left_right(label)), lambda: (image, label)
        )
        return tf.cast(image, tf.float32), label

    files = sorted(str(p) for p in (shards / "train").glob("*.tfrecord"))
    dataset = (
        tf.data.TFRecordDataset(files)
        .map(parse, num_parallel_calls=parallel)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )

    def run(epochs: int) -> int:
        n = 0
        for _ in range(epochs):
            for image, _label in dataset:
                n += int(image.shape[0])
        return n

    return run


def urbanseg_epochs(shards: Path, batch_size: int, workers: int, augment):
    """build_loader over `shards`/train; the image batch becomes float32 here, as the
    trainer does after moving it to its device, with one thread (tf.data casts each sample
    on one of its map threads; two intra-op threads here would fight the workers for the
    two cores)."""
    import torch

    from urbanseg.data.loader import build_loader

    torch.set_num_threads(1)

    loader = build_loader(shards, "train", batch_size=batch_size, train=True, workers=workers, augment=augment)
    state = {"epoch": 0}

    def run(epochs: int) -> int:
        n = 0
        for _ in range(epochs):
            loader.sampler.set_epoch(state["epoch"])
            state["epoch"] += 1
            for batch in loader:
                image = batch["image"].float()
                n += int(image.shape[0])
        return n

    return run


def serve(args: argparse.Namespace) -> None:
    """A pipeline process: build, warm up, then on each stdin line "N" run N epochs and
    print {"samples", "seconds"} as one JSON line."""
    if args.serve == "tfdata":
        run = tfdata_epochs(args.shards, args.batch_size, args.workers)
    else:
        augment = FLIP_ONLY if args.serve == "urbanseg-flip" else None
        run = urbanseg_epochs(args.shards, args.batch_size, args.workers, augment)
    run(1)  # start-up: workers, thread pools, page cache
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        n = run(int(line))
        print(json.dumps({"samples": n, "seconds": time.perf_counter() - start}), flush=True)


# ----------------------------------------------------------------------------- coordinator


def measure(shards: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    procs = {}
    for name in args.pipelines:
        argv = [sys.executable, str(HERE), "--serve", name, "--shards", str(shards)]
        argv += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        procs[name] = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for name, p in procs.items():  # built and warmed up one at a time, then all wait
        assert p.stdout is not None
        if not json.loads(p.stdout.readline() or "{}").get("ready"):
            sys.exit(f"pipeline {name} failed to start")
    rates: dict[str, list[float]] = {name: [] for name in procs}
    try:
        for _ in range(args.rounds):
            for name, p in procs.items():
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write(f"{args.epochs}\n")
                p.stdin.flush()
                done = json.loads(p.stdout.readline())
                rates[name].append(done["samples"] / done["seconds"])
    finally:
        for p in procs.values():
            if p.stdin is not None:
                p.stdin.close()
            p.wait(timeout=60)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="synthetic scenes to build (without --shards)")
    parser.add_argument("--shards", type=Path, help="an existing shard folder with a train split")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per pipeline per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = tf.data parallel calls")
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    parser.add_argument("--serve", choices=PIPELINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or build_shards(Path(tmp), args.images)
        rates = measure(shards, args)
    load = os.getloadavg()
    base = statistics.median(rates["tfdata"]) if "tfdata" in rates else None
    print(
        f"\nloader, 512x256, batch {args.batch_size}, {args.workers} workers / parallel calls, median of "
        f"{args.rounds} rounds of {args.epochs} epochs; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print("| pipeline | samples/s | x tf.data | rounds |\n|-|-|-|-|")
    for name, values in rates.items():
        median = statistics.median(values)
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"| {TITLES[name]} | {median:.0f} | {ratio} | {' '.join(f'{v:.0f}' for v in values)} |")


if __name__ == "__main__":
    main()

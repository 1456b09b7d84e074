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

    def run(epochs: int) -> tuple[int, float]:
        n, cpu = 0, time.process_time()
        for _ in range(epochs):
            for image, _label in dataset:
                n += int(image.shape[0])
        return n, time.process_time() - cpu  # every tf.data thread is in this process

    return run


def tfdata_on_a_flipped_byte(shards: Path) -> str:
    """What tf.data does with a copy of the first shard with one byte of its second record's
    data flipped: whether TensorFlow checks the data CRC (it does: DataLossError)."""
    import shutil

    import tensorflow as tf

    from urbanseg.data import tfrecord

    shard = sorted((shards / "train").glob("*.tfrecord"))[0]
    offset = int(tfrecord.read_index(shard)[1, 0])
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / shard.name
        shutil.copy(shard, copy)
        data = bytearray(copy.read_bytes())
        data[offset + 16 + 1000] ^= 1  # inside the record's data, after its 12-byte header
        copy.write_bytes(bytes(data))
        try:
            n = sum(1 for _ in tf.data.TFRecordDataset([str(copy)]))
        except tf.errors.DataLossError as e:
            return f"DataLossError: {e.message.split(' [Op')[0].split('}} ')[-1]}"
    return f"no error: read {n} records"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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

    def workers_cpu() -> float:
        iterator = loader._iterator  # persistent workers: made by the first epoch
        return sum(_cpu_seconds(w.pid) for w in iterator._workers) if iterator is not None else 0.0

    def run(epochs: int) -> tuple[int, float]:
        n, cpu = 0, time.process_time() + workers_cpu()
        for _ in range(epochs):
            loader.sampler.set_epoch(state["epoch"])
            state["epoch"] += 1
            for batch in loader:
                image = batch["image"].float()
                n += int(image.shape[0])
        return n, time.process_time() + workers_cpu() - cpu

    return run


def serve(args: argparse.Namespace) -> None:
    """A pipeline process: build, warm up, then on each stdin line "N" run N epochs and
    print {"samples", "seconds", "cpu": CPU seconds of all its processes} as one JSON line."""
    if args.serve == "tfdata":
        import tensorflow as tf

        run = tfdata_epochs(args.shards, args.batch_size, args.workers)
        about = f"TensorFlow {tf.__version__}; one flipped byte in a record: {tfdata_on_a_flipped_byte(args.shards)}"
    else:
        import torch

        try:
            from urbanseg.data.pixels import PNG_DECODER
        except ImportError:  # urbanseg before the decoder choice: OpenCV
            PNG_DECODER = "opencv"

        augment = FLIP_ONLY if args.serve == "urbanseg-flip" else None
        run = urbanseg_epochs(args.shards, args.batch_size, args.workers, augment)
        about = f"PyTorch {torch.__version__}, PNG decoder {PNG_DECODER}"
    run(1)  # start-up: workers, thread pools, page cache
    print(json.dumps({"ready": True, "about": about}), flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        n, cpu = run(int(line))
        print(json.dumps({"samples": n, "seconds": time.perf_counter() - start, "cpu": cpu}), flush=True)


# ----------------------------------------------------------------------------- coordinator


def measure(shards: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Start the pipelines, then `args.rounds` rounds of `args.epochs` epochs each, in turn."""
    procs = {}
    for name in args.pipelines:
        argv = [sys.executable, str(HERE), "--serve", name, "--shards", str(shards)]
        argv += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        procs[name] = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for name, p in procs.items():  # built and warmed up one at a time, then all wait
        assert p.stdout is not None
        ready = json.loads(p.stdout.readline() or "{}")
        if not ready.get("ready"):
            hint = " (is tensorflow-cpu installed? pip install -e '.[test]')" if name == "tfdata" else ""
            sys.exit(f"pipeline {name} failed to start{hint}; its error is above")
        print(f"{name}: {ready['about']}", file=sys.stderr)
        if "decoder opencv" in ready["about"]:
            print(
                "  warning: kornia-rs is not installed (pip install -e .): urbanseg decodes with OpenCV",
                file=sys.stderr,
            )
    rounds: dict[str, list[dict]] = {name: [] for name in procs}
    try:
        for _ in range(args.rounds):
            for name, p in procs.items():
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write(f"{args.epochs}\n")
                p.stdin.flush()
                rounds[name].append(json.loads(p.stdout.readline()))
    finally:
        for p in procs.values():
            if p.stdin is not None:
                p.stdin.close()
            p.wait(timeout=60)
    return rounds


def table(rounds: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: median samples/s, its ratio to tf.data's, the median of the per-round
    ratios (each round runs the pipelines back to back, so it shares their load), CPU ms
    per sample over all of a pipeline's processes, and every round's samples/s."""
    rate = {name: [r["samples"] / r["seconds"] for r in rs] for name, rs in rounds.items()}
    base = rate.get("tfdata")
    rows = ["| pipeline | samples/s | x tf.data | x tf.data, per round | CPU ms/sample | rounds (samples/s) |"]
    rows.append("|-|-|-|-|-|-|")
    for name, values in rate.items():
        median = statistics.median(values)
        ratio = per_round = "-"
        if base:
            ratio = f"{median / statistics.median(base):.2f}x"
            per_round = f"{statistics.median(v / b for v, b in zip(values, base)):.2f}x"
        cpu = statistics.median(1000 * r["cpu"] / r["samples"] for r in rounds[name])
        rows.append(
            f"| {TITLES[name]} | {median:.0f} | {ratio} | {per_round} | {cpu:.2f} | "
            f"{' '.join(f'{v:.0f}' for v in values)} |"
        )
    return rows


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
        load_before = os.getloadavg()[0]
        rounds = measure(shards, args)
    load = os.getloadavg()
    print(
        f"\nloader, 512x256, batch {args.batch_size}, {args.workers} workers / parallel calls, median of "
        f"{args.rounds} rounds of {args.epochs} epochs; load average {load_before:.1f} before, "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} after (1, 5, 15 min; this run itself adds about "
        f"{args.workers + 1})"
    )
    print("\n".join(table(rounds)))


if __name__ == "__main__":
    main()

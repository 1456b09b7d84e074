"""Training-loader throughput at 512x256, measured side by side in one run:

1. augmented samples/s through `build_loader(train=True)` with 0, 1 and 2 DataLoader
   workers (0 workers both with PyTorch's default thread count and with one thread, and
   for reference without augmentation), on shards it builds itself: `urbanseg synth`
   scenes -> `prepare` at 512x256 -> `pack`;
2. the per-sample steps: CRC-checked record read, PNG decoding, the whole augmentation,
   and the ops where torchvision and OpenCV compete (resize, hue), to justify the choices
   in urbanseg/transforms.py.

    python benchmarks/bench_loader.py                  # 32 synthetic scenes, 4 rounds
    python benchmarks/bench_loader.py --images 64 --rounds 6 --batch-size 8
    python benchmarks/bench_loader.py --shards /path/to/shards   # existing `urbanseg pack` output

Loaders are built once (persistent workers, start-up excluded) and measured in
interleaved rounds of one epoch each, so the load of a shared machine hits every
configuration alike; the table gives the median round. Compare ratios, not times across
runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


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


def epoch_rate(loader, epoch: int) -> float:
    """Samples per second over one epoch of `loader` (batches fully materialised)."""
    loader.sampler.set_epoch(epoch)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["id"])
    return n / (time.perf_counter() - start)


def loader_table(shards: Path, rounds: int, batch_size: int) -> list[tuple[str, float]]:
    """Median samples/s per configuration: (workers, augment, torch threads in this process;
    None keeps PyTorch's default). Workers always run single-threaded (PyTorch's choice)."""
    import torch

    from urbanseg.data.loader import build_loader

    default = torch.get_num_threads()
    configs = {
        f"augmented, 0 workers ({default} torch threads)": (0, None, None),
        "augmented, 0 workers (1 torch thread)": (0, None, 1),
        "augmented, 1 worker": (1, None, None),
        "augmented, 2 workers": (2, None, None),
        f"no augmentation, 0 workers ({default} torch threads)": (0, False, None),
    }
    loaders = {
        name: build_loader(shards, "train", batch_size=batch_size, train=True, workers=w, augment=aug)
        for name, (w, aug, _) in configs.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(rounds + 1):  # round 0 starts the workers and warms the page cache
        for name, loader in loaders.items():
            torch.set_num_threads(configs[name][2] or default)
            rate = epoch_rate(loader, r)
            torch.set_num_threads(default)
            if r:
                rates[name].append(rate)
    return [(name, statistics.median(v)) for name, v in rates.items()]


def best_ms(fn, repeat: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def step_table(shards: Path) -> list[tuple[str, float]]:
    import cv2
    import numpy as np
    import torch
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    from urbanseg.data import tfrecord as records
    from urbanseg.data.loader import ShardDataset
    from urbanseg.data.transforms import TrainTransform, shift_hue

    torch.set_num_threads(1)  # as in a DataLoader worker
    cv2.setNumThreads(1)
    ds = ShardDataset(shards, "train")
    ex = ds.read_example(1)  # every step below works on this one record
    item = ds[1]
    image, label = item["image"], item["label"].to(torch.uint8)
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    t = TrainTransform()
    g = torch.Generator()
    rows = [
        ("read record + CRC checks + parse Example", best_ms(lambda: ds.read_example(1))),
        (
            "  of which CRC32C of the record",
            best_ms(lambda: records.masked_crc(ex["image_data"][0] + ex["label_data"][0])),
        ),
        (
            "decode image PNG (cv2.imdecode)",
            best_ms(lambda: cv2.imdecode(np.frombuffer(ex["image_data"][0], np.uint8), cv2.IMREAD_COLOR_RGB)),
        ),
        (
            "decode label PNG (cv2.imdecode)",
            best_ms(lambda: cv2.imdecode(np.frombuffer(ex["label_data"][0], np.uint8), cv2.IMREAD_UNCHANGED)),
        ),
        ("dataset[i] without augmentation (all of the above)", best_ms(lambda: ds[1])),
        ("TrainTransform (defaults), per sample", best_ms(lambda: t(image, label, g.manual_seed(3)))),
    ]
    for zoom in (0.6, 1.5):
        size = [round(256 * zoom), round(512 * zoom)]
        rows += [
            (
                f"resize image {zoom}x: torchvision bilinear+antialias (used)",
                best_ms(lambda size=size: F.resize(image, size, antialias=True)),
            ),
            (
                f"resize image {zoom}x: cv2 INTER_LINEAR (aliases when shrinking)",
                best_ms(lambda size=size: cv2.resize(hwc, size[::-1])),
            ),
            (
                f"resize image {zoom}x: cv2 INTER_AREA",
                best_ms(lambda size=size: cv2.resize(hwc, size[::-1], interpolation=cv2.INTER_AREA)),
            ),
            (
                f"resize label {zoom}x: torchvision NEAREST_EXACT (used)",
                best_ms(lambda size=size: F.resize(label[None], size, interpolation=InterpolationMode.NEAREST_EXACT)),
            ),
        ]
    return rows + [
        ("hue shift: torchvision adjust_hue", best_ms(lambda: F.adjust_hue(image, 0.05), 10)),
        ("hue shift: OpenCV HSV (used)", best_ms(lambda: shift_hue(image, 0.05))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="synthetic scenes to build (without --shards)")
    parser.add_argument("--shards", type=Path, help="an existing shard folder with a train split")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved measurement rounds")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or build_shards(Path(tmp), args.images)
        rows = loader_table(shards, args.rounds, args.batch_size)
        base = rows[0][1]
        print(f"\nloader, 512x256, batch {args.batch_size}, median of {args.rounds} epochs")
        print("| configuration | samples/s | vs 0 workers |\n|-|-|-|")
        for name, rate in rows:
            print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
        print("\nper-sample steps, one thread, best of 30")
        print("| step | ms |\n|-|-|")
        for name, ms in step_table(shards):
            print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()

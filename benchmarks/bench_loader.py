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


def decode_rows(ex: dict) -> list[tuple[str, float]]:
    """The PNG decoders that install here, on one record's image and label PNGs."""
    import importlib.util
    import io

    import cv2
    import numpy as np
    import torch
    import torchvision.io
    from PIL import Image

    from urbanseg.data.pixels import PNG_DECODER, decode_png

    image, label = ex["image_data"][0], ex["label_data"][0]
    shape = (ex["height"][0], ex["width"][0])
    encoded = torch.frombuffer(bytearray(image), dtype=torch.uint8)
    rows = [
        ("decode image PNG: OpenCV, libpng (before)", best_ms(lambda: cv2.imdecode(np.frombuffer(image, np.uint8), 1))),
        ("decode image PNG: PIL", best_ms(lambda: np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))),
        ("decode image PNG: torchvision.io.decode_png", best_ms(lambda: torchvision.io.decode_png(encoded))),
    ]
    if importlib.util.find_spec("pyspng"):  # optional: measured where installed
        import pyspng

        rows.append(("decode image PNG: pyspng (libspng)", best_ms(lambda: pyspng.load(image))))
    if importlib.util.find_spec("imagecodecs"):
        import imagecodecs

        rows.append(("decode image PNG: imagecodecs.png_decode", best_ms(lambda: imagecodecs.png_decode(image))))
    return rows + [
        (f"decode image PNG: decode_png, {PNG_DECODER} (used)", best_ms(lambda: decode_png(image, shape, grey=False))),
        ("decode label PNG: OpenCV (before)", best_ms(lambda: cv2.imdecode(np.frombuffer(label, np.uint8), -1))),
        (f"decode label PNG: decode_png, {PNG_DECODER} (used)", best_ms(lambda: decode_png(label, shape, grey=True))),
    ]


class _Decoded:
    """`n` already decoded items, so a DataLoader over it measures collate + transfer only."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return 32 * len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i % len(self.items)]


def batch_rows(ds, batch_size: int) -> list[tuple[str, float]]:
    """Per batch: collate and hand-over from one worker (items pre-decoded), the main
    process's float conversion. ms per batch."""
    import torch
    from torch.utils.data import DataLoader, default_collate

    from urbanseg.data.loader import collate

    items = [ds[i] for i in range(batch_size)]
    before = [{**it, "label": it["label"].long()} for it in items]

    def per_batch(data: list[dict], fn) -> float:
        loader = DataLoader(
            _Decoded(data), batch_size=batch_size, num_workers=1, collate_fn=fn, persistent_workers=True
        )
        for _ in loader:  # start the worker
            pass
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += 1
            batch["image"].max()  # touch the pages the main process maps
        return (time.perf_counter() - start) * 1000 / n

    image = collate(items)["image"]
    return [
        ("collate + hand-over: default_collate, int64 labels (before)", per_batch(before, default_collate)),
        ("collate + hand-over: urbanseg collate, uint8 labels, one buffer (used)", per_batch(items, collate)),
        ("image batch to float32, one thread (main process)", best_ms(lambda: image.float())),
        (
            "  for comparison: label batch uint8 -> int64",
            best_ms(lambda: torch.stack([it["label"] for it in items]).long()),
        ),
    ]


def step_table(shards: Path, batch_size: int) -> list[tuple[str, float]]:
    import cv2
    import numpy as np
    import torch

    from urbanseg.data import tfrecord as records
    from urbanseg.data.loader import ShardDataset
    from urbanseg.data.pixels import to_planes

    torch.set_num_threads(1)  # as in a DataLoader worker
    cv2.setNumThreads(1)
    ds = ShardDataset(shards, "train")
    ex = ds.read_example(1)  # every step below works on this one record
    hwc = np.ascontiguousarray(ds[1]["image"].permute(1, 2, 0).numpy())
    image, label = ds[1]["image"], ds[1]["label"]
    return [
        ("read record + CRC checks + parse Example", best_ms(lambda: ds.read_example(1))),
        (
            "  of which CRC32C of the record",
            best_ms(lambda: records.masked_crc(ex["image_data"][0] + ex["label_data"][0])),
        ),
        *decode_rows(ex),
        ("label value check (LUT + count)", best_ms(lambda: ds._check_label_values(label.numpy(), ""))),
        (
            "HWC -> CHW: torch permute + copy (before)",
            best_ms(lambda: torch.from_numpy(hwc).permute(2, 0, 1).contiguous()),
        ),
        ("HWC -> CHW: cv2.split into planes (used)", best_ms(lambda: to_planes(hwc))),
        ("label uint8 -> int64 per sample (before)", best_ms(lambda: label.long())),
        ("random flip of image and label", best_ms(lambda: (image.flip(-1), label.flip(-1)))),
        ("dataset[i] without augmentation (all per-sample steps)", best_ms(lambda: ds[1])),
        *[(f"per batch of {batch_size}: {name}", ms) for name, ms in batch_rows(ds, batch_size)],
    ]


def augment_table(shards: Path) -> list[tuple[str, float]]:
    """The augmentation, and the ops where torchvision and OpenCV compete (resize, hue)."""
    import cv2
    import numpy as np
    import torch
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    from urbanseg.data.loader import ShardDataset
    from urbanseg.data.transforms import TrainTransform, shift_hue

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    item = ShardDataset(shards, "train")[1]
    image, label = item["image"], item["label"]
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    t, g = TrainTransform(), torch.Generator()
    rows = [("TrainTransform (defaults), per sample", best_ms(lambda: t(image, label, g.manual_seed(3))))]
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
        print("\nper-sample steps, one thread, best of 30 (per batch: mean over an epoch of 32 batches)")
        print("| step | ms |\n|-|-|")
        for name, ms in step_table(shards, args.batch_size) + augment_table(shards):
            print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()

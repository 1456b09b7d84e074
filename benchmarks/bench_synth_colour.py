"""Is the synthetic dataset solvable by colour alone? Per-pixel colour classifiers vs a
small CNN, all trained on `synth` train scenes and scored by mIoU over the 8 categories
on val scenes (the same scenes, side by side in one run).

    python benchmarks/bench_synth_colour.py [--train 40] [--val 12] [--size 256x128] [--steps 800]

(a) colour lookup: RGB quantised to 5 bits per channel, each bin -> its majority class
    on the train pixels (an optimal per-pixel colour rule up to quantisation);
(b) colour MLP: RGB -> 64 -> 64 -> 8 on a sample of train pixels;
(c) small CNN: a 6-layer conv net (stride-2 stem, stride-16 dilated context branch),
    trained for --steps steps of 8 scenes with flips (AdamW, one-cycle).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from urbanseg.labels import CATEGORIES, get_label_set
from urbanseg.synth import generate
from urbanseg.util import progress_map

N = len(CATEGORIES)


def load(split: str, count: int, size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, H, W, 3) uint8 photos and (count, H, W) uint8 category labels, generated in memory."""
    lut = get_label_set("categories8")
    scenes = progress_map(_one, [(seed, split, i, *size) for i in range(count)], workers=2, desc=f"synth {split}")
    return np.stack([s[0] for s in scenes]), np.stack([lut.labels_from_ids(s[1]) for s in scenes])


def _one(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    scene = generate(*args)
    return scene["image"], scene["labelIds"]


def miou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(mIoU over the classes present in gt or pred, pixel accuracy)."""
    cm = np.bincount(gt.ravel().astype(np.int64) * N + pred.ravel(), minlength=N * N).reshape(N, N)
    inter, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    return float(np.mean(inter[union > 0] / union[union > 0])), float(inter.sum() / cm.sum())


def colour_lookup(images: np.ndarray, labels: np.ndarray, bits: int = 5):
    """Fit the quantised-RGB majority rule; returns predict(images) -> labels."""
    shift = 8 - bits

    def code(img: np.ndarray) -> np.ndarray:
        q = img.astype(np.int64) >> shift
        return (q[..., 0] << (2 * bits)) | (q[..., 1] << bits) | q[..., 2]

    counts = np.bincount(code(images).ravel() * N + labels.ravel(), minlength=N << (3 * bits)).reshape(-1, N)
    table = counts.argmax(1)
    table[counts.sum(1) == 0] = np.bincount(labels.ravel(), minlength=N).argmax()  # unseen colours
    return lambda img: table[code(img)]


def colour_mlp(images: np.ndarray, labels: np.ndarray, steps: int = 1500):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(images.reshape(-1, 3)).float() / 255
    y = torch.from_numpy(labels.reshape(-1)).long()
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, N)
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(len(x), (2048,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def predict(img: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(img.reshape(-1, 3)).float() / 255).argmax(1).numpy().reshape(img.shape[:-1])

    return predict


def tiny_cnn():
    import torch
    from torch import nn

    def block(i: int, o: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, stride, dilation, dilation, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    class TinySeg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = block(3, 16, 2)
            self.down = nn.Sequential(block(16, 32, 2), block(32, 48, 2), block(48, 64, 2), block(64, 64, 1, 2))
            self.head = nn.Sequential(block(80, 32), nn.Conv2d(32, N, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.stem(x / 127.5 - 1)  # stride 2
            d = nn.functional.interpolate(self.down(s), size=s.shape[-2:], mode="bilinear", align_corners=False)
            logits = self.head(torch.cat([s, d], 1))
            return nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return TinySeg()


def train_cnn(images: np.ndarray, labels: np.ndarray, steps: int):
    import torch

    torch.manual_seed(0)
    net = tiny_cnn()
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    y = torch.from_numpy(labels).long()
    g = np.random.default_rng(0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    for _ in range(steps):
        idx = torch.from_numpy(g.choice(len(x), 8, replace=False))
        xb, yb = x[idx], y[idx]
        if g.random() < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()

    @torch.no_grad()
    def predict(img: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(img).permute(0, 3, 1, 2).float()
        return torch.cat([net(b).argmax(1) for b in batch.split(8)]).numpy()

    return predict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=40)
    ap.add_argument("--val", type=int, default=12)
    ap.add_argument("--size", default="256x128")
    ap.add_argument("--steps", type=int, default=800, help="CNN training steps (batch 8)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    xtr, ytr = load("train", args.train, size, args.seed)
    xva, yva = load("val", args.val, size, args.seed)
    rows = []
    for name, fit in (
        ("colour lookup (RGB 5 bit)", lambda: colour_lookup(xtr, ytr)),
        ("colour MLP (RGB)", lambda: colour_mlp(xtr, ytr)),
    ):
        t = time.perf_counter()
        predict = fit()
        rows.append((name, *miou(predict(xva), yva), time.perf_counter() - t, "-"))
    t = time.perf_counter()
    predict = train_cnn(xtr, ytr, args.steps)
    rows.append(("small CNN", *miou(predict(xva), yva), time.perf_counter() - t, args.steps))
    print(f"\n{args.train} train / {args.val} val scenes at {args.size}, mIoU over the 8 categories on val\n")
    print("| method | val mIoU | val pixel acc | fit time (s) | CNN steps |")
    print("|-|-|-|-|-|")
    for name, m, acc, secs, steps in rows:
        print(f"| {name} | {m:.3f} | {acc:.3f} | {secs:.0f} | {steps} |")
    print(f"\nCNN / colour lookup mIoU ratio: {rows[2][1] / rows[0][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

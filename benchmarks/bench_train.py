"""Training throughput (images/s) of every model at 512x256 on this CPU, as a ratio to
unet-original measured in the same run, with and without bf16 autocast.

Each timed step is the real `urbanseg.training.loop.train_step` (forward, cross-entropy, backward,
AdamW step) on a fixed random batch. Models are timed round-robin, so a change in machine
load hits them alike; the median of the timed rounds is reported.

    python benchmarks/bench_train.py                      # every model, batch 4, 1 thread
    python benchmarks/bench_train.py --models unet-original lraspp-mobilenetv3 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from urbanseg.config import TrainConfig, parse_size
from urbanseg.models import DEFAULT_MODEL, MODELS, create_model
from urbanseg.training.distributed import DistInfo
from urbanseg.training.loop import train_step
from urbanseg.training.losses import SegmentationLoss
from urbanseg.training.train import build_optimizer
from urbanseg.training.trainer import Trainer

BASE = "unet-original"


def make_trainer(name: str, amp: str, num_classes: int = 8) -> Trainer:
    config = TrainConfig(data="unused", run="unused", model=name, lr=1e-4, iters=10**6, amp=amp)
    torch.manual_seed(0)
    model = create_model(name, num_classes)
    model.train()
    optimizer, scheduler = build_optimizer(model, config, 10**6)
    dtype = torch.bfloat16 if amp == "bf16" else None
    return Trainer(
        config,
        DistInfo(),
        torch.device("cpu"),
        model,
        model,
        SegmentationLoss("ce"),
        optimizer,
        scheduler,
        torch.amp.GradScaler("cpu", enabled=False),
        dtype,
        None,
        None,
        None,
        1,
        10**6,
        4,
    )


def time_step(trainer: Trainer, batch: dict) -> float:
    start = time.perf_counter()
    train_step(trainer, batch, False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", default="512x256", help="training crop WxH")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable ratios)")
    parser.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=["off", "bf16"])
    args = parser.parse_args()
    args.amp = ["off", *[a for a in args.amp if a != "off"]]  # fp32 is the reference column
    torch.set_num_threads(args.threads)
    names = args.models if BASE in args.models else [BASE, *args.models]
    w, h = parse_size(args.size)
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randint(0, 256, (args.batch_size, 3, h, w), dtype=torch.uint8, generator=g),
        "label": torch.randint(0, 8, (args.batch_size, h, w), generator=g),
    }
    trainers = {(n, a): make_trainer(n, a) for n in names for a in args.amp}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in trainers}
    for r in range(args.rounds + 1):
        for key, trainer in trainers.items():
            t = time_step(trainer, batch)
            if r:  # round 0 warms up (allocator, oneDNN primitive caches)
                times[key].append(t)
        print(f"round {r}/{args.rounds} done", flush=True)
    ips = {key: args.batch_size / statistics.median(v) for key, v in times.items()}
    print(
        f"\ntraining throughput at {args.size}, batch {args.batch_size}, {args.threads} thread(s), "
        f"torch {torch.__version__}; median of {args.rounds} rounds\n"
    )
    head = "| model | images/s (fp32) | x unet-original |" + "".join(
        f" images/s ({a}) | {a} / fp32 |" for a in args.amp if a != "off"
    )
    print(head)
    print("|" + "-|" * (head.count("|") - 1))
    for n in names:
        mark = " (default)" if n == DEFAULT_MODEL else ""
        row = f"| {n}{mark} | {ips[n, 'off']:.3g} | {ips[n, 'off'] / ips[BASE, 'off']:.1f} |"
        for a in args.amp:
            if a != "off":
                row += f" {ips[n, a]:.3g} | {ips[n, a] / ips[n, 'off']:.2f} |"
        print(row)


if __name__ == "__main__":
    main()

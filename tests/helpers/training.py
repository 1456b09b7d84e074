"""Tiny TFRecord shards and command lines shared by the training tests.

The shards go through the real pipeline (`urbanseg synth` -> `prepare` -> `pack`) at 64x32;
11 training images make a torchrun split over 2 processes uneven (6 + 5) on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from urbanseg.config import PackConfig, PrepareConfig, SynthConfig

TINY_MODEL = ["--model", "unet-original", "--model-args", json.dumps({"base_channels": 4})]


def make_shards(
    root: Path, *, train: int = 11, val: int = 5, labels: str = "categories8", raw: Path | None = None
) -> Path:
    """Synthetic scenes -> 64x32 prepared pairs -> 2 shards per split; returns the shard folder.

    The scenes go to `root/raw` unless `raw` names scenes made before (only read)."""
    from urbanseg.data.pack import pack
    from urbanseg.data.prepare import prepare
    from urbanseg.synth import synthesize

    prepared, shards = root / f"prepared-{labels}", root / f"shards-{labels}"
    raw = root / "raw" if raw is None else raw
    if not raw.exists():
        synthesize(SynthConfig(out=raw, train=train, val=val, size="128x64", seed=1, workers=1))
    prepare(PrepareConfig(data=raw, out=prepared, labels=labels, size="64x32", splits=["train", "val"], workers=1))
    pack(PackConfig(prepared=prepared, out=shards, shards=2, splits=["train", "val"]))
    return shards


def repack(root: Path, shards: Path, *, labels: str = "categories8") -> None:
    """`urbanseg pack` again from `make_shards`' prepared pairs into `shards`."""
    from urbanseg.data.pack import pack

    pack(PackConfig(prepared=root / f"prepared-{labels}", out=shards, shards=2, splits=["train", "val"]))


def train_args(shards: Path, run: Path, *extra: str, deterministic: bool = True) -> list[str]:
    """`urbanseg train` arguments for a tiny, quick CPU run (deterministic by default)."""
    return [
        "train",
        "--data",
        str(shards),
        "--run",
        str(run),
        *TINY_MODEL,
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--log-every",
        "1",
        *(["--deterministic"] if deterministic else []),
        *extra,
    ]


def subprocess_env() -> dict[str, str]:
    # one thread per process: the tests share 2 cores with everything else
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "urbanseg", *args], capture_output=True, text=True, timeout=timeout, env=subprocess_env()
    )


def saved_step(path: Path) -> int:
    """The step stored in a checkpoint, or -1 while it is not (yet) readable."""
    import torch

    try:
        return torch.load(path, weights_only=True)["step"]
    except Exception:  # not written yet, or being replaced
        return -1

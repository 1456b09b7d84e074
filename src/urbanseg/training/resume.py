"""What makes a training run resumable bit for bit: the run's saved configuration, seeding
and deterministic kernels, and the random-number-generator states kept in checkpoints.

A checkpoint's `train_state` holds everything else (optimizer, scheduler, scaler, data
position, best score, patience counter): `urbanseg.training.trainer.Trainer` owns it.
The RNG states are tensors and plain Python values, so checkpoints load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from urbanseg.config import TYPED_FLAGS, TrainConfig
from urbanseg.errors import UserError
from urbanseg.rundir import RunDir
from urbanseg.util import temporary_glob

# Flags that `--resume` may change: where things are and how fast they run, never what is
# computed. Anything else typed must match the run's config.yaml (`merge_for_resume`).
RESUME_MUTABLE = ("data", "run", "resume", "workers", "device", "compile")


def load_run_config(run: Path) -> TrainConfig:
    """The resolved TrainConfig saved in `run`/config.yaml (`urbanseg.rundir.RunDir.config`)."""

    if not (run / RunDir.CONFIG).is_file():
        raise UserError(
            f"--resume: {run / RunDir.CONFIG} not found; {run} is not a run folder (start without --resume)"
        )
    return RunDir(run).config()


def merge_for_resume(given: TrainConfig) -> TrainConfig:
    """The run's saved config, with the `RESUME_MUTABLE` flags taken from `given`.

    Any other flag typed on the command line (`config.TYPED_FLAGS`) or not at its default,
    with a value other than the saved one, is an error: silently ignoring it would
    surprise, and honouring it would break the promise that a resumed run equals an
    uninterrupted one.
    """
    saved = load_run_config(given.run)
    defaults = TrainConfig(data=given.data, run=given.run)
    typed = TYPED_FLAGS.get()
    conflicts = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MUTABLE:
            continue
        mine, theirs, default = getattr(given, f.name), getattr(saved, f.name), getattr(defaults, f.name)
        # typed (even with its default value), or not at its default (typed abbreviated, or in Python)
        given_here = mine != default or (typed is not None and f.name in typed)
        if given_here and mine != theirs:
            conflicts.append(f"--{f.name.replace('_', '-')} {mine} (the run has {theirs})")
    if conflicts:
        raise UserError(
            f"--resume continues {given.run} with its saved config.yaml, but these flags differ from it: "
            f"{'; '.join(conflicts)}. Drop them to resume, or start a new run that fine-tunes this one with "
            f"--init {given.run / 'last.pt'}"
        )
    return dataclasses.replace(saved, **{k: getattr(given, k) for k in RESUME_MUTABLE})


def configure_determinism(config: TrainConfig) -> None:
    """Seed every generator and, with --deterministic, force deterministic kernels and a
    fixed thread count (the partition of a parallel reduction depends on it)."""
    threads = config.threads or (1 if config.deterministic else 0)
    if threads:
        torch.set_num_threads(threads)
    if config.deterministic:
        # cuBLAS needs this for deterministic matmuls on CUDA >= 10.2
        # (https://docs.nvidia.com/cuda/cublas/index.html#results-reproducibility)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """This process's generator states (torch CPU and CUDA, numpy, python) as tensors and
    plain values, loadable with weights_only=True."""
    name, keys, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def remove_stale_temporaries(run: Path) -> None:
    """Temporary files of writes a killed process never renamed (`util.atomic_path`'s)."""

    for tmp in run.glob(temporary_glob()):
        tmp.unlink(missing_ok=True)

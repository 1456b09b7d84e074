"""What makes a training run resumable bit for bit: the run's saved configuration, seeding
and deterministic kernels, and the random-number-generator states kept in checkpoints.

A checkpoint's `train_state` holds everything else (optimizer, scheduler, scaler, data
position, best score, patience counter); see `urbanseg.training.train`. Everything here is made of
tensors and plain Python values, so checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from urbanseg import config as cfg
from urbanseg.training import distributed as dist_
from urbanseg.config import TrainConfig
from urbanseg.errors import UserError

# Flags that `--resume` may change: where things are and how fast they run, never what is
# computed. Anything else must match the run's config.yaml (or be left at its default).
RESUME_MUTABLE = ("data", "run", "resume", "workers", "device", "compile")
_PATH_FIELDS = ("data", "run", "init")


def load_run_config(run: Path) -> TrainConfig:
    """The resolved TrainConfig saved in `run`/config.yaml."""
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        raise UserError(f"--resume: {path} not found; {run} is not a run folder (start without --resume)")
    try:
        data = yaml.safe_load(path.read_text())
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        values = {k: (Path(v) if k in _PATH_FIELDS and v is not None else v) for k, v in data.items()}
        return TrainConfig(**values)
    except (ValueError, TypeError, AttributeError, yaml.YAMLError) as e:
        raise UserError(f"{path} is not a urbanseg train config ({e}); start a new run folder instead") from e


def merge_for_resume(given: TrainConfig) -> TrainConfig:
    """The run's saved config, with the `RESUME_MUTABLE` flags taken from `given`.

    Any other flag set on the command line to a value that differs both from its default
    and from the saved value is an error: silently ignoring it would surprise, and honouring
    it would break the promise that a resumed run equals an uninterrupted one.
    """
    saved = load_run_config(given.run)
    defaults = TrainConfig(data=given.data, run=given.run)
    conflicts = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MUTABLE:
            continue
        mine, theirs, default = getattr(given, f.name), getattr(saved, f.name), getattr(defaults, f.name)
        if mine != default and mine != theirs:
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
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
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


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain values (for checkpoints and config.yaml)."""
    return cfg.to_dict(config)


@dataclasses.dataclass
class LoopState:
    """Where training is: saved in every last.pt so `--resume` continues exactly there."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # steps done in the current epoch (x global batch = samples consumed)
    best_miou: float = -1.0
    best_step: int = -1
    bad_validations: int = 0  # validations since the best one (early stopping)
    last_val: dict[str, Any] | None = None


def payload(t: Any, st: LoopState, *, with_train_state: bool) -> dict[str, Any]:
    """A self-describing checkpoint (`urbanseg.checkpoint.build_payload`), with the full
    training state for last.pt. Collective under torchrun: every process must call it
    (each one's RNG states are gathered on rank 0)."""
    from urbanseg.checkpoint import build_payload

    train_state = None
    if with_train_state:
        train_state = {
            "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(), "rng": dist_.gather_to_main(rng_state()),
            "world_size": t.info.world_size,
            **{k: v for k, v in dataclasses.asdict(st).items() if k != "last_val"},
            "samples_in_epoch": st.step_in_epoch * t.config.batch_size,
        }
    spec = t.train_set.spec
    return build_payload(t.raw, label_set=t.label_set, input_size=[spec["width"], spec["height"]],
                         config=config_dict(t.config), step=st.step, epoch=st.epoch, metrics=st.last_val or {},
                         train_state=train_state)


def save(t: Any, st: LoopState, name: str, *, with_train_state: bool = True) -> None:
    from urbanseg.checkpoint import save_checkpoint

    data = payload(t, st, with_train_state=with_train_state)
    if t.info.is_main:
        save_checkpoint(t.config.run / name, data)


def restore(t: Any, path: Path) -> LoopState:
    """Load last.pt into the trainer (weights, optimizer, scheduler, scaler, RNG) and
    return the loop position it was saved at."""
    from urbanseg.checkpoint import load_checkpoint
    from urbanseg.labels import LabelSet

    ckpt = load_checkpoint(path, map_location=t.device)
    if LabelSet.from_dict(ckpt["label_set"]).classes != t.label_set.classes:
        raise UserError(f"--resume: {path} was trained on classes {ckpt['label_set'].get('classes')}, but "
                        f"{t.config.data} holds {list(t.label_set.classes)}; resume with the run's own data")
    ts = ckpt.get("train_state")
    if ts is None:
        raise UserError(f"{path} holds no training state (a best.pt or exported model?); resume needs last.pt")
    t.raw.load_state_dict(ckpt["model_state"])
    t.optimizer.load_state_dict(ts["optimizer"])
    t.scheduler.load_state_dict(ts["scheduler"])
    t.scaler.load_state_dict(ts["scaler"])
    rngs = ts["rng"]
    if len(rngs) != t.info.world_size and t.info.is_main:
        print(f"note: {path} was written by {len(rngs)} processes, this run has {t.info.world_size}: "
              f"training continues, but not bit-identically", file=sys.stderr)
    set_rng_state(rngs[t.info.rank] if len(rngs) == t.info.world_size else rngs[0])
    fields = {f.name for f in dataclasses.fields(LoopState)}
    return LoopState(**{k: v for k, v in ts.items() if k in fields}, last_val=ckpt.get("metrics") or None)


def remove_stale_temporaries(run: Path) -> None:
    """Temporary files of writes a killed process never renamed (`util.atomic_path`'s)."""
    from urbanseg.util import temporary_glob

    for tmp in run.glob(temporary_glob()):
        tmp.unlink(missing_ok=True)


class StopSignal:
    """First Ctrl-C (or SIGTERM, e.g. a cluster's pre-emption notice): finish the current
    step, save last.pt and exit. A second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving last.pt (again to abort at once)", file=sys.stderr)

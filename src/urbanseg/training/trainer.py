"""The Trainer: what a training step needs (model, loss, optimizer, data), built once by
`urbanseg.training.train.setup`, and the one owner of its state.

`Trainer.state_dict()` / `load_state_dict()` cover the trainer's own state (weights,
optimizer, scheduler, gradient scaler); `Trainer.save` / `Trainer.restore` put it, with
the loop's position (`LoopState`) and every process's RNG states
(`urbanseg.training.resume.rng_state`), into a checkpoint and back. The checkpoint layout
(`urbanseg.checkpoint`, its `train_state` keys) has only gained keys with defaults since
format 1 (`loss_sum`, `loss_steps`), so older last.pt files resume.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from urbanseg.config import TrainConfig, to_dict
from urbanseg.errors import UserError
from urbanseg.labels import LabelSet
from urbanseg.training import distributed as dist_
from urbanseg.training.resume import rng_state, set_rng_state

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from urbanseg.data.loader import ShardDataset
    from urbanseg.labels import LabelSet
    from urbanseg.models import SegmentationModel
    from urbanseg.training.losses import SegmentationLoss

# The trainer's parts in state_dict(); in a checkpoint, "model" is the top-level
# model_state and the others are train_state entries.
_PARTS = ("model", "optimizer", "scheduler", "scaler")


@dataclasses.dataclass
class LoopState:
    """Where training is: saved in every last.pt so `--resume` continues exactly there."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # steps done in the current epoch (x global batch = samples consumed)
    best_miou: float = -1.0
    best_step: int = -1  # -1: no validation yet, so no best.pt from this run
    bad_validations: int = 0  # validations since the best one (early stopping)
    loss_sum: float = 0.0  # the train losses since the last logged row, and their count: the
    loss_steps: int = 0  # row after a resume averages the same steps as without one
    last_val: dict[str, Any] | None = None


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs. `model` is the bare SegmentationModel (weights, checkpoints,
    validation); `wrapped` is what the training forward runs through: `model` itself, or
    DistributedDataParallel(model) under torchrun, compiled with --compile."""

    config: TrainConfig
    info: dist_.DistInfo
    device: torch.device
    model: SegmentationModel
    wrapped: nn.Module
    criterion: SegmentationLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    train_set: ShardDataset
    val_set: ShardDataset
    label_set: LabelSet
    steps_per_epoch: int
    total_steps: int
    local_batch: int  # this process's share of the global batch
    val_loader: DataLoader | None = None
    last_result: dict[str, Any] | None = None  # the latest validation, for the final report
    encoder_frozen: bool = False  # --freeze-encoder: follows the step (loop.freeze_encoder), never saved

    def state_dict(self) -> dict[str, Any]:
        """{"model", "optimizer", "scheduler", "scaler"}: each part's own state dict."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what `state_dict` returned (every part must be present)."""
        for part in _PARTS:
            getattr(self, part).load_state_dict(state[part])

    def checkpoint(self, st: LoopState, *, with_train_state: bool) -> dict[str, Any]:
        """A self-describing checkpoint (`urbanseg.checkpoint.build_payload`), with the full
        training state for last.pt. Collective under torchrun: every process must call it
        (each one's RNG states are gathered on rank 0)."""
        from urbanseg.checkpoint import build_payload

        train_state = None
        if with_train_state:
            state = self.state_dict()
            train_state = {
                **{part: state[part] for part in _PARTS if part != "model"},
                "rng": dist_.gather_to_main(rng_state()),
                "world_size": self.info.world_size,
                **{k: v for k, v in dataclasses.asdict(st).items() if k != "last_val"},
                "samples_in_epoch": st.step_in_epoch * self.config.batch_size,
            }
        spec = self.train_set.spec
        return build_payload(
            self.model,
            label_set=self.label_set,
            input_size=[spec.width, spec.height],
            config=to_dict(self.config),
            step=st.step,
            epoch=st.epoch,
            metrics=st.last_val or {},
            train_state=train_state,
        )

    def save(self, st: LoopState, name: str, *, with_train_state: bool = True) -> None:
        """Write `checkpoint(st)` to the run folder as `name` (rank 0; collective)."""
        from urbanseg.checkpoint import save_checkpoint

        data = self.checkpoint(st, with_train_state=with_train_state)
        if self.info.is_main:
            save_checkpoint(self.config.run / name, data)

    def restore(self, path: Path) -> LoopState:
        """Load last.pt at `path` into the trainer and this process's RNGs; return the loop
        position it was saved at."""
        from urbanseg.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, map_location=self.device)
        if LabelSet.from_dict(ckpt["label_set"]).classes != self.label_set.classes:
            raise UserError(
                f"--resume: {path} was trained on classes {ckpt['label_set'].get('classes')}, but "
                f"{self.config.data} holds {list(self.label_set.classes)}; resume with the run's own data"
            )
        ts = ckpt.get("train_state")
        if ts is None:
            raise UserError(f"{path} holds no training state (a best.pt or exported model?); resume needs last.pt")
        self.load_state_dict({"model": ckpt["model_state"], **{p: ts[p] for p in _PARTS if p != "model"}})
        rngs = ts["rng"]
        if len(rngs) != self.info.world_size and self.info.is_main:
            print(
                f"note: {path} was written by {len(rngs)} processes, this run has {self.info.world_size}: "
                f"training continues, but not bit-identically",
                file=sys.stderr,
            )
        set_rng_state(rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0])
        fields = {f.name for f in dataclasses.fields(LoopState)}
        return LoopState(**{k: v for k, v in ts.items() if k in fields}, last_val=ckpt.get("metrics") or None)

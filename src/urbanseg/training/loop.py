"""The training loop: one optimizer step, validation, the data loaders, when to validate
and save, and the stop signal (Ctrl-C / SIGTERM) that ends the loop cleanly.

Every process of a torchrun job runs this loop in lockstep: the same number of steps per
epoch, one all-reduce per step carrying the loss and the stop/abort flags.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from urbanseg.config import TrainConfig, parse_size
from urbanseg.data.loader import EpochSampler
from urbanseg.evaluation.metrics import ConfusionMatrix
from urbanseg.training import distributed as dist_
from urbanseg.training.finetune import set_encoder_frozen
from urbanseg.training.runlog import RunLog
from urbanseg.training.trainer import LoopState, Trainer


class NonFiniteLoss(RuntimeError):
    pass


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

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving last.pt (again to abort at once)", file=sys.stderr)


# --------------------------------------------------------------------------- steps


def train_step(t: Trainer, batch: dict[str, Any], stop_requested: bool) -> tuple[float, bool]:
    """One optimizer step on this process's part of a global batch.

    Returns (mean loss over all processes, whether any process asked to stop). Raises
    NonFiniteLoss, on every process, before the weights are touched."""
    images = batch["image"].to(t.device, non_blocking=True).float()  # (N, 3, H, W) 0..255
    labels = batch["label"].to(t.device, non_blocking=True).long()  # (N, H, W) uint8 -> int64, 255 ignore
    if t.config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(t.device.type, dtype=t.amp_dtype or torch.float32, enabled=t.amp_dtype is not None):
        logits = t.wrapped(images)
    loss = t.criterion(logits, labels)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.unscale_(t.optimizer)  # a no-op without fp16
    grads = [p.grad for p in t.model.parameters() if p.grad is not None]
    norm = nn.utils.get_total_norm(grads)  # (all-reduced by DDP already: the same on every process)
    bad = ~torch.isfinite(loss.detach())
    if not t.scaler.is_enabled():  # with fp16 an inf gradient is routine: the scaler skips the step
        bad = bad | ~torch.isfinite(norm)
    # one small all-reduce carries the loss and both flags, so all processes agree
    flags = torch.stack(
        [loss.detach().float(), bad.float().to(loss.device), torch.tensor(float(stop_requested), device=loss.device)]
    )
    flags = dist_.all_reduce_sum(flags).cpu()
    if flags[1] > 0:
        raise NonFiniteLoss(
            f"the training loss is {loss.item():.4g} (gradient norm {norm.item():.4g}) on at least one process"
        )
    if t.config.clip_grad:
        nn.utils.clip_grads_with_norm_(t.model.parameters(), t.config.clip_grad, norm)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    return float(flags[0]) / t.info.world_size, bool(flags[2] > 0)


@torch.no_grad()
def validate(t: Trainer) -> tuple[float, dict[str, Any]]:
    """Mean loss and dataset-level scores (metrics.ConfusionMatrix, all-reduced) on `val`."""

    if t.val_loader is None:
        raise RuntimeError("validate() before fit() made the val loader")
    t.model.eval()
    cm = ConfusionMatrix(t.label_set.num_classes, t.label_set.ignore_index)
    sums = torch.zeros(2, dtype=torch.float64, device=t.device)  # loss x images, images
    for batch in _iterate(t.val_loader):
        images = batch["image"].to(t.device).float()
        labels = batch["label"].to(t.device).long()
        with torch.autocast(t.device.type, dtype=t.amp_dtype or torch.float32, enabled=t.amp_dtype is not None):
            logits = t.model(images)
        sums += torch.tensor([float(t.criterion(logits, labels)) * len(images), len(images)], device=t.device)
        cm.update(logits.argmax(1), labels)
    cm.all_reduce()
    dist_.all_reduce_sum(sums)
    t.model.train()
    return float(sums[0] / sums[1].clamp_min(1)), cm.compute()


def augment_settings(config: TrainConfig) -> dict[str, Any] | bool:
    """build_loader's `augment`: transforms.Augment's defaults (plus --crop), or only the
    crop with --no-augment, or nothing."""
    crop = None if config.crop is None else parse_size(config.crop, "--crop")
    if config.augment:
        return {"crop": crop}
    if crop is None:
        return False
    return {
        "crop": crop,
        "scale": (1.0, 1.0),
        "flip": 0.0,
        "brightness": 0.0,
        "contrast": 0.0,
        "saturation": 0.0,
        "hue": 0.0,
    }


def make_loader(t: Trainer, split: str, st: LoopState | None = None) -> DataLoader:
    """This process's DataLoader over `split`: train shuffles per (seed, epoch), augments
    per (seed, epoch, index) and starts at `st`'s position; val keeps file order."""
    from urbanseg.data.loader import build_loader

    config, train = t.config, split == "train"
    epoch, start = (st.epoch, st.step_in_epoch * t.local_batch) if train and st is not None else (0, 0)
    return build_loader(
        config.data,
        split,
        batch_size=t.local_batch,
        train=train,
        workers=config.workers,
        seed=config.seed,
        epoch=epoch,
        start=start,
        rank=t.info.rank,
        world_size=t.info.world_size,
        augment=augment_settings(config) if train else False,
        drop_last=train,
        pin_memory=t.device.type == "cuda",
    )


def _iterate(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """Iterate `loader` without touching the global torch generator: creating a DataLoader
    iterator draws a seed from it, which would make a resumed run's dropout differ."""
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    yield from it


def freeze_encoder(t: Trainer, step: int) -> None:
    """--freeze-encoder N: the encoder is fixed for steps 0..N-1 and trains from step N on.
    A function of the step alone, so a resumed run freezes (or not) exactly as the
    uninterrupted one did; nothing is saved for it."""
    frozen = step < t.config.freeze_encoder
    if frozen == t.encoder_frozen:
        return
    t.encoder_frozen = frozen
    set_encoder_frozen(t.model, frozen)
    if t.info.is_main and frozen:
        print(f"encoder frozen until step {t.config.freeze_encoder}", file=sys.stderr)
    elif t.info.is_main:
        print(f"step {step}: encoder unfrozen, training every weight", file=sys.stderr)


# --------------------------------------------------------------------------- the loop


def run_validation(t: Trainer, st: LoopState, log: RunLog) -> dict[str, Any]:
    """Validate, log, keep best.pt and the early-stopping counter up to date."""
    loss, result = validate(t)
    st.last_val = {
        "step": st.step,
        "val_loss": loss,
        "miou": result["miou"],
        "pixel_accuracy": result["pixel_accuracy"],
        "mean_accuracy": result["mean_accuracy"],
        "iou": result["per_class"]["iou"],
    }
    log.val(st.step, st.epoch, loss, result, t.label_set.classes)
    if (result["miou"] or 0.0) > st.best_miou:
        st.best_miou, st.best_step, st.bad_validations = result["miou"], st.step, 0
        t.save(st, "best.pt", with_train_state=False)
    else:
        st.bad_validations += 1
    return result


def after_step(t: Trainer, st: LoopState, log: RunLog, end_of_epoch: bool, stopping: bool) -> str | None:
    """Validate and save when due; return why training ends now, or None to go on."""
    config = t.config
    last = st.step >= t.total_steps
    saving = bool(config.save_every) and st.step % config.save_every == 0
    validated = (
        (bool(config.val_every) and st.step % config.val_every == 0) or (not config.val_every and end_of_epoch) or last
    )
    # a finite loss and gradient can still make a huge update: never save such weights
    if (validated or stopping or saving) and not all(
        torch.isfinite(v).all() for v in t.model.state_dict().values() if v.is_floating_point()
    ):
        raise NonFiniteLoss(f"the weights or batch-norm statistics overflowed to inf/NaN at step {st.step}")
    if validated:
        t.last_result = run_validation(t, st, log)
    early = bool(config.patience) and st.bad_validations >= config.patience
    if validated or stopping or last or early or saving:
        t.save(st, "last.pt")
    return "interrupted" if stopping else "early stop" if early else "done" if last else None


def fit(t: Trainer, st: LoopState, log: RunLog, stop: StopSignal) -> str:
    """Train until the step budget, early stopping or a stop request; returns which."""
    from tqdm import tqdm

    bar = tqdm(
        total=t.total_steps, initial=st.step, desc="train", unit="step", dynamic_ncols=True, disable=not t.info.is_main
    )
    window_start, timed = time.perf_counter(), 0  # for the speed: steps since this process's window began
    t.model.train()
    loader = make_loader(t, "train", st)  # persistent workers: one loader, set_epoch per epoch
    t.val_loader = make_loader(t, "val")
    try:
        while st.step < t.total_steps:
            end_of_epoch, steps_before = False, st.step
            sampler = loader.sampler
            assert isinstance(sampler, EpochSampler)  # build_loader's
            sampler.set_epoch(st.epoch, st.step_in_epoch * t.local_batch)
            for batch in _iterate(loader):
                freeze_encoder(t, st.step)
                lr = t.optimizer.param_groups[0]["lr"]
                try:
                    loss, stopping = train_step(t, batch, stop.requested)
                except NonFiniteLoss as e:
                    raise NonFiniteLoss(f"{e} at step {st.step + 1}") from None
                st.step, st.step_in_epoch = st.step + 1, st.step_in_epoch + 1
                if st.step_in_epoch >= t.steps_per_epoch:  # every process stops here: equal step counts
                    st.epoch, st.step_in_epoch, end_of_epoch = st.epoch + 1, 0, True
                st.loss_sum, st.loss_steps, timed = st.loss_sum + loss, st.loss_steps + 1, timed + 1
                speed = timed * t.config.batch_size / max(time.perf_counter() - window_start, 1e-9)
                bar.update(1)
                bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {speed:.1f} img/s", refresh=False)
                if st.step % t.config.log_every == 0:
                    log.train(st.step, st.epoch, st.loss_sum / st.loss_steps, lr, speed)
                    st.loss_sum, st.loss_steps = 0.0, 0
                    window_start, timed = time.perf_counter(), 0
                reason = after_step(t, st, log, end_of_epoch, stopping)
                if reason:
                    return reason
                if end_of_epoch:
                    break
            if st.step == steps_before:
                raise RuntimeError(f"the train loader yielded no batch at epoch {st.epoch}, step {st.step}")
        return "done"
    finally:
        bar.close()

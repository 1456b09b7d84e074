"""`urbanseg train`: TFRecord shards -> a trained model in a run folder.

Reads top-down: setting up (config, data, model, loss, optimizer), one training step,
validation, checkpoints, the loop, the entry point. The run folder holds config.yaml,
last.pt / best.pt (self-describing checkpoints, see `urbanseg.checkpoint`), metrics.csv,
tb/ and curves.png (`urbanseg.training.runlog`). Under torchrun every process trains on its own
part of each global batch (DistributedDataParallel); only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from urbanseg import outputs
from urbanseg.config import TrainConfig, parse_size
from urbanseg.device import pick_device
from urbanseg.errors import UserError
from urbanseg.training import distributed as dist_
from urbanseg.training import resume as rs
from urbanseg.training.resume import LoopState, StopSignal, remove_stale_temporaries, restore, save
from urbanseg.training.runlog import RunLog, plot_curves

EXIT_DIVERGED = 3  # the loss became NaN/inf: not a usage error, but not a success either
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: last.pt saved, `--resume` continues


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs, built once by `setup`."""

    config: TrainConfig
    info: dist_.DistInfo
    device: torch.device
    raw: nn.Module  # the SegmentationModel (state dicts, eval)
    model: nn.Module  # what the training forward goes through (DDP / compiled)
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    train_set: Any
    val_set: Any
    label_set: Any
    steps_per_epoch: int
    total_steps: int
    local_batch: int
    val_loader: Any = None
    last_result: dict[str, Any] | None = None  # the latest validation, for the final report


# --------------------------------------------------------------------------- setup


def check_run_folder(config: TrainConfig) -> None:
    """--run must be new, empty or a training run (`outputs.check_owner`); one with a
    checkpoint only continues with --resume. A run without any checkpoint (stopped before
    its first save) starts again. Reads only."""
    outputs.check_owner(config.run, "train", what="--run")
    saved = [name for name in ("last.pt", "best.pt") if (config.run / name).exists()]
    if saved and not config.resume:
        raise UserError(f"{config.run} already holds a training run; continue it with --resume, or choose a new "
                        f"--run (it has {' and '.join(saved)})")


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on other flags (model, lr, epochs), or take the run's
    saved config on --resume."""
    if config.resume:
        return rs.merge_for_resume(config)
    model, model_args = config.model, config.model_args
    if config.init is not None:
        from urbanseg.checkpoint import load_checkpoint

        arch = load_checkpoint(config.init)["model"]
        kwargs = {k: v for k, v in arch["kwargs"].items() if k != "num_classes"}
        if model not in (None, arch["name"]):
            raise UserError(f"--model {model} but --init {config.init} holds a {arch['name']}; drop --model")
        if model_args and json.loads(model_args) != kwargs:
            raise UserError(f"--model-args {model_args} but --init {config.init} was built with {kwargs}")
        model, model_args = arch["name"], json.dumps(kwargs) if kwargs else ""
    if model is None:
        from urbanseg.models import DEFAULT_MODEL

        model = DEFAULT_MODEL
    lr = config.lr if config.lr is not None else (1e-3 if config.optimizer == "adamw" else 1e-2)
    epochs = config.epochs if config.epochs is not None or config.iters is not None else 50
    return dataclasses.replace(config, model=model, model_args=model_args, lr=lr, epochs=epochs)


def open_data(config: TrainConfig, info: dist_.DistInfo) -> tuple[Any, Any]:
    """The train and val ShardDatasets, checked against each other and the batch size."""
    from urbanseg.data.loader import ShardDataset

    for split in ("train", "val"):
        if not (config.data / split / "spec.json").is_file():
            raise UserError(f"{config.data / split / 'spec.json'} not found: --data must be a folder written by "
                            f"`urbanseg pack` with train and val splits")
    train_set, val_set = ShardDataset(config.data, "train"), ShardDataset(config.data, "val")
    if train_set.label_set.classes != val_set.label_set.classes:
        raise UserError(f"{config.data}: the train and val splits use different label sets; pack them together")
    if len(train_set) == 0 or len(val_set) == 0:
        raise UserError(f"{config.data}: the train or val split is empty")
    if config.batch_size > len(train_set):
        raise UserError(f"--batch-size {config.batch_size} is larger than the train split ({len(train_set)} "
                        f"images in {config.data / 'train'}); use --batch-size {len(train_set)} or less")
    if config.batch_size % info.world_size:
        raise UserError(f"--batch-size {config.batch_size} (global) does not split evenly over "
                        f"{info.world_size} processes; use a multiple of {info.world_size}")
    return train_set, val_set


def build_model(config: TrainConfig, label_set: Any) -> nn.Module:
    """create_model from the config; with --init, that checkpoint's weights (a new head if the
    class count differs or --new-head is given)."""
    from urbanseg.models import create_model

    kwargs = json.loads(config.model_args) if config.model_args else {}
    model = create_model(config.model, label_set.num_classes, encoder_weights=config.encoder_weights, **kwargs)
    if config.init is not None:
        load_init_weights(model, config.init, label_set, config.new_head)
    return model


def load_init_weights(model: nn.Module, path: Path, label_set: Any, new_head: bool) -> None:
    """--init: every weight of checkpoint `path`; the head too unless the class count
    differs or `new_head`. The same count with other class names needs `new_head`."""
    from urbanseg.checkpoint import load_checkpoint, load_pretrained
    from urbanseg.labels import LabelSet

    ckpt = load_checkpoint(path)
    old = LabelSet.from_dict(ckpt["label_set"]).classes
    if old != label_set.classes and len(old) == len(label_set.classes) and not new_head:
        raise UserError(f"--init {path} was trained on classes {list(old)}, the data has {list(label_set.classes)}: "
                        f"same count, different classes. Pass --new-head to fine-tune with a new head")
    if new_head:
        ckpt = {**ckpt, "model_state": {k: v for k, v in ckpt["model_state"].items()
                                        if not k.startswith(model.head_prefixes)}}
    report = load_pretrained(model, ckpt)
    if report.skipped:
        print(f"--init {path}: new {label_set.num_classes}-class head, {len(report.loaded)} tensors loaded",
              file=sys.stderr)


def build_optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    """AdamW or SGD (no weight decay on biases and norm weights) and a LambdaLR: linear
    warm-up, then poly (power 0.9, as in DeepLab) or cosine decay to 0 at `total_steps`."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    warmup, schedule = min(config.warmup, total_steps - 1), config.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return (1 - t) ** 0.9 if schedule == "poly" else 0.5 * (1 + math.cos(math.pi * t))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """auto: fp16 on CUDA; off on the CPU. bf16 autocast trains 1.3-2x faster on a CPU with
    native bf16 (AVX512-BF16/AMX) for most models, but slower for some (MobileNetV3 encoders,
    benchmarks/bench_train.py) and not at all on older CPUs, so it is opt-in: --amp bf16."""
    if config.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or --amp off")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16,
            "auto": torch.float16 if device.type == "cuda" else None}[config.amp]


def setup(config: TrainConfig, info: dist_.DistInfo, device: torch.device) -> Trainer:
    from urbanseg.training.losses import SegmentationLoss, class_weights, pixel_count_array

    rs.configure_determinism(config)
    train_set, val_set = open_data(config, info)
    label_set = train_set.label_set
    raw = build_model(config, label_set).to(device)
    if config.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    if config.sync_bn and info.enabled:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    model = raw
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    counts = pixel_count_array(train_set.spec["pixel_counts"], label_set.classes)
    criterion = SegmentationLoss(config.loss, weight=class_weights(counts, config.class_weights), ohem=config.ohem,
                                 ohem_thresh=config.ohem_thresh, ohem_min_kept=config.ohem_min_kept,
                                 ignore_index=label_set.ignore_index).to(device)
    steps_per_epoch = len(train_set) // config.batch_size  # every process: the same count, see `fit`
    total = config.iters or config.epochs * steps_per_epoch
    optimizer, scheduler = build_optimizer(raw, config, total)
    dtype = amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Trainer(config, info, device, raw, model, criterion, optimizer, scheduler, scaler, dtype, train_set,
                   val_set, label_set, steps_per_epoch, total, config.batch_size // info.world_size)


# --------------------------------------------------------------------------- steps


def train_step(t: Trainer, batch: dict[str, Any], stop_requested: bool) -> tuple[float, bool]:
    """One optimizer step on this process's part of a global batch.

    Returns (mean loss over all processes, whether any process asked to stop). Raises
    NonFiniteLoss, on every process, before the weights are touched."""
    images = batch["image"].to(t.device, non_blocking=True).float()  # (N, 3, H, W) 0..255
    labels = batch["label"].to(t.device, non_blocking=True)  # (N, H, W) int64, 255 ignore
    if t.config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(t.device.type, dtype=t.amp_dtype or torch.float32, enabled=t.amp_dtype is not None):
        logits = t.model(images)
    loss = t.criterion(logits, labels)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.unscale_(t.optimizer)  # a no-op without fp16
    grads = [p.grad for p in t.raw.parameters() if p.grad is not None]
    norm = nn.utils.get_total_norm(grads)  # (all-reduced by DDP already: the same on every process)
    bad = ~torch.isfinite(loss.detach())
    if not t.scaler.is_enabled():  # with fp16 an inf gradient is routine: the scaler skips the step
        bad = bad | ~torch.isfinite(norm)
    # one small all-reduce carries the loss and both flags, so all processes agree
    flags = torch.stack([loss.detach().float(), bad.float().to(loss.device),
                         torch.tensor(float(stop_requested), device=loss.device)])
    flags = dist_.all_reduce_sum(flags).cpu()
    if flags[1] > 0:
        raise NonFiniteLoss(f"the training loss is {loss.item():.4g} (gradient norm {norm.item():.4g}) "
                            f"on at least one process")
    if t.config.clip_grad:
        nn.utils.clip_grads_with_norm_(t.raw.parameters(), t.config.clip_grad, norm)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    return float(flags[0]) / t.info.world_size, bool(flags[2] > 0)


@torch.no_grad()
def validate(t: Trainer) -> tuple[float, dict[str, Any]]:
    """Mean loss and dataset-level scores (metrics.ConfusionMatrix, all-reduced) on `val`."""
    from urbanseg.evaluation.metrics import ConfusionMatrix

    t.raw.eval()
    cm = ConfusionMatrix(t.label_set.num_classes, t.label_set.ignore_index)
    sums = torch.zeros(2, dtype=torch.float64, device=t.device)  # loss x images, images
    for batch in _iterate(t.val_loader):
        images = batch["image"].to(t.device).float()
        labels = batch["label"].to(t.device)
        with torch.autocast(t.device.type, dtype=t.amp_dtype or torch.float32, enabled=t.amp_dtype is not None):
            logits = t.raw(images)
        sums += torch.tensor([float(t.criterion(logits, labels)) * len(images), len(images)], device=t.device)
        cm.update(logits.argmax(1), labels)
    cm.all_reduce()
    dist_.all_reduce_sum(sums)
    t.raw.train()
    return float(sums[0] / sums[1].clamp_min(1)), cm.compute()


def augment_settings(config: TrainConfig) -> dict[str, Any] | bool:
    """build_loader's `augment`: transforms.Augment's defaults (plus --crop), or only the
    crop with --no-augment, or nothing."""
    crop = None if config.crop is None else parse_size(config.crop, "--crop")
    if config.augment:
        return {"crop": crop}
    if crop is None:
        return False
    return {"crop": crop, "scale": (1.0, 1.0), "flip": 0.0, "brightness": 0.0, "contrast": 0.0,
            "saturation": 0.0, "hue": 0.0}


def make_loader(t: Trainer, split: str, st: LoopState | None = None):
    """This process's DataLoader over `split`: train shuffles per (seed, epoch), augments
    per (seed, epoch, index) and starts at `st`'s position; val keeps file order."""
    from urbanseg.data.loader import build_loader

    c, train = t.config, split == "train"
    return build_loader(c.data, split, batch_size=t.local_batch, train=train, workers=c.workers, seed=c.seed,
                        epoch=st.epoch if train else 0, start=st.step_in_epoch * t.local_batch if train else 0,
                        rank=t.info.rank, world_size=t.info.world_size,
                        augment=augment_settings(c) if train else False, drop_last=train)


def _iterate(loader):
    """Iterate `loader` without touching the global torch generator: creating a DataLoader
    iterator draws a seed from it, which would make a resumed run's dropout differ."""
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    yield from it


# --------------------------------------------------------------------------- the loop


def run_validation(t: Trainer, st: LoopState, log: RunLog) -> dict[str, Any]:
    """Validate, log, keep best.pt and the early-stopping counter up to date."""
    loss, result = validate(t)
    st.last_val = {"step": st.step, "val_loss": loss, "miou": result["miou"], "pixel_accuracy":
                   result["pixel_accuracy"], "mean_accuracy": result["mean_accuracy"],
                   "iou": result["per_class"]["iou"]}
    log.val(st.step, st.epoch, loss, result, t.label_set.classes)
    if (result["miou"] or 0.0) > st.best_miou:
        st.best_miou, st.best_step, st.bad_validations = result["miou"], st.step, 0
        save(t, st, "best.pt", with_train_state=False)
    else:
        st.bad_validations += 1
    return result


def after_step(t: Trainer, st: LoopState, log: RunLog, end_of_epoch: bool, stopping: bool) -> str | None:
    """Validate and save when due; return why training ends now, or None to go on."""
    c = t.config
    last = st.step >= t.total_steps
    validated = (c.val_every and st.step % c.val_every == 0) or (not c.val_every and end_of_epoch) or last
    if validated or stopping or (c.save_every and st.step % c.save_every == 0):
        # a finite loss and gradient can still make a huge update: never save such weights
        if not all(torch.isfinite(v).all() for v in t.raw.state_dict().values() if v.is_floating_point()):
            raise NonFiniteLoss(f"the weights or batch-norm statistics overflowed to inf/NaN at step {st.step}")
    if validated:
        t.last_result = run_validation(t, st, log)
    early = bool(c.patience) and st.bad_validations >= c.patience
    if validated or stopping or last or early or (c.save_every and st.step % c.save_every == 0):
        save(t, st, "last.pt")
    return "interrupted" if stopping else "early stop" if early else "done" if last else None


def fit(t: Trainer, st: LoopState, log: RunLog, stop: StopSignal) -> str:
    """Train until the step budget, early stopping or a stop request; returns which."""
    from tqdm import tqdm

    bar = tqdm(total=t.total_steps, initial=st.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not t.info.is_main)
    window = [0.0, 0, time.perf_counter()]  # loss sum, steps, start time of this logging window
    t.raw.train()
    loader = make_loader(t, "train", st)  # persistent workers: one loader, set_epoch per epoch
    t.val_loader = make_loader(t, "val")
    try:
        while st.step < t.total_steps:
            end_of_epoch, steps_before = False, st.step
            loader.sampler.set_epoch(st.epoch, st.step_in_epoch * t.local_batch)
            for batch in _iterate(loader):
                lr = t.optimizer.param_groups[0]["lr"]
                try:
                    loss, stopping = train_step(t, batch, stop.requested)
                except NonFiniteLoss as e:
                    raise NonFiniteLoss(f"{e} at step {st.step + 1}") from None
                st.step, st.step_in_epoch = st.step + 1, st.step_in_epoch + 1
                if st.step_in_epoch >= t.steps_per_epoch:  # every process stops here: equal step counts
                    st.epoch, st.step_in_epoch, end_of_epoch = st.epoch + 1, 0, True
                window[0], window[1] = window[0] + loss, window[1] + 1
                speed = window[1] * t.config.batch_size / max(time.perf_counter() - window[2], 1e-9)
                bar.update(1)
                bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {speed:.1f} img/s", refresh=False)
                if st.step % t.config.log_every == 0:
                    log.train(st.step, st.epoch, window[0] / window[1], lr, speed)
                    window = [0.0, 0, time.perf_counter()]
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


def train(config: TrainConfig) -> int:
    """`urbanseg train` (also one process of a torchrun job). Returns the exit code: 0 done,
    3 the loss diverged, 130 interrupted (last.pt saved)."""
    info = dist_.from_env()
    device = pick_device(config.device, local_rank=info.local_rank if info.enabled else None)
    dist_.setup(info, device)
    try:
        config = resolve_config(config)
        # Only rank 0 writes, so only it checks and locks the run folder; if it refuses,
        # it exits 2 and torchrun stops the other processes.
        with outputs.claim(config.run, "train", what="--run", check=lambda: check_run_folder(config),
                           enabled=info.is_main):
            return _train(config, info, device)
    finally:
        dist_.cleanup()


def _train(config: TrainConfig, info: dist_.DistInfo, device: torch.device) -> int:
    from urbanseg import config as cfg

    t = setup(config, info, device)
    last = config.run / "last.pt"
    if info.is_main:
        remove_stale_temporaries(config.run)
    st = restore(t, last) if config.resume and last.is_file() else LoopState()
    if info.is_main and not config.resume:
        cfg.save(config, config.run / "config.yaml")
    log = RunLog(config.run, enabled=info.is_main, resume_step=st.step if config.resume else None)
    try:
        with StopSignal() as stop:
            reason = fit(t, st, log, stop)
    except NonFiniteLoss as e:
        if info.is_main:
            print(f"urbanseg train: error: {e}; training stopped without saving. "
                  f"{last} keeps the last good state{'' if last.is_file() else ' (none was saved yet)'}. "
                  f"Try a lower --lr, --clip-grad 1.0 or --amp off", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        log.close()
        if info.is_main and (config.run / "metrics.csv").is_file():
            plot_curves(config.run / "metrics.csv", config.run / "curves.png")
    if info.is_main:
        report(t, st, reason)
    return EXIT_INTERRUPTED if reason == "interrupted" else 0


def report(t: Trainer, st: LoopState, reason: str) -> None:
    from urbanseg.evaluation.metrics import format_table

    run = t.config.run
    print(f"training {reason} at step {st.step}/{t.total_steps}; best val mIoU "
          f"{st.best_miou:.4f} at step {st.best_step} -> {run / 'best.pt'}; state -> {run / 'last.pt'}")
    if reason == "interrupted":
        print(f"continue with: urbanseg train --data {t.config.data} --run {run} --resume")
    if t.last_result is not None:
        print(f"\nvalidation at step {st.step}:\n" + format_table(t.last_result, t.label_set.classes))

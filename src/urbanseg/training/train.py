"""`urbanseg train`: TFRecord shards -> a trained model in a run folder.

Reads top-down: the config (defaults, --resume), the data, model, loss and optimizer
(`setup` builds the `Trainer`), the checks made before the first step (memory, crop size,
every shard's CRCs), the entry point and its final report. The loop itself is
`urbanseg.training.loop`. The run folder holds config.yaml, last.pt / best.pt
(self-describing checkpoints, see `urbanseg.checkpoint`), metrics.csv, tb/ and curves.png
(`urbanseg.training.runlog`). Under torchrun every process trains on its own part of each
global batch (DistributedDataParallel); only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from urbanseg import memory, outputs
from urbanseg.config import TrainConfig, parse_size
from urbanseg.config import save as save_config
from urbanseg.data.tfrecord import verify_shards
from urbanseg.device import pick_device
from urbanseg.errors import UserError
from urbanseg.evaluation.metrics import format_table
from urbanseg.labels import LabelSet
from urbanseg.models.convert import resolve_model_checkpoint
from urbanseg.projection import find_projection
from urbanseg.training import distributed as dist_
from urbanseg.training.finetune import dominant_members, predicted_counts, project_head
from urbanseg.training.loop import NonFiniteLoss, StopSignal, fit
from urbanseg.training.resume import configure_determinism, merge_for_resume, remove_stale_temporaries
from urbanseg.training.runlog import RunLog, plot_curves
from urbanseg.training.trainer import LoopState, Trainer

if TYPE_CHECKING:
    from urbanseg.data.loader import ShardDataset
    from urbanseg.labels import LabelSet
    from urbanseg.models import SegmentationModel

EXIT_DIVERGED = 3  # the loss became NaN/inf: not a usage error, but not a success either
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: last.pt saved, `--resume` continues


# --------------------------------------------------------------------------- setup


def check_run_folder(config: TrainConfig) -> None:
    """--run must be new, empty or a training run (`outputs.check_owner`); one with a
    checkpoint only continues with --resume. A run without any checkpoint (stopped before
    its first save) starts again. Reads only."""
    outputs.check_owner(config.run, "train", what="--run")
    saved = [name for name in ("last.pt", "best.pt") if (config.run / name).exists()]
    if saved and not config.resume:
        raise UserError(
            f"{config.run} already holds a training run; continue it with --resume, or choose a new "
            f"--run (it has {' and '.join(saved)})"
        )


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on other flags (model, lr, epochs), or take the run's
    saved config on --resume."""
    if config.resume:
        return merge_for_resume(config)
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


def open_data(config: TrainConfig, info: dist_.DistInfo) -> tuple[ShardDataset, ShardDataset]:
    """The train and val ShardDatasets, checked against each other and the batch size."""
    from urbanseg.data.loader import ShardDataset

    for split in ("train", "val"):
        if not (config.data / split / "spec.json").is_file():
            raise UserError(
                f"{config.data / split / 'spec.json'} not found: --data must be a folder written by "
                f"`urbanseg pack` with train and val splits"
            )
    train_set, val_set = ShardDataset(config.data, "train"), ShardDataset(config.data, "val")
    if train_set.label_set.classes != val_set.label_set.classes:
        raise UserError(f"{config.data}: the train and val splits use different label sets; pack them together")
    if len(train_set) == 0 or len(val_set) == 0:
        raise UserError(f"{config.data}: the train or val split is empty")
    if config.batch_size > len(train_set):
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the train split ({len(train_set)} "
            f"images in {config.data / 'train'}); use --batch-size {len(train_set)} or less"
        )
    if config.batch_size % info.world_size:
        raise UserError(
            f"--batch-size {config.batch_size} (global) does not split evenly over "
            f"{info.world_size} processes; use a multiple of {info.world_size}"
        )
    return train_set, val_set


def build_model(config: TrainConfig, label_set: LabelSet, sample: Sequence[torch.Tensor] = ()) -> SegmentationModel:
    """create_model from the config; with --init, that checkpoint's weights (a new head if the
    class count differs or --new-head is given; from the old head when it projects onto the
    data's label set, its dominant classes counted on the training images `sample`)."""
    from urbanseg.models import create_model

    kwargs = json.loads(config.model_args) if config.model_args else {}
    assert config.model is not None  # resolve_config fills it in
    model = create_model(config.model, label_set.num_classes, encoder_weights=config.encoder_weights, **kwargs)
    if config.init is not None:
        load_init_weights(model, config.init, label_set, config.new_head, sample=sample)
    return model


# Training images the --init model is run on to pick each coarse class's dominant member.
INIT_SAMPLE = 16


def init_sample(train_set: ShardDataset) -> list[torch.Tensor]:
    """Up to INIT_SAMPLE training images spread over the split, unaugmented (3, H, W) uint8."""
    n = len(train_set)
    picks = sorted({i * n // min(n, INIT_SAMPLE) for i in range(min(n, INIT_SAMPLE))})
    return [train_set[i]["image"] for i in picks]


def load_init_weights(
    model: SegmentationModel,
    path: Path | str,
    label_set: LabelSet,
    new_head: bool,
    sample: Sequence[torch.Tensor] = (),
) -> None:
    """--init: every weight of checkpoint `path`; the head too unless the class count
    differs or `new_head`. The same count with other class names needs `new_head`. When
    the data's label set is a coarser projection of the checkpoint's (classes19 ->
    categories8/7) and `new_head` is not given, the new head starts from the old one
    (`finetune.project_head`): each coarse class from its member the checkpoint's model
    predicts most on the images `sample` ((3, H, W) 0..255 tensors; none: its first)."""
    from urbanseg.checkpoint import load_checkpoint, load_pretrained, model_from_checkpoint

    ckpt = load_checkpoint(path)
    old_set = LabelSet.from_dict(ckpt["label_set"])
    old = old_set.classes
    coarser = len(old) > len(label_set.classes) and not new_head
    projection = find_projection(old_set, label_set) if coarser else None
    if old != label_set.classes and len(old) == len(label_set.classes) and not new_head:
        raise UserError(
            f"--init {path} was trained on classes {list(old)}, the data has {list(label_set.classes)}: "
            f"same count, different classes. Pass --new-head to fine-tune with a new head"
        )
    if new_head:
        ckpt = {
            **ckpt,
            "model_state": {k: v for k, v in ckpt["model_state"].items() if not k.startswith(model.head_prefixes)},
        }
    report = load_pretrained(model, ckpt)
    if projection is not None:
        counts = predicted_counts(model_from_checkpoint(ckpt), sample, old_set.num_classes) if sample else None
        dominant = dominant_members(projection, counts) if counts is not None else None
        project_head(model, ckpt["model_state"], projection, dominant=dominant)
        print(
            f"--init {path}: new {label_set.num_classes}-class head started from the {old_set.name} head "
            f"({old_set.name} -> {label_set.name} through the Cityscapes table), {len(report.loaded)} tensors loaded",
            file=sys.stderr,
        )
    elif report.skipped:
        print(
            f"--init {path}: new {label_set.num_classes}-class head, {len(report.loaded)} tensors loaded",
            file=sys.stderr,
        )


def resolve_init(config: TrainConfig, info: dist_.DistInfo) -> TrainConfig:
    """--init naming a pretrained model (smp hub id, hf:ID, a save_pretrained folder) ->
    the path of its converted checkpoint, which config.yaml then records. Rank 0 converts
    (on first use) and tells the others."""
    if config.init is None:
        return config
    path, problem = None, None
    if info.is_main:
        try:
            path = resolve_model_checkpoint(config.init)
        except UserError as e:
            problem = str(e)
    path, problem = dist_.broadcast_from_main((path, problem))
    if problem:
        raise UserError(problem)
    # absolute: config.yaml records it, and --resume compares it, from any folder
    return dataclasses.replace(config, init=str(Path(path).absolute()) if path is not None else None)


def build_optimizer(
    model: nn.Module, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW or SGD (no weight decay on biases and norm weights) and a LambdaLR: linear
    warm-up, then poly (power 0.9, as in DeepLab) or cosine decay to 0 at `total_steps`."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer: torch.optim.Optimizer
    assert config.lr is not None  # resolve_config fills it in
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
    return {
        "off": None,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "auto": torch.float16 if device.type == "cuda" else None,
    }[config.amp]


def setup(config: TrainConfig, info: dist_.DistInfo, device: torch.device) -> Trainer:
    """Build the Trainer, after the checks that must pass before any step (see `preflight`)."""
    from urbanseg.training.losses import SegmentationLoss, class_weights, pixel_count_array

    configure_determinism(config)
    train_set, val_set = open_data(config, info)
    label_set = train_set.label_set
    preflight(config, info, device, train_set)
    # Resuming from last.pt: its weights replace --init's, so the --init file is not needed again.
    init = config.init is not None and not (config.resume and (config.run / "last.pt").is_file())
    model = build_model(
        config if init else dataclasses.replace(config, init=None), label_set, init_sample(train_set) if init else ()
    ).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.sync_bn and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapped: nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # --freeze-encoder switches the encoder's requires_grad off for its first steps
        # (`loop.freeze_encoder`): DDP must then find the parameters that get no gradient
        # instead of waiting for them. It hands them none (not zeros), so the optimizer skips
        # them as in one process. The cost, one walk of the autograd graph per step, is paid
        # only with the flag.
        wrapped = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.freeze_encoder > 0,
        )
    if config.compile:
        wrapped = cast(nn.Module, torch.compile(wrapped))
    counts = pixel_count_array(train_set.spec.pixel_counts, label_set.classes)
    criterion = SegmentationLoss(
        config.loss,
        weight=class_weights(counts, config.class_weights),
        ohem=config.ohem,
        ohem_thresh=config.ohem_thresh,
        ohem_min_kept=config.ohem_min_kept,
        ignore_index=label_set.ignore_index,
    ).to(device)
    steps_per_epoch = len(train_set) // config.batch_size  # every process: the same count, see `fit`
    total = config.iters if config.iters is not None else cast(int, config.epochs) * steps_per_epoch  # resolved
    optimizer, scheduler = build_optimizer(model, config, total)
    dtype = amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Trainer(
        config,
        info,
        device,
        model,
        wrapped,
        criterion,
        optimizer,
        scheduler,
        scaler,
        dtype,
        train_set,
        val_set,
        label_set,
        steps_per_epoch,
        total,
        config.batch_size // info.world_size,
    )


# --------------------------------------------------------------------------- before the first step


def preflight(config: TrainConfig, info: dist_.DistInfo, device: torch.device, train_set: ShardDataset) -> None:
    """What must hold before the first step, checked in seconds rather than found hours in:
    the batch fits in memory (`check_memory`), a --crop no larger than the images (a
    warning; an error beyond twice their size), every record of both splits intact
    (`verify_data`)."""
    data = (train_set.spec.width, train_set.spec.height)
    size = parse_size(config.crop, "--crop") if config.crop else data
    check_memory(config, info, device, size, data, train_set.label_set.num_classes)
    if size[0] > 2 * data[0] or size[1] > 2 * data[1]:  # the memory floor is a floor: this got OOM-killed
        raise UserError(
            f"--crop {config.crop} is more than twice the training images ({data[0]}x{data[1]} in "
            f"{config.data / 'train'}): most of every crop would be padding; use --crop "
            f"{min(size[0], data[0])}x{min(size[1], data[1])} or smaller"
        )
    if info.is_main and (size[0] > data[0] or size[1] > data[1]):
        print(
            f"urbanseg train: warning: --crop {config.crop} is larger than the training images "
            f"({data[0]}x{data[1]} in {config.data / 'train'}): the crops are padded with ignored pixels, so "
            f"every step computes on padding; use --crop {min(size[0], data[0])}x{min(size[1], data[1])} or "
            f"smaller",
            file=sys.stderr,
        )
    verify_data(config, info)


def check_memory(
    config: TrainConfig,
    info: dist_.DistInfo,
    device: torch.device,
    size: tuple[int, int],
    data: tuple[int, int],
    num_classes: int,
) -> None:
    """Refuse a crop (or whole images) of `size` whose batch alone cannot fit:
    `memory.train_step_floor` of this process's batch, on its GPU, or on the CPU times the
    processes sharing this machine. The crop suggested is no larger than the `data`."""

    local_batch = config.batch_size // info.world_size
    per_sample = memory.train_step_floor(1, size, num_classes)
    if device.type == "cuda":
        have, where, sharing = torch.cuda.mem_get_info(device)[0], f"{device}", 1
    else:
        have, where, sharing = memory.available_bytes(), "this machine", info.local_world_size
    room = have // sharing  # for one process
    w, h = memory.fitting_size(size, room / local_batch / (per_sample / (size[0] * size[1])))
    fixes = [f"a smaller --crop (about {min(w, data[0])}x{min(h, data[1])} at most at this batch size)"]
    if room >= per_sample and config.batch_size > info.world_size:
        fixes.append(f"--batch-size {room // per_sample * info.world_size}")
    what = (
        f"--crop {config.crop}" if config.crop else f"training on whole {size[0]}x{size[1]} images"
    ) + f" at --batch-size {config.batch_size} (inputs and logits alone, before the model's activations)"
    memory.require(per_sample * local_batch * sharing, what, "use " + " or ".join(fixes), have=have, where=where)


def verify_data(config: TrainConfig, info: dist_.DistInfo) -> None:
    """Read every record of the train and val splits once, checking both CRCs, the index
    files and the record ids (`tfrecord.verify_shards`): a corrupt shard stops the run here,
    not hours in. Rank 0 reads (about 1 s per GB from the page cache, docs/benchmarks.md),
    the other processes wait for its verdict."""

    problem = None
    if info.is_main:
        try:
            for split in ("train", "val"):
                verify_shards(config.data / split)
        except UserError as e:
            problem = str(e)
    problem = dist_.broadcast_from_main(problem)
    if problem:
        raise UserError(
            f"{problem}. Found by checking every record before the first step: nothing was written "
            f"to {config.run}, and the same command runs once the shards are re-packed"
        )


# --------------------------------------------------------------------------- the command


def train(config: TrainConfig) -> int:
    """`urbanseg train` (also one process of a torchrun job). Returns the exit code: 0 done,
    3 the loss diverged, 130 interrupted (last.pt saved)."""
    info = dist_.from_env()
    device = pick_device(config.device, local_rank=info.local_rank if info.enabled else None)
    dist_.setup(info, device)
    try:
        config = resolve_config(resolve_init(config, info))
        with _claim_run(config, info):
            return _train(config, info, device)
    finally:
        dist_.cleanup()


def _claim_run(config: TrainConfig, info: dist_.DistInfo) -> contextlib.AbstractContextManager:
    """The run folder's claim (`outputs.claim`, `check_run_folder`). Only rank 0 writes, so
    only it checks and locks the folder; under torchrun it tells the others whether it
    could, and they stop with a one-line error instead of a gloo traceback when it did not."""
    claim = outputs.claim(
        config.run, "train", what="--run", check=lambda: check_run_folder(config), enabled=info.is_main
    )
    if not info.enabled:
        return claim
    held, failure = contextlib.ExitStack(), None
    try:
        held.enter_context(claim)
    except Exception as e:  # rank 0's refusal (UserError, a read-only folder): told, then raised
        failure = e
    if dist_.broadcast_from_main(failure is not None):
        if failure is not None:
            raise failure
        raise UserError(f"--run {config.run}: the main process (rank 0) could not take it; see its message")
    return held


def _train(config: TrainConfig, info: dist_.DistInfo, device: torch.device) -> int:
    t = setup(config, info, device)
    last = config.run / "last.pt"
    if info.is_main:
        remove_stale_temporaries(config.run)
    st = t.restore(last) if config.resume and last.is_file() else LoopState()
    if info.is_main and not config.resume:
        # `data` absolute (--init is already): evaluate/predict/export --run work from any folder.
        save_config(dataclasses.replace(config, data=config.data.absolute()), config.run / "config.yaml")
    log = RunLog(config.run, enabled=info.is_main, resume_step=st.step if config.resume else None)
    try:
        with StopSignal() as stop:
            reason = fit(t, st, log, stop)
    except NonFiniteLoss as e:
        if info.is_main:
            print(
                f"urbanseg train: error: {e}; training stopped without saving. "
                f"{last} keeps the last good state{'' if last.is_file() else ' (none was saved yet)'}. "
                f"Try a lower --lr, --clip-grad 1.0 or --amp off",
                file=sys.stderr,
            )
        return EXIT_DIVERGED
    finally:
        log.close()
        if info.is_main and (config.run / "metrics.csv").is_file():
            plot_curves(config.run / "metrics.csv", config.run / "curves.png")
    if info.is_main:
        report(t, st, reason)
    return EXIT_INTERRUPTED if reason == "interrupted" else 0


def report(t: Trainer, st: LoopState, reason: str) -> None:
    """The final lines: where training ended and the files it left, only those that exist
    (no best.pt before the first validation), then the last validation's table."""

    run = t.config.run
    best, last = run / "best.pt", run / "last.pt"
    parts = [f"training {reason} at step {st.step}/{t.total_steps}"]
    if st.best_step >= 0 and best.is_file():
        parts.append(f"best val mIoU {st.best_miou:.4f} at step {st.best_step} -> {best}")
    else:
        parts.append("no validation yet")
    if last.is_file():
        parts.append(f"state -> {last}")
    print("; ".join(parts))
    if reason == "interrupted":
        print(f"continue with: urbanseg train --data {t.config.data} --run {run} --resume")
    if t.last_result is not None and st.last_val is not None:
        print(f"\nvalidation at step {st.last_val['step']}:\n" + format_table(t.last_result, t.label_set.classes))

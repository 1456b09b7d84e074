"""Self-describing checkpoints: save atomically, load safely, rebuild the model.

A checkpoint is one `torch.save`d dict that loads with `torch.load(weights_only=True)`
(tensors and plain dicts/lists/str/int/float/bool/None only, no pickled classes):

    format_version    int, FORMAT_VERSION
    urbanseg_version  str
    model             {"name": str, "kwargs": {...}}: `create_model(name, **kwargs)`
    model_state       the model's state dict (includes the mean/std buffers)
    label_set         LabelSet.to_dict(): names, palette, id mapping
    input_size        [W, H] the model was trained at
    normalization     {"mean": [3 floats], "std": [3 floats]} on the 0..255 scale
    config            the resolved training config (dict)
    step, epoch       int
    metrics           dict, e.g. {"miou": 0.71}
    train_state       (last.pt only) optimizer, scheduler, scaler, RNG states, data position
"""

from __future__ import annotations

import errno
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from urbanseg import __version__
from urbanseg.errors import UserError
from urbanseg.labels import LabelSet
from urbanseg.models.registry import SegmentationModel, create_model
from urbanseg.schema import Node, check_version
from urbanseg.torchfile import torch_load
from urbanseg.util import atomic_path

FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version",
    "urbanseg_version",
    "model",
    "model_state",
    "label_set",
    "input_size",
    "normalization",
    "config",
    "step",
    "epoch",
    "metrics",
)
# What torch.load(weights_only=True) accepts besides tensors and containers.
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def save_checkpoint(path: Path | str, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically (temporary file, fsync, rename): a crash or
    a failed write leaves any previous file at `path` intact.

    Raises ValueError for a missing contract key and TypeError for a value that
    `torch.load(weights_only=True)` would refuse (e.g. a numpy array), naming its key;
    OSError naming `path` when the write fails (e.g. ENOSPC for a full disk)."""

    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks the keys {missing} (see urbanseg.checkpoint)")
    _check_plain(payload, "payload")
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data
    except RuntimeError as e:
        # torch.save reports a failed write as "[enforce fail at inline_container.cc:...]";
        # the OSError behind it (a full disk) is its context. Without one, a disk with less
        # free space than the tensors need is full too.
        code = _errno_in(e)
        if code is None and shutil.disk_usage(Path(path).parent).free < _tensor_bytes(payload):
            code = errno.ENOSPC
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e


def _errno_in(error: BaseException) -> int | None:
    """The errno of the first OSError in `error`'s chain of causes and contexts."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError) and link.errno is not None:
            return link.errno
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _check_plain(value: Any, where: str) -> None:
    # numpy scalars subclass float/int but pickle as numpy objects, which weights_only refuses.
    if isinstance(value, torch.Tensor) or (isinstance(value, _PLAIN) and type(value).__module__ != "numpy"):
        return
    if isinstance(value, (dict, OrderedDict)):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__name__}, which "
            f"torch.load(weights_only=True) refuses; convert it to a tensor, list or plain value"
        )


def load_checkpoint(path: Path | str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `torch.load(weights_only=True)` and check every field of the
    contract (`check_checkpoint`). A missing, unreadable, truncated, foreign or malformed
    file, one holding pickled Python objects, or one from a newer urbanseg -> UserError
    naming it (and the field)."""
    path = Path(path)
    if not path.is_file():
        hint = " (a folder: give the .pt file inside, e.g. best.pt)" if path.is_dir() else ""
        raise UserError(
            f"checkpoint {path} does not exist{hint}; give a .pt file written by "
            f"`urbanseg train`, e.g. runs/NAME/best.pt"
        )
    ckpt = torch_load(path, map_location, what="checkpoint")
    if not isinstance(ckpt, dict) or not {"format_version", "model", "model_state"} <= ckpt.keys():
        got = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(
            f"{path} is a PyTorch file but not an urbanseg checkpoint (found {got}); "
            f"give a best.pt or last.pt written by `urbanseg train`"
        )
    check_checkpoint(ckpt, f"checkpoint {path}")
    return ckpt


def check_checkpoint(ckpt: dict[str, Any], where: str) -> None:
    """Check a loaded checkpoint against the contract (module docstring): format version,
    model {name, kwargs with num_classes}, a state dict of tensors, a label set with as
    many classes as the head, input_size two positive ints, normalization 3 + 3 numbers
    (std > 0), step/epoch >= 0, config and metrics objects. FormatError naming the field."""

    doc = Node.root(ckpt, file=where, fix="use another checkpoint (best.pt or last.pt of the run) or train again")
    check_version(doc, FORMAT_VERSION, "checkpoint")
    doc["urbanseg_version"].text()
    doc["model"]["name"].text()
    heads = doc["model"]["kwargs"]["num_classes"].integer(min=1)
    state = doc["model_state"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.obj().items()):
        raise state.error("a state dict {name: tensor}")
    classes = LabelSet.read(doc["label_set"]).num_classes
    if classes != heads:
        raise doc["label_set"]["classes"].invalid(
            f"lists {classes} classes, but the model's head has {heads} (`model.kwargs.num_classes`)"
        )
    doc["input_size"].ints(length=2, min=1)
    for key in ("mean", "std"):
        for value in doc["normalization"][key].items(length=3):
            value.number(positive=key == "std")
    doc["config"].obj()
    doc["metrics"].obj()
    doc["step"].integer(min=0)
    doc["epoch"].integer(min=0)
    doc["train_state"].maybe(Node.obj)


def build_payload(
    model: SegmentationModel,
    *,
    label_set: Any,
    input_size: tuple[int, int] | list[int],
    config: dict,
    step: int,
    epoch: int,
    metrics: dict[str, Any],
    train_state: dict | None = None,
) -> dict[str, Any]:
    """The contract's payload for a `urbanseg.models.SegmentationModel` (`model`)."""

    payload = {
        "format_version": FORMAT_VERSION,
        "urbanseg_version": __version__,
        "model": model.model_args,
        "model_state": model.state_dict(),
        "label_set": label_set.to_dict(),
        "input_size": [int(v) for v in input_size],
        "normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
        "config": config,
        "step": int(step),
        "epoch": int(epoch),
        "metrics": dict(metrics),
    }
    if train_state is not None:
        payload["train_state"] = train_state
    return payload


def model_from_checkpoint(ckpt: dict[str, Any] | Path | str) -> SegmentationModel:
    """Rebuild the model a checkpoint (dict or path) describes, with its weights, in
    eval mode. No weights are downloaded: the state dict holds them all."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    arch = ckpt["model"]
    model = create_model(arch["name"], **arch["kwargs"])
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as e:
        raise UserError(
            f"the checkpoint's weights do not fit its model {arch} "
            f"(written by urbanseg {ckpt.get('urbanseg_version')}?): {str(e)[:300]}"
        ) from None
    return model.eval()


@dataclass
class LoadReport:
    """What `load_pretrained` did: tensor names loaded and skipped (the head)."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"loaded {len(self.loaded)} tensors"
        if self.skipped:
            text += f"; new head, not loaded: {', '.join(self.skipped)}"
        return text


def load_pretrained(
    model: SegmentationModel, ckpt: dict[str, Any] | Path | str, strict_head: bool = False
) -> LoadReport:
    """Fine-tuning: load every weight of checkpoint `ckpt` into `model` (the same
    architecture), except head tensors whose shape differs (another class count):
    those keep their fresh initialisation and are listed in the report.

    strict_head=True requires the head to fit too. A different architecture or
    non-head tensor that does not fit -> UserError."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    mine, theirs = model.model_args, ckpt["model"]
    strip = lambda a: {k: v for k, v in a["kwargs"].items() if k != "num_classes"}  # noqa: E731
    if mine["name"] != theirs["name"] or strip(mine) != strip(theirs):
        raise UserError(
            f"the checkpoint holds a {theirs['name']} {strip(theirs)}, the model is a "
            f"{mine['name']} {strip(mine)}: fine-tune the same architecture"
        )
    target, source = model.state_dict(), ckpt["model_state"]
    report, state = LoadReport(), {}
    for key, value in target.items():
        if key in source and source[key].shape == value.shape:
            state[key] = source[key]
            report.loaded.append(key)
        elif key.startswith(model.head_prefixes) and not strict_head:
            state[key] = value
            report.skipped.append(key)
        else:
            got = tuple(source[key].shape) if key in source else "nothing"
            raise UserError(f"checkpoint tensor {key}: expected shape {tuple(value.shape)}, found {got}")
    model.load_state_dict(state)
    return report


def summarize_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The facts a report shows about a checkpoint: model, parameters, label set,
    input size, step, epoch, metrics, urbanseg version, whether it can be resumed."""
    state = ckpt["model_state"]
    params = sum(
        v.numel()
        for k, v in state.items()
        if v.is_floating_point() and k not in ("mean", "std") and "running_" not in k
    )
    label_set = ckpt.get("label_set") or {}
    return {
        "model": ckpt["model"]["name"],
        "model_kwargs": ckpt["model"]["kwargs"],
        "parameters": params,
        "label_set": label_set.get("name"),
        "classes": list(label_set.get("classes", [])),
        "input_size": ckpt.get("input_size"),
        "step": ckpt.get("step"),
        "epoch": ckpt.get("epoch"),
        "metrics": ckpt.get("metrics", {}),
        "urbanseg_version": ckpt.get("urbanseg_version"),
        "resumable": "train_state" in ckpt,
    }


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of `summarize_checkpoint`'s facts, for a report header."""
    miou = summary["metrics"].get("miou")
    kwargs = ", ".join(f"{k}={v}" for k, v in summary["model_kwargs"].items())
    return [
        (
            "model",
            f"{summary['model']}"
            + (f" ({kwargs})" if kwargs else "")
            + f", {summary['parameters'] / 1e6:.2f} M parameters",
        ),
        ("classes", f"{summary['label_set']} ({len(summary['classes'])}): {', '.join(summary['classes'])}"),
        ("input size", "x".join(map(str, summary["input_size"] or []))),
        (
            "progress",
            f"step {summary['step']}, epoch {summary['epoch']}"
            + (f", validation mIoU {miou:.4f}" if isinstance(miou, (int, float)) else ""),
        ),
        ("written by", f"urbanseg {summary['urbanseg_version']}" + (", resumable" if summary["resumable"] else "")),
    ]


def format_summary(summary: dict[str, Any]) -> str:
    """One line per fact of `summarize_checkpoint`, for a terminal."""
    return "\n".join(f"{label}: {value}" for label, value in summary_rows(summary))

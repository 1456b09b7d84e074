"""Typed, frozen configuration for every stage, validated once and saved next to every
artifact (a run folder, a prepared dataset, a shard folder tells how it was made).

Each command's flags are generated from its dataclass (field name `batch_size` ->
`--batch-size`, help from the field's metadata), so a flag, its type, default and help
have one source of truth. Only the standard library is imported here: `--help` stays
instant.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from urbanseg.errors import UserError
from urbanseg.schema import describe
from urbanseg.util import atomic_write_text


def opt(default: Any = dataclasses.MISSING, help: str = "", **extra: Any) -> Any:
    """A config field with its command-line help. `extra` may hold `short` (e.g. "-o"),
    `metavar`, or `positional=True` (an argument without a flag, e.g. `urbanseg import SOURCE`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'512x256' -> (512, 256) as (width, height)."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise UserError(f"{flag} {text!r} is not WIDTHxHEIGHT; use for example {flag} 512x256") from None
    if w < 8 or h < 8:
        raise UserError(f"{flag} {text!r} is too small; width and height must be at least 8 pixels")
    return w, h


MAX_SCALE = 4.0  # a view 16x the pixels: more is no test-time augmentation, only a way to run out of memory


def parse_scales(text: str, flag: str = "--scales") -> tuple[float, ...]:
    """'0.75,1,1.25' -> (0.75, 1.0, 1.25): distinct numbers in (0, MAX_SCALE], comma-separated."""
    try:
        scales = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(
            f"{flag} {text!r} is not a comma-separated list of numbers; use for example {flag} 0.75,1,1.25"
        ) from None
    bad = [s for s in scales if not (math.isfinite(s) and 0 < s <= MAX_SCALE)]
    check(
        not bad,
        f"{flag} {text!r}: every scale must be a number > 0 and at most {MAX_SCALE:g} (got {bad[0] if bad else ''}); "
        "mmsegmentation's aug-test uses 0.5 to 1.75",
    )
    check(len(set(scales)) == len(scales), f"{flag} {text!r} repeats a scale; give each scale once")
    return scales


TTA_HELP = (
    "test-time augmentation: flip also runs every view mirrored left-right; the views' softmax "
    "probabilities are averaged at the output size (mmsegmentation's aug-test)"
)
SCALES_HELP = (
    f"test-time scales, comma-separated (e.g. 0.75,1,1.25), each > 0 and at most {MAX_SCALE:g}: each "
    "multiplies the size the model runs at; averaged like --tta flip"
)


def check(condition: bool, message: str) -> None:
    """Raise a UserError with `message` unless `condition` holds (survives `python -O`)."""
    if not condition:
        raise UserError(message)


def check_device(value: str, flag: str = "--device") -> None:
    """The one rule for a device flag: auto, cpu, cuda or cuda:N (whether it exists is
    checked when it is used, by `urbanseg.device.pick_device`)."""
    index = value[len("cuda:") :] if value.startswith("cuda:") else "0"
    check(
        value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and index.isdigit()),
        f"{flag} {value!r}: use auto, cpu, cuda or cuda:N",
    )


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config dataclass (paths as strings)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def save(config: Any, path: Path) -> None:
    """Write the resolved config as YAML (or JSON for a .json path), atomically."""

    data = to_dict(config)
    if path.suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    atomic_write_text(path, text)


def from_dict(cls: type, data: Any) -> Any:
    """A config dataclass from a plain mapping (a saved config.yaml): each value checked
    against its field's type (a str for a Path, one of a Literal's choices, ...), then by
    the class's own checks. Absent keys take their defaults. UserError naming the key."""

    if not isinstance(data, dict):
        raise UserError(f"it holds {describe(data)}, expected a mapping of flag names to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"unknown keys {unknown}")
    missing = [
        k
        for k, f in fields.items()
        if k not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(f"`{missing[0]}` is missing")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        ok, value = _typed(value, hints[key])
        if not ok:
            raise UserError(f"`{key}` is {describe(data[key])}, expected {_type_name(hints[key])}")
        values[key] = value
    return cls(**values)


def _typed(value: Any, tp: Any) -> tuple[bool, Any]:
    """(whether `value` read from a file fits the type hint `tp`, the value as that type)."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        return optional, None
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp), value
    if typing.get_origin(tp) in (list, tuple):
        (item,) = set(typing.get_args(tp)) - {Ellipsis}
        typed = [_typed(v, item) for v in value] if isinstance(value, list) else [(False, None)]
        return all(ok for ok, _ in typed), typing.get_origin(tp)(v for _, v in typed)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is Path:
        return isinstance(value, str), Path(value) if isinstance(value, str) else value
    return isinstance(value, tp) and not (tp is int and isinstance(value, bool)), value


def _type_name(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    if typing.get_origin(tp) is Literal:
        name = "one of " + ", ".join(map(str, typing.get_args(tp)))
    elif typing.get_origin(tp) in (list, tuple):
        name = "a list"
    else:
        name = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(
            tp, str(tp)
        )
    return name + (" or null" if optional else "")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (calling its default factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of the dataclass `cls` to `parser`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=tp, metavar=f.name.upper(), help=f.metadata.get("help", ""))
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [f.metadata["short"], flag] if "short" in f.metadata else [flag]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else _default(f)
        help_text = f.metadata.get("help", "")
        if not required and default not in (None, False, [], ""):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "required": required}
        if tp is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
            kwargs.pop("required")
        elif typing.get_origin(tp) is Literal:
            kwargs.update(choices=typing.get_args(tp), default=default)
        elif typing.get_origin(tp) in (list, tuple):
            (item,) = set(typing.get_args(tp)) - {Ellipsis}
            kwargs.update(nargs="+", type=item, default=default, metavar=f.name.upper())
        else:
            kwargs.update(type=tp, default=default, metavar=f.metadata.get("metavar", f.name.upper()))
        parser.add_argument(*names, **kwargs)


# The flags typed on the command line (field names), set by `urbanseg.cli` for the command
# it runs; None when a config is built in Python. `train --resume` needs them: a flag typed
# with its default value differs from a run saved with another one just the same.
TYPED_FLAGS: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("typed_flags", default=None)


def typed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> frozenset[str]:
    """The destinations of the options in `argv` (`--flag`, `--flag=value`, `--no-flag`, `-o`,
    and argparse's unambiguous abbreviations such as `--batch` for `--batch-size`)."""
    actions = parser._option_string_actions  # argparse has no public map from option string to action
    names = set()
    for token in argv:
        option = token.split("=", 1)[0]
        if option in actions:
            names.add(actions[option].dest)
        elif option.startswith("--"):
            dests = {a.dest for o, a in actions.items() if o.startswith(option)}
            names |= dests if len(dests) == 1 else set()
    return frozenset(names)


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """Build (and so validate) a config dataclass from parsed arguments."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple and values[f.name] is not None:
            values[f.name] = tuple(values[f.name])
    return cls(**values)


# --------------------------------------------------------------------------- stages


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """`urbanseg synth`: write a synthetic street-scene dataset in Cityscapes layout (or paired folders, labelme)."""

    out: Path = opt(
        help="output folder; gets leftImg8bit/ and gtFine/ like a Cityscapes download (see --layout)", short="-o"
    )
    train: int = opt(40, "number of training scenes")
    val: int = opt(12, "number of validation scenes")
    test: int = opt(0, "number of test scenes")
    size: str = opt("2048x1024", "scene size WIDTHxHEIGHT (Cityscapes is 2048x1024)", metavar="WxH")
    seed: int = opt(0, "random seed; the same seed and flags give the same bytes")
    layout: Literal["cityscapes", "pairs", "labelme"] = opt(
        "cityscapes",
        "cityscapes: leftImg8bit/ + gtFine/; pairs: images/<split>/<city>/<stem>.png + masks/ of the same "
        "names holding categories8 class indices; labelme: images/ with a labelme <stem>.json beside each image",
    )
    workers: int = opt(0, "worker processes (0: one per core)")

    def __post_init__(self) -> None:
        parse_size(self.size)
        check(min(self.train, self.val, self.test) >= 0, "--train, --val and --test must be >= 0")
        check(self.train + self.val + self.test > 0, "nothing to generate: give --train, --val or --test > 0")
        check(self.workers >= 0, f"--workers {self.workers} must be >= 0")


# What `urbanseg prepare --source` reads, by layout (urbanseg.data.annotations has the readers).
CITYSCAPES_SOURCES = ("labelIds", "trainIds", "color", "polygons")
Source = Literal["labelIds", "trainIds", "indices", "color", "polygons", "labelme"]


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """`urbanseg prepare`: resize a raw dataset (Cityscapes layout or paired folders) into image/label pairs."""

    out: Path = opt(help="output folder for images/, labels/ and manifest.json", short="-o")
    data: Path | None = opt(None, "raw dataset folder in Cityscapes layout, holding leftImg8bit/ and gtFine/")
    images: Path | None = opt(
        None,
        "instead of --data: a folder of images (any depth), matched to --masks by file stem; "
        "train/ val/ test/ sub-folders give the splits",
    )
    masks: Path | None = opt(
        None, "with --images: the folder of their annotations (default: --images itself, e.g. for labelme JSON)"
    )
    labels: str = opt("categories8", "label set: categories8, categories7, classes19, or a labelmap.json path")
    size: str = opt("512x256", "output size WIDTHxHEIGHT", metavar="WxH")
    source: Source | None = opt(
        None,
        "what the annotations hold: labelIds (Cityscapes label ids), trainIds (Cityscapes training ids, "
        "255 ignored), indices (the label set's class indices 0..N-1, 255 ignored), color (RGB label "
        "colours), polygons (Cityscapes *_polygons.json), labelme (labelme JSON); default labelIds with "
        "--data, indices with --images",
    )
    image_suffix: list[str] = opt(
        [], "with --images: the endings that make a file an image, e.g. _leftImg8bit.png (default: any image type)"
    )
    mask_suffix: str | None = opt(
        None, "with --images: the ending of an annotation file (default: .png, or .json for polygons and labelme)"
    )
    split_file: list[str] = opt(
        [],
        "with --images: lists of stems, one file per split named after it (train.txt val.txt), "
        "or one .json/.yaml mapping split -> stems",
    )
    val_fraction: float = opt(
        0.0, "with --images: move this fraction of the train pairs to val, picked by --seed (stable as files are added)"
    )
    seed: int = opt(0, "with --val-fraction: the seed that picks the val pairs")
    splits: list[str] = opt(["train", "val", "test"], "splits to prepare (those missing on disk are skipped)")
    workers: int = opt(0, "worker processes (0: one per core)")
    overwrite: bool = opt(
        False,
        "redo every pair; also allows new settings for an --out prepared with others "
        "(its images/, labels/ and manifest.json are deleted first)",
    )

    def __post_init__(self) -> None:
        parse_size(self.size)
        check(self.workers >= 0, f"--workers {self.workers} must be >= 0")
        check(len(self.splits) >= 1, "--splits needs at least one split name, e.g. --splits train val")
        check(len(set(self.splits)) == len(self.splits), f"--splits {' '.join(self.splits)} repeats a split")
        bad = [s for s in self.splits if not s or s.startswith(".") or "/" in s or "\\" in s]
        check(not bad, f"--splits {bad[0]!r} is not a folder name like train, val or test" if bad else "")
        both = "not both" if self.data is not None else "one of them"
        check(
            (self.data is None) != (self.images is None),
            f"give --data DIR (a Cityscapes-layout dataset) or --images DIR [--masks DIR] (paired folders), {both}",
        )
        if self.data is not None:
            self._check_cityscapes()
        else:
            self._check_pairs()

    def _check_cityscapes(self) -> None:
        given = [
            flag
            for flag, value in (
                ("--masks", self.masks),
                ("--image-suffix", self.image_suffix),
                ("--mask-suffix", self.mask_suffix),
                ("--split-file", self.split_file),
                ("--val-fraction", self.val_fraction),
            )
            if value
        ]
        check(not given, f"{given[0] if given else ''} applies to paired folders: give --images instead of --data")
        object.__setattr__(self, "source", self.source or "labelIds")  # the resolved value is what is saved
        check(
            self.source in CITYSCAPES_SOURCES,
            f"--source {self.source} reads paired folders (--images, --masks); the Cityscapes layout has "
            f"{', '.join(CITYSCAPES_SOURCES)}",
        )

    def _check_pairs(self) -> None:
        object.__setattr__(self, "source", self.source or "indices")
        check(0.0 <= self.val_fraction < 1.0, f"--val-fraction {self.val_fraction} must be in [0, 1)")
        suffixes = [*self.image_suffix, *([self.mask_suffix] if self.mask_suffix is not None else [])]
        bad = [x for x in suffixes if not x or "/" in x or "\\" in x]
        check(not bad, f"suffix {bad[0]!r} must be the end of a file name, e.g. .png or _mask.png" if bad else "")
        lists = [p for p in self.split_file if Path(p).suffix.lower() in (".json", ".yaml", ".yml")]
        check(
            not lists or len(self.split_file) == 1,
            f"--split-file {lists[0] if lists else ''}: a .json/.yaml file names every split; give it alone",
        )


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """`urbanseg pack`: pack prepared pairs into sharded TFRecord files with a spec."""

    prepared: Path = opt(help="folder written by `urbanseg prepare`")
    out: Path = opt(help="output folder; gets <split>/NNNNN-of-NNNNN.tfrecord and <split>/spec.json", short="-o")
    shards: int = opt(4, "shards per split (fewer if a split has fewer images)")
    splits: list[str] = opt(["train", "val", "test"], "splits to pack (those not prepared are skipped)")

    def __post_init__(self) -> None:
        check(self.shards >= 1, f"--shards {self.shards} must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`urbanseg train`: train a segmentation model on TFRecord shards into a run folder."""

    data: Path = opt(help="shard folder written by `urbanseg pack` (holds train/ and val/)")
    run: Path = opt(help="run folder for config.yaml, best.pt, last.pt, metrics.csv, tb/, curves.png")
    model: str | None = opt(None, "architecture (see `urbanseg models`); default: the benchmark's pick, or --init's")
    model_args: str = opt("", "extra create_model keyword arguments as a JSON object, e.g. '{\"width\": 8}'")
    epochs: int | None = opt(None, "epochs to train (default 50 unless --iters is given)")
    iters: int | None = opt(None, "optimizer steps to train instead of --epochs")
    batch_size: int = opt(8, "global batch size (split evenly across torchrun processes)")
    crop: str | None = opt(None, "random training crop WIDTHxHEIGHT (default: whole images)", metavar="WxH")
    augment: bool = opt(True, "random flip / scale / colour augmentation on the training split")
    seed: int = opt(0, "seed for weights, data order and augmentation")
    deterministic: bool = opt(False, "bit-reproducible CPU run: deterministic kernels, fixed thread count")
    threads: int = opt(0, "CPU threads for PyTorch (0: PyTorch's default; 1 with --deterministic)")
    resume: bool = opt(False, "continue the run in --run from its last.pt, with its saved config")
    init: str | None = opt(
        None,
        "fine-tune from this checkpoint .pt or pretrained model (smp hub id, hf:ID or a save_pretrained folder); "
        "another label set gets a new head, started from the old one when the data's set is a coarser "
        "projection of the model's (classes19 -> categories8/7)",
    )
    new_head: bool = opt(False, "with --init: replace the classification head even if the class count matches")
    encoder_weights: str | None = opt(None, "pretrained encoder weights: 'imagenet' or a local weights file")
    freeze_encoder: int = opt(
        0, "keep the encoder's weights fixed for the first N optimizer steps, then train it too (0: off)"
    )
    optimizer: Literal["adamw", "sgd"] = opt("adamw", "optimizer")
    lr: float | None = opt(None, "peak learning rate (default: 1e-3 for adamw, 1e-2 for sgd)")
    weight_decay: float = opt(1e-4, "weight decay")
    momentum: float = opt(0.9, "SGD momentum")
    schedule: Literal["poly", "cosine"] = opt("poly", "learning-rate decay after warm-up")
    warmup: int = opt(0, "linear warm-up steps")
    clip_grad: float = opt(0.0, "clip the gradient norm to this value (0: off)")
    loss: Literal["ce", "ce+dice", "ce+lovasz"] = opt("ce", "loss: cross-entropy, optionally plus Dice or Lovasz")
    class_weights: Literal["none", "inverse", "median", "sqrt"] = opt(
        "none", "cross-entropy class weights from the training pixel counts"
    )
    ohem: bool = opt(False, "online hard-pixel mining: cross-entropy over the hardest pixels only")
    ohem_thresh: float = opt(0.7, "with --ohem: pixels whose true-class probability is below this are hard")
    ohem_min_kept: float = opt(0.1, "with --ohem: fraction of the valid pixels always kept (the hardest)")
    amp: Literal["auto", "off", "bf16", "fp16"] = opt("auto", "mixed precision (auto: fp16 on CUDA, off on CPU)")
    channels_last: bool = opt(False, "channels-last memory format")
    compile: bool = opt(False, "torch.compile the model")
    sync_bn: bool = opt(False, "SyncBatchNorm across torchrun processes (GPU)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (auto: cuda if available)")
    val_every: int = opt(0, "validate every N steps (0: at the end of every epoch)")
    save_every: int = opt(0, "also write last.pt every N steps (0: at every validation)")
    patience: int = opt(0, "stop after N validations without a better mIoU (0: never)")
    log_every: int = opt(10, "log the training loss every N steps")
    workers: int = opt(2, "data-loading worker processes per training process")

    def __post_init__(self) -> None:
        if self.crop is not None:
            parse_size(self.crop, "--crop")
        check(not (self.epochs is not None and self.iters is not None), "give --epochs or --iters, not both")
        for flag, value in (("--epochs", self.epochs), ("--iters", self.iters)):
            check(value is None or value >= 1, f"{flag} {value} must be >= 1 (it counts what to train)")
        check(self.batch_size >= 1, f"--batch-size {self.batch_size} must be >= 1")
        check(self.lr is None or self.lr > 0, f"--lr {self.lr} must be > 0")
        check(self.new_head <= (self.init is not None), "--new-head only applies with --init CHECKPOINT")
        check(
            not (self.init is not None and self.encoder_weights),
            "--init and --encoder-weights both set the starting weights: pick one",
        )
        check(
            0 < self.ohem_thresh <= 1 and 0 <= self.ohem_min_kept <= 1,
            "--ohem-thresh must be in (0, 1] and --ohem-min-kept in [0, 1]",
        )
        non_negative: tuple[tuple[str, float], ...] = (
            ("--warmup", self.warmup),
            ("--clip-grad", self.clip_grad),
            ("--val-every", self.val_every),
            ("--save-every", self.save_every),
            ("--patience", self.patience),
            ("--workers", self.workers),
            ("--threads", self.threads),
            ("--freeze-encoder", self.freeze_encoder),
            ("--weight-decay", self.weight_decay),
        )
        for flag, amount in non_negative:
            check(amount >= 0, f"{flag} {amount} must be >= 0")
        check(self.log_every >= 1, f"--log-every {self.log_every} must be >= 1")
        check_device(self.device)
        if self.model_args:
            try:
                ok = isinstance(json.loads(self.model_args), dict)
            except json.JSONDecodeError:
                ok = False
            check(ok, f"--model-args {self.model_args!r} is not a JSON object; use e.g. '{{\"width\": 8}}'")


CHECKPOINT_HELP = (
    "best or last (in --run), a checkpoint .pt path, or a pretrained model (an smp hub id, hf:ID or a "
    "save_pretrained folder, converted on first use: docs/pretrained.md); default best"
)
ONNX_MODEL_HELP = "an ONNX model from `urbanseg export`, run with ONNX Runtime instead of a checkpoint"

ENGINE_HELP = (
    "inference engine: torch (PyTorch, batch norms folded, channels-last on a CPU), onnxruntime (the "
    "checkpoint exported to ONNX, cached beside it as a hidden .engine.onnx file), or auto: onnxruntime on "
    "a CPU (the faster one; torch when the folder is read-only), torch on CUDA"
)


def check_model_flags(engine: str, model: Path | None, checkpoint: str | None) -> None:
    """One of --model and --checkpoint; --engine torch needs a checkpoint, not an ONNX --model."""
    check(model is None or checkpoint is None, "give --model model.onnx or --checkpoint, not both")
    check(
        model is None or engine != "torch",
        "--engine torch runs a checkpoint; --model is an ONNX model (run by ONNX Runtime): drop one of them",
    )


PREDICT_OUTPUTS = ("overlay", "color", "labels")


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """`urbanseg predict`: segment images, folders, globs or videos, or N pictures from a split."""

    input: list[str] = opt(
        [], "image files, folders, globs ('photos/*.jpg') or videos (.mp4, .avi, ...) to segment", short="-i"
    )
    split: str | None = opt(
        None, "instead of --input: the original's mode, N pictures (image | prediction) from this split's shards"
    )
    num: int | None = opt(None, "with --split: number of pictures to write (default 20)")
    data: Path | None = opt(None, "with --split: shards folder (default: the run's `data` in config.yaml)")
    run: Path | None = opt(None, "run folder (runs/NAME) holding best.pt / last.pt and config.yaml")
    checkpoint: str | None = opt(None, CHECKPOINT_HELP)
    model: Path | None = opt(None, ONNX_MODEL_HELP)
    labels: str | None = opt(
        None,
        "write the predictions in this coarser label set (categories8 or categories7 for a classes19 model), "
        "each predicted class mapped to its category through the Cityscapes table",
    )
    out: Path | None = opt(
        None, "output folder (default: RUN/predict/SPLIT, RUN/predict/input, or ./predictions)", short="-o"
    )
    outputs: list[str] = opt(
        list(PREDICT_OUTPUTS),
        "what to write per image: overlay, color (mask), labels (class-index PNG); a video gets NAME_overlay.mp4",
    )
    cityscapes_ids: bool = opt(
        False, "also write *_labelIds.png with Cityscapes label ids (official test server format)"
    )
    native: bool = opt(False, "run at each image's own resolution instead of resizing to the training input size")
    tile: bool = opt(False, "sliding window at native resolution, overlapping logits averaged (for very large images)")
    tile_size: str = opt("", "window WIDTHxHEIGHT for --tile (default: the training input size)", metavar="WxH")
    tile_overlap: float = opt(0.25, "fraction of the window shared by neighbouring windows, 0 <= f < 1")
    tta: Literal["none", "flip"] = opt("none", TTA_HELP)
    scales: str = opt("1", SCALES_HELP, metavar="S1,S2,...")
    protocol: bool = opt(
        True,
        "without --native/--tile, run a pretrained model as it was scored (its recorded protocol: whole image "
        "resized, or sliding window); --no-protocol resizes to the input size like any model",
    )
    batch_size: int = opt(4, "images (or windows) per forward pass")
    alpha: float = opt(0.5, "opacity of the colour mask in the overlay, 0..1")
    device: str = opt("auto", "PyTorch device for a checkpoint: auto, cpu, cuda or cuda:N (auto: cuda if available)")
    engine: Literal["auto", "torch", "onnxruntime"] = opt("auto", ENGINE_HELP)

    def __post_init__(self) -> None:
        check(
            bool(self.input) != (self.split is not None), "give either --input FILE|DIR|GLOB|VIDEO ... or --split SPLIT"
        )
        check_model_flags(self.engine, self.model, self.checkpoint)
        check(
            self.model is not None or self.run is not None or self.checkpoint is not None,
            "give --run runs/NAME, --checkpoint PATH or --model model.onnx",
        )
        check(
            self.split is None or self.data is not None or self.run is not None,
            "--split reads the shards named in the run's config.yaml: give --run runs/NAME or --data SHARDS",
        )
        check(self.num is None or self.num >= 1, f"--num {self.num} must be >= 1")
        given = [f for f, v in (("--num", self.num), ("--data", self.data)) if v is not None]
        check(
            self.split is not None or not given,
            f"{' and '.join(given)}: only with --split; drop {'them' if len(given) > 1 else 'it'} with --input",
        )
        check(
            self.split is None or (tuple(self.outputs) == PREDICT_OUTPUTS and not self.cityscapes_ids),
            "--split writes side-by-side pictures (image | prediction) only; --outputs and --cityscapes-ids are for "
            "--input images",
        )
        check(self.batch_size >= 1, f"--batch-size {self.batch_size} must be >= 1")
        check(0.0 <= self.tile_overlap < 1.0, f"--tile-overlap {self.tile_overlap} must be in [0, 1)")
        check(0.0 <= self.alpha <= 1.0, f"--alpha {self.alpha} must be in [0, 1]")
        check(not (self.tile and self.native), "--tile already runs at native resolution; drop --native")
        check(self.tile or not self.tile_size, "--tile-size needs --tile")
        if self.tile_size:
            parse_size(self.tile_size, "--tile-size")
        parse_scales(self.scales)
        check_device(self.device)
        bad = sorted(set(self.outputs) - {"overlay", "color", "labels"})
        check(not bad, f"--outputs {' '.join(bad)}: unknown; choose from overlay color labels")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """`urbanseg export`: write a checkpoint as an ONNX model carrying its label set and input size."""

    run: Path | None = opt(None, "run folder (runs/NAME) holding best.pt / last.pt")
    checkpoint: str | None = opt(None, CHECKPOINT_HELP)
    format: Literal["onnx"] = opt("onnx", "export format")
    out: Path | None = opt(
        None,
        "output file (default: beside the checkpoint, e.g. runs/NAME/best.onnx; for a pretrained model, beside "
        "its converted checkpoint in the cache)",
        short="-o",
    )
    opset: int = opt(18, "ONNX opset version")
    dynamic: bool = opt(True, "dynamic batch, height and width (--no-dynamic: fixed training input size)")
    quantize: Literal["none", "int8"] = opt(
        "none",
        "int8: also write an int8 model beside the export (NAME.int8.onnx; ONNX Runtime static quantization, "
        "per-channel weights), calibrated on --calibrate and scored before/after on the val split",
    )
    calibrate: str | None = opt(
        None, "with --quantize: split of the shards whose images calibrate the activation ranges (default: train)"
    )
    num: int | None = opt(None, "with --quantize: number of calibration images (default: 32, or all if fewer)")
    data: Path | None = opt(
        None, "with --quantize: shards folder for calibration and scoring (default: the run's `data` in config.yaml)"
    )

    def __post_init__(self) -> None:
        check(self.run is not None or self.checkpoint is not None, "give --run runs/NAME or --checkpoint PATH")
        check(11 <= self.opset <= 20, f"--opset {self.opset}: the exporter supports opsets 11 to 20")
        given = [
            f for f, v in (("--calibrate", self.calibrate), ("--num", self.num), ("--data", self.data)) if v is not None
        ]
        check(
            self.quantize != "none" or not given,
            f"{', '.join(given)} only {'apply' if len(given) > 1 else 'applies'} with --quantize int8 (they "
            "choose its calibration images)",
        )
        check(self.num is None or self.num >= 1, f"--num {self.num} must be >= 1")
        check(self.calibrate is None or bool(self.calibrate.strip()), "--calibrate must name a split, e.g. train")


@dataclasses.dataclass(frozen=True)
class ModelsConfig:
    """`urbanseg models`: list the model names with parameters, FLOPs and CPU latency."""

    size: str = opt("512x256", "input size WIDTHxHEIGHT for FLOPs and latency", metavar="WxH")
    measure: bool = opt(
        False, "re-measure CPU latency now (slow) instead of showing the figures measured by benchmarks/bench_models.py"
    )
    repeats: int = opt(5, "timed forward passes per model with --measure (the median is shown)")
    threads: int = opt(1, "CPU threads per model with --measure")
    only: list[str] = opt([], "show only these models (default: all)")
    pretrained: bool = opt(
        False,
        "list the pretrained Cityscapes models instead (for `urbanseg import`), "
        "with protocol, published mIoU and licence",
    )

    def __post_init__(self) -> None:
        parse_size(self.size)
        check(self.repeats >= 1, f"--repeats {self.repeats} must be >= 1")
        check(self.threads >= 1, f"--threads {self.threads} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ImportConfig:
    """`urbanseg import`: convert a pretrained model (smp hub id, hf:ID or a save_pretrained folder) to a checkpoint."""

    source: str = opt(
        help="an smp hub id (smp-hub/segformer-b0-512x1024-city-160k), hf:ID for a transformers "
        "model (hf:nvidia/segformer-b0-finetuned-cityscapes-1024-1024), or a local folder "
        "written by save_pretrained; the known models: docs/pretrained.md",
        positional=True,
    )
    out: Path | None = opt(
        None,
        "checkpoint to write (default: the conversion cache $HF_HOME/urbanseg/, which later commands reuse)",
        short="-o",
    )
    folder: Path | None = opt(
        None,
        "with a hub id: read its files from this folder (downloaded on another "
        "machine with `hf download`) instead of the hub",
    )
    labels: str | None = opt(
        None,
        "label set of the model's classes: classes19 (the default for 19 classes), "
        "categories8, categories7 or a labelmap.json path",
    )
    input_size: str | None = opt(
        None,
        "input size WIDTHxHEIGHT of a model not in the pretrained table "
        "(default: the size of its preprocessing config)",
        metavar="WxH",
    )
    overwrite: bool = opt(False, "replace an existing --out file")

    def __post_init__(self) -> None:
        check(bool(self.source.strip()), "give a SOURCE: an smp hub id, hf:ID or a folder")
        if self.input_size is not None:
            parse_size(self.input_size, "--input-size")
        check(
            self.out is not None or (self.labels is None and self.input_size is None),
            "--labels and --input-size change the conversion: write it to a file of your own with --out model.pt",
        )
        check(self.out is None or self.out.suffix == ".pt", f"--out {self.out}: give a .pt file name")
        check(self.overwrite <= (self.out is not None), "--overwrite only applies with --out")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """`urbanseg evaluate`: score a run's checkpoint on a split; write report.md/.html, metrics.json, pictures."""

    run: Path | None = opt(
        None,
        "run folder (runs/NAME) from `urbanseg train`; the report goes to RUN/eval/SPLIT/ "
        "(without it: --checkpoint and --data)",
    )
    split: str = opt("val", "split of the shards to evaluate")
    checkpoint: str | None = opt(None, CHECKPOINT_HELP)
    model: Path | None = opt(
        None,
        "score this ONNX model (from `urbanseg export`, fp32 or int8) with ONNX Runtime instead of a checkpoint; "
        "the report still goes to RUN/eval/SPLIT/",
    )
    data: Path | None = opt(None, "shards folder (default: the run's `data` in config.yaml)")
    out: Path | None = opt(None, "report folder (default: RUN/eval/SPLIT, or eval/SPLIT without --run)", short="-o")
    protocol: bool = opt(
        True,
        "run a pretrained model on the shards' images as it was scored (its recorded protocol: whole image "
        "resized to its input size, or sliding window); --no-protocol resizes to the input size like any model",
    )
    full_res: bool = opt(
        False,
        "official protocol: upsample the predictions to the raw ground truth "
        "(gtFine, found via the shards' spec.json) and add the official Cityscapes scores",
    )
    tta: Literal["none", "flip"] = opt("none", TTA_HELP)
    scales: str = opt("1", SCALES_HELP, metavar="S1,S2,...")
    batch_size: int = opt(4, "images per forward pass")
    gallery: int = opt(4, "pictures of the best and of the worst K images by per-image mIoU (0: none)")
    workers: int = opt(0, "data-loading worker processes (0: load in the main process)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (auto: cuda if available)")
    engine: Literal["auto", "torch", "onnxruntime"] = opt("auto", ENGINE_HELP)

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, f"--batch-size {self.batch_size} must be >= 1")
        check_model_flags(self.engine, self.model, self.checkpoint)
        check(self.gallery >= 0, f"--gallery {self.gallery} must be >= 0")
        check(self.workers >= 0, f"--workers {self.workers} must be >= 0")
        check(bool(self.split.strip()), "--split must name a split, e.g. --split val")
        parse_scales(self.scales)
        check(
            self.run is not None
            or ((self.model is not None or self.checkpoint not in (None, "best", "last")) and self.data is not None),
            "give --run runs/NAME, or --checkpoint (a .pt file or a pretrained model) or --model with --data SHARDS",
        )
        check_device(self.device)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """`urbanseg demo`: the whole pipeline on synthetic data, from scenes to a report."""

    out: Path = opt(Path("runs/demo"), "demo folder: data/, prepared/, shards/ and run/ go here", short="-o")
    quick: bool = opt(False, "a smaller dataset, smaller images and a shorter training (under 2 minutes)")
    model: str | None = opt(None, "architecture to train (default: urbanseg's default model)")
    iters: int | None = opt(None, "training steps (default: 600, or 150 with --quick)")
    seed: int = opt(0, "seed for the scenes, the weights and the data order")
    workers: int = opt(0, "worker processes for synth and prepare (0: one per core)")

    def __post_init__(self) -> None:
        check(self.iters is None or self.iters >= 1, f"--iters {self.iters} must be >= 1")
        check(self.workers >= 0, f"--workers {self.workers} must be >= 0")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """`urbanseg serve`: a segmentation web service (HTTP API, metrics, a page to try it) for one model."""

    run: Path | None = opt(None, "run folder (runs/NAME) holding best.pt / last.pt and config.yaml")
    checkpoint: str | None = opt(None, CHECKPOINT_HELP)
    model: Path | None = opt(None, ONNX_MODEL_HELP)
    host: str = opt(
        "127.0.0.1", "address to listen on; 127.0.0.1 keeps it to this machine, 0.0.0.0 opens it to the network"
    )
    port: int = opt(8000, "TCP port to listen on (0: any free port; the address is printed)")
    token: str | None = opt(
        None,
        "require `Authorization: Bearer TOKEN` on /v1/* and /metrics (default: the URBANSEG_TOKEN environment "
        "variable; a flag is visible to other users in the process list, the variable is not)",
    )
    max_batch: int = opt(4, "requests run through the model together, at most")
    batch_wait_ms: float = opt(
        5.0, "how long a batch waits for more requests, only while other requests are queued (milliseconds)"
    )
    max_queue: int = opt(32, "requests waiting for the model, at most; more get 503 with Retry-After")
    max_connections: int = opt(
        128, "open connections at most (uploads being read count); more get 503 (memory: this x --max-upload-mb)"
    )
    max_upload_mb: float = opt(20.0, "largest accepted upload in MB; larger ones get 413")
    max_pixels: int = opt(
        40_000_000,
        "largest accepted image in pixels (width x height, read from its header before decoding; 413); also "
        "the most pixels one batch runs together",
    )
    upload_timeout: float = opt(30.0, "seconds an upload may stall without sending data before 408")
    inference_timeout: float = opt(120.0, "seconds a request may wait for the model (queue + run) before 504")
    tile_overlap: float = opt(0.25, "default fraction of the window shared by neighbouring windows with ?tile=1")
    alpha: float = opt(0.5, "default opacity of the colour mask in ?output=overlay, 0..1")
    device: str = opt("auto", "PyTorch device for a checkpoint: auto, cpu, cuda or cuda:N (auto: cuda if available)")
    engine: Literal["auto", "torch", "onnxruntime"] = opt("auto", ENGINE_HELP)

    def __post_init__(self) -> None:
        check_model_flags(self.engine, self.model, self.checkpoint)
        check(self.model is None or self.run is None, "give --model model.onnx or --run, not both")
        check(
            self.model is not None or self.run is not None or self.checkpoint is not None,
            "give --run runs/NAME, --checkpoint PATH or --model model.onnx",
        )
        check(0 <= self.port <= 65535, f"--port {self.port} must be in 0..65535")
        check(bool(self.host.strip()), "--host must name an address, e.g. --host 127.0.0.1")
        check(self.token is None or len(self.token) >= 8, "--token must be at least 8 characters")
        check(self.max_batch >= 1, f"--max-batch {self.max_batch} must be >= 1")
        check(self.batch_wait_ms >= 0, f"--batch-wait-ms {self.batch_wait_ms} must be >= 0")
        check(self.max_queue >= 1, f"--max-queue {self.max_queue} must be >= 1")
        check(self.max_connections >= 2, f"--max-connections {self.max_connections} must be >= 2")
        check(self.max_upload_mb > 0, f"--max-upload-mb {self.max_upload_mb} must be > 0")
        check(self.max_pixels >= 64, f"--max-pixels {self.max_pixels} must be >= 64")
        check(self.upload_timeout > 0, f"--upload-timeout {self.upload_timeout} must be > 0")
        check(self.inference_timeout > 0, f"--inference-timeout {self.inference_timeout} must be > 0")
        check(0.0 <= self.tile_overlap < 1.0, f"--tile-overlap {self.tile_overlap} must be in [0, 1)")
        check(0.0 <= self.alpha <= 1.0, f"--alpha {self.alpha} must be in [0, 1]")
        check_device(self.device)

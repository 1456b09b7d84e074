"""Read a pretrained model from the folder its library's `save_pretrained` (or a hub
snapshot) holds: the architecture as plain kwargs for `create_model("smp" | "hf", ...)`,
the weights, the class names and the preprocessing (normalisation, input size).

- segmentation-models-pytorch: config.json (`_model_class` + constructor kwargs),
  model.safetensors (or pytorch_model.bin), and albumentations_config_eval.json (what
  `A.Compose.save_pretrained` writes; smp-hub ships it) for Normalize and Resize.
- transformers: loaded with `AutoModelForSemanticSegmentation.from_pretrained` (which
  knows every weights layout and old key names), preprocessor_config.json for the image
  processor's rescale/normalise/resize.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from urbanseg.errors import UserError
from urbanseg.models.builders import IMAGENET_MEAN, IMAGENET_STD, hf_architecture

Library = Literal["smp", "transformers"]


@dataclass
class Loaded:
    """A model read from a folder. `kwargs` rebuild it with create_model(`name`,
    num_classes, **kwargs) (mean/std included); `state` fits the bare network
    (`SegmentationModel.net`, or `.net.net` for transformers)."""

    name: Literal["smp", "hf"]
    kwargs: dict[str, Any]
    state: dict[str, torch.Tensor]
    num_classes: int
    class_names: tuple[str, ...] | None  # None: the folder does not name them
    size: tuple[int, int] | None  # (W, H) the preprocessing resizes to, if it says
    preprocessing: str  # where mean/std/size came from, for the user


def detect_library(folder: Path) -> Library:
    """smp or transformers, from the folder's config.json."""
    config = _read_json(folder / "config.json", required=True)
    if "_model_class" in config:
        return "smp"
    if "model_type" in config:
        return "transformers"
    raise UserError(
        f"{folder / 'config.json'} is neither a segmentation-models-pytorch config (no _model_class) "
        f"nor a transformers one (no model_type); give a folder written by save_pretrained"
    )


def read_folder(folder: Path, library: Library) -> Loaded:
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{folder} has no config.json: give a folder written by save_pretrained "
            f"(or fetched with `hf download ID --local-dir {folder}`)"
        )
    return read_smp(folder) if library == "smp" else read_transformers(folder)


def read_smp(folder: Path) -> Loaded:
    config = _read_json(folder / "config.json", required=True)
    arch = config.get("_model_class")
    if not isinstance(arch, str):
        raise UserError(f"{folder / 'config.json'} has no _model_class: not saved by segmentation-models-pytorch")
    kwargs = {
        k: v
        for k, v in config.items()
        if not k.startswith("_") and k not in ("classes", "encoder_weights", "activation")
    }
    classes = config.get("classes", 1)
    mean, std, size, where = _albumentations(folder / "albumentations_config_eval.json")
    return Loaded(
        "smp",
        {"arch": arch, "config": kwargs, "mean": mean, "std": std},
        _smp_weights(folder),
        int(classes),
        None,
        size,
        where,
    )


def _smp_weights(folder: Path) -> dict[str, torch.Tensor]:
    safetensors, pickle = folder / "model.safetensors", folder / "pytorch_model.bin"
    try:
        if safetensors.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors))
        if pickle.is_file():
            return torch.load(pickle, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"cannot read the weights in {folder} ({type(e).__name__}: {str(e)[:200]}); fetch the model again"
        ) from None
    raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")


def _albumentations(path: Path) -> tuple[list[float], list[float], tuple[int, int] | None, str]:
    """mean/std on the 0..255 scale and the Resize (W, H) of an albumentations pipeline
    saved as JSON: Normalize computes (x - mean * max_pixel_value) / (std * max_pixel_value)."""
    config = _read_json(path, required=False)
    if config is None:
        return list(IMAGENET_MEAN), list(IMAGENET_STD), None, "no preprocessing config: ImageNet mean/std assumed"
    steps = {t.get("__class_fullname__", "").split(".")[-1]: t for t in _transforms(config)}
    if "Normalize" not in steps:
        raise UserError(f"{path} has no Normalize step: cannot tell how the model's input is normalised")
    norm = steps["Normalize"]
    scale = float(norm.get("max_pixel_value", 255.0))
    mean = [float(v) * scale for v in _triple(norm.get("mean", (0.485, 0.456, 0.406)), path)]
    std = [float(v) * scale for v in _triple(norm.get("std", (0.229, 0.224, 0.225)), path)]
    resize = steps.get("Resize")
    size = (int(resize["width"]), int(resize["height"])) if resize else None
    return mean, std, size, path.name


def _transforms(config: dict[str, Any]) -> list[dict[str, Any]]:
    node = config.get("transform", config)
    return [t for t in node.get("transforms", []) if isinstance(t, dict)]


def read_transformers(folder: Path) -> Loaded:
    net = _hf_from_pretrained(folder)
    config = hf_architecture(json.loads(net.config.to_json_string(use_diff=False)))
    names = tuple(str(net.config.id2label[i]) for i in range(net.config.num_labels))
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    mean, std, size, where = _image_processor(folder / "preprocessor_config.json")
    return Loaded(
        "hf",
        {"config": config, "mean": mean, "std": std},
        net.state_dict(),
        int(net.config.num_labels),
        None if generic else names,
        size,
        where,
    )


def _hf_from_pretrained(folder: Path) -> Any:
    try:
        from transformers import AutoModelForSemanticSegmentation
    except ImportError:
        raise UserError("transformers models need the extra: pip install 'urbanseg[hf]'") from None
    try:
        return AutoModelForSemanticSegmentation.from_pretrained(str(folder))
    except ValueError as e:  # the model type has no semantic-segmentation class
        raise UserError(
            f"{folder}: not a transformers semantic-segmentation model with per-pixel logits "
            f"({str(e).splitlines()[0][:200]})"
        ) from None
    except OSError as e:
        raise UserError(f"cannot load the transformers model in {folder}: {str(e).splitlines()[0][:300]}") from None


def _image_processor(path: Path) -> tuple[list[float], list[float], tuple[int, int] | None, str]:
    """mean/std on the 0..255 scale and the resize (W, H) of a transformers image
    processor: it computes (x * rescale_factor - mean) / std, with its defaults
    (rescale 1/255, normalise with ImageNet's statistics) where a key is absent."""
    config = _read_json(path, required=False)
    if config is None:
        return list(IMAGENET_MEAN), list(IMAGENET_STD), None, "no preprocessor_config.json: ImageNet mean/std assumed"
    factor = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    if config.get("do_normalize", True):
        mean = [float(v) / factor for v in _triple(config.get("image_mean", (0.485, 0.456, 0.406)), path)]
        std = [float(v) / factor for v in _triple(config.get("image_std", (0.229, 0.224, 0.225)), path)]
    else:
        mean, std = [0.0] * 3, [1.0 / factor] * 3
    size = config.get("size") if config.get("do_resize", True) else None
    if isinstance(size, dict) and {"height", "width"} <= size.keys():
        wh: tuple[int, int] | None = (int(size["width"]), int(size["height"]))
    elif isinstance(size, int):
        wh = (size, size)
    else:
        wh = None
    return mean, std, wh, path.name


def _triple(values: Any, path: Path) -> list[float]:
    if isinstance(values, (int, float)):
        return [float(values)] * 3
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise UserError(f"{path}: expected 3 values for a mean/std, got {values!r}")
    return [float(v) for v in values]


def _read_json(path: Path, *, required: bool) -> Any:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise UserError(f"{path} does not exist: give a folder written by save_pretrained") from None
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data

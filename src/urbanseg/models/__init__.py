"""Segmentation models by name (`create_model`), the architectures behind the names, the
`urbanseg models` table, and pretrained Cityscapes models (`urbanseg import`,
`resolve_pretrained`). Heavy: importing this imports PyTorch."""

from urbanseg.models.builders import IMAGENET_MEAN, IMAGENET_STD
from urbanseg.models.convert import resolve_pretrained
from urbanseg.models.registry import (
    DEFAULT_MODEL,
    IMPORTED,
    MODELS,
    SegmentationModel,
    create_model,
    load_encoder_weights,
    model_stats,
    save_encoder_weights,
)

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMPORTED",
    "MODELS",
    "SegmentationModel",
    "create_model",
    "load_encoder_weights",
    "model_stats",
    "resolve_pretrained",
    "save_encoder_weights",
]

"""Segmentation models by name (`create_model`), the architectures behind the names, and
the `urbanseg models` table. Heavy: importing this imports PyTorch."""

from urbanseg.models.registry import (
    DEFAULT_MODEL,
    IMAGENET_MEAN,
    IMAGENET_STD,
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
    "MODELS",
    "SegmentationModel",
    "create_model",
    "load_encoder_weights",
    "model_stats",
    "save_encoder_weights",
]

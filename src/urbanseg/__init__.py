"""urbanseg: street-scene semantic segmentation, from a Cityscapes-layout dataset to a
trained model, an evaluation report and pictures of its predictions.

Each pipeline stage is one module with one entry function; the command line
(`urbanseg --help`) calls exactly one of them. The names below are the public Python API
(docs/api.md); the heavy ones (PyTorch, OpenCV) are imported on first use, so
`import urbanseg` and `urbanseg --help` stay instant.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from urbanseg.errors import UserError  # after __version__: submodules import it
from urbanseg.labels import LABELS, LabelSet, get_label_set

# name -> module that defines it, imported when the name is first used
_LAZY = {
    "create_model": "urbanseg.models",
    "MODELS": "urbanseg.models",
    "load_checkpoint": "urbanseg.checkpoint",
    "model_from_checkpoint": "urbanseg.checkpoint",
    "ShardDataset": "urbanseg.data.loader",
    "build_loader": "urbanseg.data.loader",
    "ConfusionMatrix": "urbanseg.evaluation.metrics",
}

__all__ = ["LABELS", "LabelSet", "UserError", "__version__", "get_label_set", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'urbanseg' has no attribute {name!r}")

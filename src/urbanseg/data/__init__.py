"""Stages 1-3: `prepare` (raw Cityscapes layout -> resized pairs), `pack` (pairs ->
TFRecord shards, codec in `tfrecord`), and the loader over the shards (`loader`,
`transforms`).

The loader API is importable from here (`from urbanseg.data import ShardDataset,
build_loader`); it is loaded on first use, so `urbanseg prepare` and `pack` do not pay for
PyTorch.
"""

from __future__ import annotations

from typing import Any

_LOADER_API = ("EpochSampler", "ShardDataset", "build_loader", "sample_seed")
__all__ = list(_LOADER_API)


def __getattr__(name: str) -> Any:
    if name in _LOADER_API:
        from urbanseg.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'urbanseg.data' has no attribute {name!r}")

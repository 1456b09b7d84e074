"""How images become label maps: the one function `evaluate`, `predict` (and any other
caller) runs a `Predictor` through, so that a figure `evaluate` reports is what
`predict` writes for the same image and options.

`Plan` holds the options (resolution mode, tile window and overlap, batch size,
test-time augmentation), chosen by `Plan.from_config` from a command's flags and the
model's recorded protocol; the work is `urbanseg.inference.segment.segment`'s (resizing,
tiling, bilinear upsampling of the logits and argmax, identical for every engine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from urbanseg.inference.predictor import Predictor
from urbanseg.inference.protocol import segment_options
from urbanseg.inference.segment import PLAIN, TTA, Mode, segment


@dataclass(frozen=True)
class Plan:
    """Options of `label_maps`; see `urbanseg.inference.segment` for the modes."""

    mode: Mode = "resize"
    tile_size: tuple[int, int] | None = None
    overlap: float = 0.25
    batch_size: int = 4
    tta: TTA = PLAIN
    why: str = ""  # the resolution in words, and what chose it (printed by predict and evaluate)

    @classmethod
    def from_config(cls, config: Any, info: Mapping[str, Any] | None = None) -> Plan:
        """From a command's config and the predictor's `info`: the resolution is the
        user's `--native` / `--tile` (`--tile-size`, `--tile-overlap`) when given, else the
        inference protocol a pretrained model records (unless `--no-protocol`), else
        resize (`urbanseg.inference.protocol.segment_options`); `--batch-size`, `--tta`
        and `--scales` where the command has them (defaults otherwise)."""
        options = segment_options(info or {}, config)
        return cls(
            mode=options.mode,
            tile_size=options.tile_size,
            overlap=options.overlap,
            batch_size=getattr(config, "batch_size", 4),
            tta=TTA.from_flags(getattr(config, "tta", "none"), getattr(config, "scales", "1")),
            why=options.describe(),
        )


def label_maps(
    predictor: Predictor,
    images: list[np.ndarray],
    plan: Plan | None = None,
    sizes: list[tuple[int, int]] | None = None,
) -> list[np.ndarray]:
    """(H, W) uint8 class indices for each (H, W, 3) uint8 image, or at `sizes[i]`
    (W, H) when given: the logits upsampled bilinearly to that size (evaluate's
    full-resolution protocol scores a prepared image against its raw ground truth)."""
    plan = plan or Plan()
    return segment(
        predictor,
        images,
        mode=plan.mode,
        tile_size=plan.tile_size,
        overlap=plan.overlap,
        batch_size=plan.batch_size,
        tta=plan.tta,
        sizes=sizes,
    )

"""The resolution a model runs at when the user picks none: the inference protocol a
converted pretrained model records (`inference` in its checkpoint, `urbanseg.models.convert`),
as `urbanseg.inference.segment`'s options.

- ``{"mode": "whole", "size": [W, H]}`` -> ``resize``: the whole image resized to the
  model's input size (the protocol's size: `urbanseg import` writes both alike), the
  logits upsampled back;
- ``{"mode": "slide", "size": [W, H], "stride": [W, H]}`` -> ``tile``: `size` windows at
  the image's own resolution, every `stride` pixels (overlap 1 - stride / size), the
  overlapping logits averaged. The window offsets are mmsegmentation's `slide_inference`
  (the last window flush with the edge): for 1024x1024 windows, stride 768, over
  2048x1024, x = 0, 768, 1024 and y = 0.

`segment_options` is the one rule (`urbanseg.inference.plan.Plan.from_config` calls it
for predict, evaluate and serve); the user's own resolution flags (`--native`, `--tile`)
or `--no-protocol` win over the record.

Only numpy at the top: predict with an ONNX model imports no PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from urbanseg.config import parse_size
from urbanseg.inference.segment import Mode


@dataclass(frozen=True)
class SegmentOptions:
    """`urbanseg.inference.segment.segment`'s resolution options, and why they were chosen."""

    mode: Mode
    tile_size: tuple[int, int] | None = None
    overlap: float = 0.25
    why: str = ""

    def kwargs(self) -> dict[str, Any]:
        return {"mode": self.mode, "tile_size": self.tile_size, "overlap": self.overlap}

    def describe(self) -> str:
        if self.mode == "tile":
            size = f" {self.tile_size[0]}x{self.tile_size[1]}" if self.tile_size else ""
            what = f"sliding window{size} at the image's resolution, overlap {self.overlap:g}"
        elif self.mode == "resize":
            what = "whole image resized to the model's input size"
        else:
            what = "the image as it is"
        return f"{what} ({self.why})" if self.why else what


def segment_options(info: Mapping[str, Any], config: Any, default: Mode = "resize") -> SegmentOptions:
    """The options to segment with, from a predictor's `info` (its "inference" record)
    and a command's config: its `native`/`tile`/`tile_size`/`tile_overlap` flags when
    given (predict has them), else the recorded protocol unless `config.protocol` is
    False (--no-protocol), else `default` (resize: what predict and evaluate use)."""
    overlap = float(getattr(config, "tile_overlap", 0.25))
    if getattr(config, "tile", False):
        size = getattr(config, "tile_size", "")
        return SegmentOptions("tile", parse_size(size, "--tile-size") if size else None, overlap, "--tile")
    if getattr(config, "native", False):
        return SegmentOptions("native", why="--native")
    record = info.get("inference")
    if not record or not getattr(config, "protocol", True):
        return SegmentOptions(default, why="--no-protocol" if record else "")
    if record.get("mode") == "slide":
        (w, h), (sw, _) = record["size"], record["stride"]
        return SegmentOptions(
            "tile",
            (int(w), int(h)),
            1.0 - sw / w,
            f"the model's protocol: {w}x{h} windows, stride {record['stride'][0]}x{record['stride'][1]}",
        )
    w, h = record["size"]
    return SegmentOptions("resize", why=f"the model's protocol: whole image at {w}x{h}")

"""Pixels for the loader and the transforms: PNG decoding and the HWC <-> CHW layouts.

PNGs are decoded by kornia-rs (Rust, ~2.5x faster than OpenCV's libpng on 512x256 scenes,
see docs/benchmarks.md#loader) when it is installed, by OpenCV otherwise: PNG is lossless,
so both give the same pixels (tested for every PNG filter type). The layout changes use
OpenCV's split/merge, ~5x faster than torch's permute-and-copy for uint8 images.
"""

from __future__ import annotations

from types import ModuleType

import cv2
import numpy as np
import torch

_kornia_io: ModuleType | None
try:  # the fast PNG decoder; without it (a platform with no wheel) OpenCV decodes everything
    from kornia_rs import io as _kornia_io
except ImportError:  # pragma: no cover - depends on the installation
    _kornia_io = None

PNG_DECODER = "kornia-rs" if _kornia_io is not None else "opencv"


def decode_png(data: bytes, shape: tuple[int, int], *, grey: bool) -> np.ndarray | None:
    """A PNG's pixels as uint8: (H, W) as stored when `grey`, else (H, W, 3) RGB; None when
    `data` is not a decodable PNG.

    `shape` (H, W) is the expected size: an 8-bit PNG of that size and kind (greyscale or
    RGB) goes to kornia-rs when installed; anything else, or anything kornia-rs rejects,
    to OpenCV, which converts what it can (so the result never depends on the decoder).
    kornia-rs checks every chunk's CRC but not the zlib stream's Adler-32 (libpng does);
    the record's CRC32C, checked on every read, covers all of the PNG's bytes anyway."""
    if _kornia_io is not None:
        try:
            pixels = _kornia_io.decode_image_png_u8(data, shape, "mono" if grey else "rgb")
            return pixels[..., 0] if grey else pixels
        except Exception:  # another size or kind, or corrupt: OpenCV decides (it raises nothing)
            pass
    flags = cv2.IMREAD_UNCHANGED if grey else cv2.IMREAD_COLOR_RGB
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def to_planes(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) array -> a new contiguous uint8 tensor (3, H, W)."""
    out = torch.empty((3, *image.shape[:2]), dtype=torch.uint8)
    cv2.split(image, list(out.numpy()))
    return out


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """uint8 tensor (3, H, W) -> a new contiguous uint8 array (H, W, 3), as OpenCV takes it."""
    return cv2.merge(list(image.numpy()))

"""Image files and pixels shared by the stages: reading any still image as RGB, resizing
images (anti-aliased) and label maps (nearest neighbour), rasterising polygons, writing
PNGs, blending overlays.

Training images are resized here by `prepare`, and inference resizes its inputs with the
same function, so a model sees at prediction time what it saw in training.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from urbanseg.util import atomic_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}


def to_rgb8(array: np.ndarray, source: str = "image") -> np.ndarray:
    """Any decoded image -> (H, W, 3) uint8 RGB.

    Accepts (H, W) greyscale, (H, W, 1|3|4) channels-last in RGB(A) order, and uint8,
    uint16 (16-bit PNG/TIFF, scaled by 1/257), or float (0..1) samples. Alpha is dropped.
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{source}: unsupported image shape {a.shape}; expected (H, W) or (H, W, 1-4)")
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"{source}: unsupported sample type {a.dtype}; expected 8- or 16-bit integers or floats")
    channels = a.shape[2]
    if channels <= 2:  # grey or grey + alpha
        a = np.repeat(a[..., :1], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def read_image(path: Path) -> np.ndarray:
    """Read any still image file -> (H, W, 3) uint8 RGB. ValueError naming the file if unreadable."""
    return decode_image(np.fromfile(str(path), dtype=np.uint8), str(path))  # np.fromfile: non-ASCII paths work


def decode_image(data: bytes | np.ndarray, source: str = "image") -> np.ndarray:
    """The bytes of a still image file -> (H, W, 3) uint8 RGB. ValueError naming `source`
    if they are not a decodable image.

    OpenCV first (keeps 16 bits), Pillow for what OpenCV cannot decode (GIF, ...); both
    turn the picture as its EXIF orientation says, as viewers show it and as `prepare`
    reads training photos. Files (`read_image`) and uploads (`urbanseg serve`) take this
    one path: the same pixels."""
    import cv2

    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    # Not IMREAD_UNCHANGED: it ignores the EXIF orientation (alpha, which it keeps, is dropped anyway).
    img = cv2.imdecode(buffer, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) if buffer.size else None
    if img is not None:
        if img.ndim == 3 and img.shape[2] >= 3:  # OpenCV decodes to BGR(A)
            img = img[..., [2, 1, 0] + ([3] if img.shape[2] == 4 else [])]
        return to_rgb8(img, source)
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(buffer.tobytes())) as im:
            return to_rgb8(np.asarray(ImageOps.exif_transpose(im).convert("RGB")), source)
    except (UnidentifiedImageError, OSError) as e:  # Pillow's words name its BytesIO, not the file
        why = "not a known image format" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ValueError(f"cannot decode {source} as an image ({why}); is it a corrupt or non-image file?") from None


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 for size (w, h), anti-aliased (any channel order).

    cv2.INTER_AREA averages the source pixels under each output pixel when shrinking
    (2.2 ms of CPU at 2048x1024 -> 512x256: about PIL's reduce, which only takes integer
    factors, and 10x less than LANCZOS; benchmarks/bench_prepare.py); bicubic when
    enlarging on both axes."""
    import cv2

    h, w = rgb.shape[:2]
    if (w, h) == tuple(size):
        return rgb
    shrink = size[0] < w or size[1] < h
    return cv2.resize(rgb, tuple(size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 -> (h, w) uint8 for size (w, h) by nearest neighbour: every output
    value is an input value. INTER_NEAREST_EXACT samples at pixel centres (the same
    pixels as PIL's NEAREST), unlike INTER_NEAREST, which shifts by half a pixel."""
    import cv2

    if labels.shape[::-1] == tuple(size):
        return labels
    return cv2.resize(labels, tuple(size), interpolation=cv2.INTER_NEAREST_EXACT)


Shape = Literal["polygon", "rectangle", "ellipse"]


def draw_shapes(
    size: tuple[int, int],
    shapes: Sequence[tuple[Shape, Any]],
    values: Sequence[int],
    mode: str,
    background: int = 0,
) -> np.ndarray:
    """Fill `shapes` in order with `values` on an image of `size` (W, H) filled with
    `background`: mode "L" -> (H, W) uint8, mode "I" -> (H, W) int32. A shape is (kind,
    points): "polygon" with K >= 1 (x, y) points (any numbers, as read from a file),
    "rectangle" and "ellipse" with the two corners of their box.

    PIL's ImageDraw fills the polygons, as cityscapesscripts' json2labelImg does (fill
    only, no outline), so the same polygons give the same pixels; synthetic scenes, their
    JSON and every polygon annotation are rasterised here."""
    from PIL import Image, ImageDraw

    image = Image.new(mode, size, background)
    draw = ImageDraw.Draw(image)
    for (kind, points), value in zip(shapes, values, strict=True):
        xy = [tuple(p) for p in np.asarray(points).tolist()]
        if kind == "polygon":
            draw.polygon(xy, fill=int(value))
        else:  # two corners in any order: PIL wants them sorted
            (x0, y0), (x1, y1) = xy
            box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
            (draw.rectangle if kind == "rectangle" else draw.ellipse)(box, fill=int(value))
    return np.asarray(image)


def draw_polygons(
    size: tuple[int, int], polygons: Sequence[Any], values: Sequence[int], mode: str, background: int = 0
) -> np.ndarray:
    """`draw_shapes` of polygons only: each a (K, 2) array or list of (x, y) points."""
    return draw_shapes(size, [("polygon", p) for p in polygons], values, mode, background)


def png_problem(data: bytes) -> str | None:
    """Why `data` is not a whole, undamaged PNG file, or None. Pillow's `verify` walks the
    chunks to IEND checking each one's CRC without decoding the pixels (2.5 ms for a
    1.7 MB 2048x1024 image, 1/20 of a decode): a truncated file or changed bytes show."""
    from PIL import Image

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "not a PNG file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (OSError, SyntaxError, ValueError) as e:  # Pillow reports a bad CRC as SyntaxError
        return f"damaged PNG ({e})"
    return None


def save_png(path: Path | str, array: np.ndarray, compress_level: int = 1) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically.

    Level 1 compresses within a few percent of the default at a fraction of the time."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level)


def overlay(rgb: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an (H, W, 3) uint8 colour mask over an (H, W, 3) uint8 image."""
    mixed = rgb.astype(np.float32) * (1.0 - alpha) + color.astype(np.float32) * alpha
    return (mixed + 0.5).astype(np.uint8)

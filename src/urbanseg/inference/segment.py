"""Segmenting images of any size with a `Predictor`: batching, the three resolution modes
and the bilinear upsampling of logits, all in numpy/OpenCV so the PyTorch and the ONNX
engines post-process identically.

Three ways to run a model on an (H, W) image, all returning (H, W) class indices:

- ``resize`` (default): resize to the training input size, run, upsample the logits
  bilinearly back to (H, W). The model sees the scale it was trained at.
- ``native``: run on the image as it is (the model pads to its stride inside).
- ``tile``: slide a window over the image at its own resolution, with overlap; logits
  of overlapping windows are averaged. Memory stays at C x window-height x W floats.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from urbanseg.errors import UserError
from urbanseg.imaging import resize_image
from urbanseg.inference.predictor import Predictor

Mode = Literal["resize", "native", "tile"]


def upsample_logits(logits: np.ndarray, size: tuple[int, int], rows: tuple[int, int] | None = None) -> np.ndarray:
    """(C, h, w) float32 -> (H, W, C) float32 at size (W, H), or only output rows
    [rows[0], rows[1]); bilinear with half-pixel centres, equal to torch's
    interpolate(mode="bilinear", align_corners=False).

    Separable: the vertical pass picks and blends two source rows per output row (so a
    band of rows costs only that band), OpenCV does the horizontal pass."""
    import cv2

    _, h, w = logits.shape
    W, H = size
    y0, y1 = rows or (0, H)
    hwc = logits.transpose(1, 2, 0)
    if h == H:
        band = hwc[y0:y1]
    else:
        src = np.maximum((np.arange(y0, y1) + 0.5) * (h / H) - 0.5, 0.0)  # torch clamps at the top edge
        i0 = np.minimum(src.astype(np.int64), h - 1)
        i1 = np.minimum(i0 + 1, h - 1)
        wy = (src - i0).astype(np.float32)[:, None, None]
        band = hwc[i0] * (1.0 - wy) + hwc[i1] * wy
    band = np.ascontiguousarray(band, dtype=np.float32)
    if w != W:
        band = cv2.resize(band, (W, y1 - y0), interpolation=cv2.INTER_LINEAR)
        band = band[..., None] if band.ndim == 2 else band  # OpenCV drops a single channel axis
    return band


def upsample_argmax(logits: np.ndarray, size: tuple[int, int], band: int = 256) -> np.ndarray:
    """(C, h, w) float32 logits -> (H, W) uint8 class indices at size (W, H), upsampling
    `band` rows at a time: memory is band x W x C floats, not H x W x C."""
    W, H = size
    out = np.empty((H, W), np.uint8)
    for y in range(0, H, band):
        out[y : y + band] = _argmax(upsample_logits(logits, size, (y, min(H, y + band))))
    return out


def _to_batch(images: list[np.ndarray]) -> np.ndarray:
    """List of (H, W, 3) uint8 of one size -> (N, 3, H, W) float32 on the 0..255 scale."""
    return np.stack(images).transpose(0, 3, 1, 2).astype(np.float32)


def _argmax(hwc: np.ndarray) -> np.ndarray:
    return hwc.argmax(axis=-1).astype(np.uint8)


def segment(
    predictor: Predictor,
    images: list[np.ndarray],
    *,
    mode: Mode = "resize",
    tile_size: tuple[int, int] | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
) -> list[np.ndarray]:
    """Class indices for each (H, W, 3) uint8 image: a list of (H, W) uint8 arrays.

    Images are batched `batch_size` at a time (in ``native`` mode, runs of equal size;
    in ``tile`` mode, the windows of one row of tiles). A predictor projected to a
    coarser label set (`Predictor.project_to`) has its class map applied last."""
    if mode == "tile":
        window = tile_size or predictor.fixed_size or predictor.input_size
        tiled = [segment_tiled(predictor, im, window, overlap=overlap, batch_size=batch_size) for im in images]
        return _mapped(predictor, tiled)
    if mode == "native" and predictor.fixed_size is not None:
        raise UserError(
            f"{predictor.source} was exported for a fixed {predictor.fixed_size[0]}x{predictor.fixed_size[1]} input; "
            "it cannot run at native resolution: drop --native, use --tile, or re-export with dynamic axes"
        )
    out: list[np.ndarray] = []
    for group in _batches(images, batch_size, same_size=(mode == "native")):
        if mode == "resize":
            inputs = [resize_image(im, predictor.fixed_size or predictor.input_size) for im in group]
        else:
            inputs = group
        logits = predictor.logits(_to_batch(inputs))
        out.extend(upsample_argmax(lg, (im.shape[1], im.shape[0])) for lg, im in zip(logits, group, strict=True))
    return _mapped(predictor, out)


def _mapped(predictor: Predictor, labels: list[np.ndarray]) -> list[np.ndarray]:
    """The predictor's class map (a projection to a coarser label set) applied after the argmax."""
    lut = predictor.class_map
    return labels if lut is None else [lut[x] for x in labels]


def _batches(images: list[np.ndarray], batch_size: int, *, same_size: bool) -> list[list[np.ndarray]]:
    groups: list[list[np.ndarray]] = []
    for im in images:
        if groups and len(groups[-1]) < batch_size and (not same_size or groups[-1][0].shape == im.shape):
            groups[-1].append(im)
        else:
            groups.append([im])
    return groups


def tile_starts(length: int, window: int, overlap: float) -> list[int]:
    """Window offsets covering [0, length): stride window*(1-overlap), the last one flush
    with the end. A window longer than the image gives the single offset 0."""
    if length <= window:
        return [0]
    stride = max(1, round(window * (1.0 - overlap)))
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def segment_tiled(
    predictor: Predictor, image: np.ndarray, window: tuple[int, int], *, overlap: float = 0.25, batch_size: int = 4
) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 class indices by a sliding window at native resolution.

    Logits of overlapping windows are summed; the argmax of the sum equals the argmax of
    the average (every class at a pixel has the same window count). Rows of the result
    are final once the next row of windows starts below them, so only a band of
    C x window-height x W logits is held, however tall the image."""
    H, W = image.shape[:2]
    tw, th = min(window[0], W), min(window[1], H)
    ys, xs = tile_starts(H, th, overlap), tile_starts(W, tw, overlap)
    out = np.empty((H, W), np.uint8)
    band: np.ndarray | None = None  # (th, W, C) sums for image rows [y, y + th)
    bar = _window_bar(len(ys) * len(xs))
    for r, y in enumerate(ys):
        crops = [image[y : y + th, x : x + tw] for x in xs]
        logits = _window_logits(predictor, crops, batch_size)
        bar.update(len(xs))
        if band is None:
            band = np.zeros((th, W, logits[0].shape[0]), np.float32)
        for x, lg in zip(xs, logits, strict=True):
            band[:, x : x + tw] += lg.transpose(1, 2, 0)
        done = (ys[r + 1] if r + 1 < len(ys) else H) - y  # rows no later window touches
        out[y : y + done] = _argmax(band[:done])
        band[: th - done] = band[done:].copy()
        band[th - done :] = 0.0
    bar.close()
    return out


def _window_bar(total: int) -> Any:
    """A progress bar over the windows of one image, only when there are many of them."""
    from tqdm import tqdm

    return tqdm(total=total, desc="tiles", unit="win", leave=False, disable=total < 32)


def _window_logits(predictor: Predictor, crops: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """(C, h, w) logits of equal-size crops; padded (edge pixels repeated) to a fixed-size
    model's input and cropped back."""
    h, w = crops[0].shape[:2]
    if predictor.fixed_size is not None and predictor.fixed_size != (w, h):
        fw, fh = predictor.fixed_size
        if w > fw or h > fh:
            raise UserError(f"--tile-size {w}x{h} exceeds the {fw}x{fh} input {predictor.source} was exported for")
        crops = [np.pad(c, ((0, fh - h), (0, fw - w), (0, 0)), mode="edge") for c in crops]
    out: list[np.ndarray] = []
    for i in range(0, len(crops), batch_size):
        out.extend(lg[:, :h, :w] for lg in predictor.logits(_to_batch(crops[i : i + batch_size])))
    return out

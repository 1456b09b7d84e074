"""Segmenting images of any size with a `Predictor`: batching, the three resolution modes
and the bilinear upsampling of logits, all in numpy/OpenCV so the PyTorch and the ONNX
engines post-process identically.

Three ways to run a model on an (H, W) image, all returning (H, W) class indices:

- ``resize`` (default): resize to the training input size, run, upsample the logits
  bilinearly back to (H, W). The model sees the scale it was trained at.
- ``native``: run on the image as it is (the model pads to its stride inside).
- ``tile``: slide a window over the image at its own resolution, with overlap; logits
  of overlapping windows are averaged. Memory stays at C x window-height x W floats.

Test-time augmentation (`TTA`, the ``--tta flip`` and ``--scales`` flags) follows
mmsegmentation's aug-test (`SegTTAModel.merge_preds` in mmseg 1.x, `EncoderDecoder.aug_test`
in 0.x): for each view, a scale and optionally a left-right flip of what the mode runs, the
model runs (in ``tile`` mode: a whole sliding-window pass over the rescaled image, as
mmseg's slide inference runs inside each view), the logits are flipped back, upsampled
bilinearly to the output size, turned into probabilities by a softmax, and the
probabilities are averaged over the views; the argmax of the average is the prediction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from urbanseg.errors import UserError
from urbanseg.imaging import resize_image
from urbanseg.inference.predictor import Predictor

Mode = Literal["resize", "native", "tile"]


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: the views are every scale in `scales` and, with `flip`,
    each of them mirrored left-right too. A scale multiplies the size the mode runs the
    model at: the training input size (``resize``) or the image's own (``native``,
    ``tile``; the tile window keeps its size, as in mmseg). The default, one view at scale
    1 without a flip, is plain segmenting."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        bad = [s for s in self.scales if not (math.isfinite(s) and s > 0)]
        if not self.scales or bad or len(set(self.scales)) != len(self.scales):
            raise UserError(f"TTA scales {list(self.scales)}: give distinct numbers > 0, e.g. 0.75, 1, 1.25")

    @classmethod
    def from_flags(cls, tta: str, scales: str) -> TTA:
        """From the `--tta none|flip` and `--scales 0.75,1,1.25` flags (checked by the configs)."""
        return cls(tuple(float(s) for s in scales.split(",")), flip=(tta == "flip"))

    def views(self) -> list[tuple[float, bool]]:
        """(scale, flipped) of every view, in the order they run."""
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]

    @property
    def plain(self) -> bool:
        return self.views() == [(1.0, False)]

    def describe(self) -> str:
        """E.g. "scales 0.75, 1, 1.25 x flip (6 views)", or "none"."""
        if self.plain:
            return "none"
        flip = " x flip" if self.flip else ""
        return f"scales {', '.join(f'{s:g}' for s in self.scales)}{flip} ({len(self.views())} views)"


PLAIN = TTA()


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


def softmax(hwc: np.ndarray) -> np.ndarray:
    """Softmax over the last (class) axis of float32 logits, in a new array."""
    out = hwc - hwc.max(axis=-1, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return out


def mean_probabilities(
    views: list[np.ndarray], size: tuple[int, int], rows: tuple[int, int] | None = None
) -> np.ndarray:
    """The mean over `views` ((C, h_v, w_v) float32 logits of one image, any sizes) of
    softmax(bilinear upsample to size (W, H)): (H, W, C) float32, or only output rows
    [rows[0], rows[1])."""
    total = softmax(upsample_logits(views[0], size, rows))
    for logits in views[1:]:
        total += softmax(upsample_logits(logits, size, rows))
    total /= len(views)
    return total


def fuse_argmax(views: list[np.ndarray], size: tuple[int, int], band: int = 256) -> np.ndarray:
    """(H, W) uint8 class indices at size (W, H): the argmax of `mean_probabilities`,
    `band` rows at a time. One view is `upsample_argmax` (a softmax keeps the argmax)."""
    if len(views) == 1:
        return upsample_argmax(views[0], size, band)
    W, H = size
    out = np.empty((H, W), np.uint8)
    for y in range(0, H, band):
        out[y : y + band] = _argmax(mean_probabilities(views, size, (y, min(H, y + band))))
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
    tta: TTA = PLAIN,
    sizes: list[tuple[int, int]] | None = None,
) -> list[np.ndarray]:
    """Class indices for each (H, W, 3) uint8 image: a list of (H, W) uint8 arrays, or of
    size (W, H) from `sizes` (e.g. a ground truth's: the logits are upsampled to it).

    Images are batched `batch_size` at a time (in ``native`` mode, runs of equal size;
    in ``tile`` mode, the windows of one row of tiles); with `tta`, one batch per view.
    With several views, each image's views' logits are held until they are fused. A
    predictor projected to a coarser label set (`Predictor.project_to`) has its class map
    applied last."""
    sizes = sizes or [(im.shape[1], im.shape[0]) for im in images]
    if mode == "tile":
        window = tile_size or predictor.fixed_size or predictor.input_size
        tiled = [
            _segment_tiled_views(predictor, im, size, window, overlap, batch_size, tta)
            for im, size in zip(images, sizes, strict=True)
        ]
        return _mapped(predictor, tiled)
    if mode == "native" and predictor.fixed_size is not None:
        raise UserError(
            f"{predictor.source} was exported for a fixed {predictor.fixed_size[0]}x{predictor.fixed_size[1]} input; "
            "it cannot run at native resolution: drop --native, use --tile, or re-export with dynamic axes"
        )
    if predictor.fixed_size is not None and tta.scales != (1.0,):
        raise UserError(
            f"{predictor.source} was exported for a fixed {predictor.fixed_size[0]}x{predictor.fixed_size[1]} input; "
            f"it cannot run the --scales {','.join(f'{s:g}' for s in tta.scales)} views: drop --scales or "
            "re-export with dynamic axes (predict's --tile runs them too: its windows keep their size)"
        )
    out: list[np.ndarray] = []
    for group in _batches(images, batch_size, same_size=(mode == "native")):
        views: list[list[np.ndarray]] = [[] for _ in group]
        for scale, flip in tta.views():
            inputs = []
            for k in group:
                h, w = images[k].shape[:2]
                base = (predictor.fixed_size or predictor.input_size) if mode == "resize" else (w, h)
                inputs.append(_view(images[k], base, scale, flip))
            for held, logits in zip(views, predictor.logits(_to_batch(inputs)), strict=True):
                held.append(logits[:, :, ::-1] if flip else logits)
        out.extend(fuse_argmax(held, sizes[k]) for held, k in zip(views, group, strict=True))
    return _mapped(predictor, out)


def _mapped(predictor: Predictor, labels: list[np.ndarray]) -> list[np.ndarray]:
    """The predictor's class map (a projection to a coarser label set) applied after the argmax."""
    lut = predictor.class_map
    return labels if lut is None else [lut[x] for x in labels]


def _view(image: np.ndarray, base: tuple[int, int], scale: float, flip: bool) -> np.ndarray:
    """`image` resized to `base` (W, H) times `scale` (rounded, at least 1 pixel), mirrored
    left-right when `flip`."""
    size = (max(1, round(base[0] * scale)), max(1, round(base[1] * scale)))
    resized = resize_image(image, size)
    return resized[:, ::-1] if flip else resized


def _batches(images: list[np.ndarray], batch_size: int, *, same_size: bool) -> list[list[int]]:
    """Consecutive runs of at most `batch_size` image indices (of one image size if `same_size`)."""
    groups: list[list[int]] = []
    for k, im in enumerate(images):
        if groups and len(groups[-1]) < batch_size and (not same_size or images[groups[-1][0]].shape == im.shape):
            groups[-1].append(k)
        else:
            groups.append([k])
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
    out = np.empty(image.shape[:2], np.uint8)
    for y, sums in _tile_rows(predictor, image, window, overlap, batch_size):
        out[y : y + len(sums)] = _argmax(sums)
    return out


def tiled_logits(
    predictor: Predictor, image: np.ndarray, window: tuple[int, int], *, overlap: float = 0.25, batch_size: int = 4
) -> np.ndarray:
    """(H, W, 3) uint8 -> (C, H, W) float32 logits by a sliding window at native
    resolution: at each pixel the mean over the windows covering it (mmseg's slide
    inference: the sum divided by the count)."""
    H, W = image.shape[:2]
    tw, th = min(window[0], W), min(window[1], H)
    counts = [np.zeros(n, np.float32) for n in (H, W)]
    for count, n, t in zip(counts, (H, W), (th, tw), strict=True):
        for start in tile_starts(n, t, overlap):
            count[start : start + t] += 1.0
    total: np.ndarray | None = None
    for y, sums in _tile_rows(predictor, image, window, overlap, batch_size):
        if total is None:
            total = np.empty((H, W, sums.shape[-1]), np.float32)
        total[y : y + len(sums)] = sums
    assert total is not None  # an image has at least one window
    total /= (counts[0][:, None] * counts[1][None, :])[..., None]
    return total.transpose(2, 0, 1)


def _segment_tiled_views(
    predictor: Predictor,
    image: np.ndarray,
    size: tuple[int, int],
    window: tuple[int, int],
    overlap: float,
    batch_size: int,
    tta: TTA,
) -> np.ndarray:
    """``tile`` mode for one image: plain (a band of logits at a time) unless there are
    views to fuse or another output size; then one sliding-window pass per view."""
    if tta.plain and size == (image.shape[1], image.shape[0]):
        return segment_tiled(predictor, image, window, overlap=overlap, batch_size=batch_size)
    views = []
    for scale, flip in tta.views():
        logits = tiled_logits(
            predictor,
            _view(image, (image.shape[1], image.shape[0]), scale, flip),
            window,
            overlap=overlap,
            batch_size=batch_size,
        )
        views.append(logits[:, :, ::-1] if flip else logits)
    return fuse_argmax(views, size)


def _tile_rows(
    predictor: Predictor, image: np.ndarray, window: tuple[int, int], overlap: float, batch_size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """The sliding window over one image, row of windows by row: yields (y, sums) where
    sums (rows, W, C) float32 are the final window-logit sums of image rows [y, y + rows).
    Only a band of C x window-height x W sums is held."""
    H, W = image.shape[:2]
    tw, th = min(window[0], W), min(window[1], H)
    ys, xs = tile_starts(H, th, overlap), tile_starts(W, tw, overlap)
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
        yield y, band[:done]
        band[: th - done] = band[done:].copy()
        band[th - done :] = 0.0
    bar.close()


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

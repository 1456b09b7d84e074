"""Paired, mask-safe image/label transforms for training; evaluation uses none.

A transform is called as `transform(image, label, generator) -> (image, label)` with
image a uint8 tensor (3, H, W) RGB, label a uint8 tensor (H, W) of class indices (255 =
ignore) and `generator` a `torch.Generator` seeded per sample by the loader from (seed,
epoch, index). All randomness comes from that generator, never from global or worker RNG
state, so an augmented batch is the same whatever the number of workers and after a resume.

Masks are resized with nearest neighbour (NEAREST_EXACT: pixel centres, consistent with the
image's bilinear sampling), padded with the ignore index and never leave uint8, so their
values stay in the original set plus 255. Geometry uses torchvision's functional ops on
tensors (imported at module level so forked DataLoader workers inherit them instead of each
paying torchvision's import); the colour jitter uses OpenCV on (H, W, 3) pixels (about 4x
faster than torchvision's ops at 512x256, its hue shift about 10x, see benchmarks/bench_loader.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from urbanseg.config import check, parse_size
from urbanseg.data.pixels import to_pixels, to_planes

# Luma weights of torchvision's rgb_to_grayscale (ITU-R 601-2), for the contrast's mean.
_LUMA = (0.2989, 0.587, 0.114)
# The fixed number of uniform draws per sample: every transform consumes all of them, so
# turning one augmentation off does not change the random values of the others.
_DRAWS = 12


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation settings (defaults in brackets).

    scale: random zoom factor range [0.5, 2.0]; crop: output (width, height) or "WxH"
    [None: the input size]; flip: horizontal-flip probability [0.5]; brightness, contrast,
    saturation: factor drawn from [1 - x, 1 + x] [0.25 each]; hue: shift drawn from [-x, x]
    of a full turn [0.05]; fill: RGB value of padded image pixels [(0, 0, 0)]; the padded
    label pixels get `ignore_index` [255].
    """

    scale: tuple[float, float] = (0.5, 2.0)
    crop: tuple[int, int] | str | None = None
    flip: float = 0.5
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.05
    fill: tuple[int, int, int] = (0, 0, 0)
    ignore_index: int = 255

    @property
    def crop_size(self) -> tuple[int, int] | None:
        """`crop` as (width, height): a "WxH" string is parsed when the settings are made."""
        return cast("tuple[int, int] | None", self.crop)

    def __post_init__(self) -> None:
        if isinstance(self.crop, str):
            object.__setattr__(self, "crop", parse_size(self.crop, "crop"))
        elif self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "fill", tuple(int(v) for v in self.fill))
        check(
            len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1],
            f"augment scale {self.scale} must be (low, high) with 0 < low <= high, e.g. (0.5, 2.0)",
        )
        check(
            self.crop_size is None or (len(self.crop_size) == 2 and min(self.crop_size) >= 1),
            f"augment crop {self.crop} must be (width, height) >= 1 or None",
        )
        check(0 <= self.flip <= 1, f"augment flip {self.flip} is a probability: use 0..1")
        for name in ("brightness", "contrast", "saturation"):
            check(0 <= getattr(self, name) < 1, f"augment {name} {getattr(self, name)} must be in [0, 1)")
        check(0 <= self.hue <= 0.5, f"augment hue {self.hue} must be in [0, 0.5]")
        check(
            len(self.fill) == 3 and all(0 <= v <= 255 for v in self.fill),
            f"augment fill {self.fill}: use an RGB triple of 0..255",
        )
        check(0 <= self.ignore_index <= 255, f"augment ignore_index {self.ignore_index} must fit in uint8")


class TrainTransform:
    """Photometric jitter (image only, random order), random scale, crop with padding
    (image `fill`, label ignore) at a random position, horizontal flip (both)."""

    def __init__(self, augment: Augment | None = None, **kwargs: Any) -> None:
        self.augment = augment if augment is not None else Augment(**kwargs)

    def __repr__(self) -> str:
        return f"TrainTransform({self.augment})"

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image uint8 (3, H, W), label uint8 (H, W) -> the same dtypes at the crop size
        (h, w) = crop[::-1] (default (H, W)); every random value is drawn from `generator`."""
        a = self.augment
        r = torch.rand(_DRAWS, generator=generator, dtype=torch.float64).tolist()
        image = jitter(
            image,
            brightness=1 + a.brightness * (2 * r[0] - 1),
            contrast=1 + a.contrast * (2 * r[1] - 1),
            saturation=1 + a.saturation * (2 * r[2] - 1),
            hue=a.hue * (2 * r[3] - 1),
            order=np.argsort(r[4:8], kind="stable").tolist(),
        )
        height, width = label.shape
        s = a.scale[0] + (a.scale[1] - a.scale[0]) * r[8]
        image, label = resize_pair(image, label, (max(1, round(width * s)), max(1, round(height * s))))
        crop_w, crop_h = a.crop_size or (width, height)
        top, left = _place(label.shape[0], crop_h, r[9]), _place(label.shape[1], crop_w, r[10])
        image = window(image, top, left, crop_h, crop_w, a.fill)
        label = window(label, top, left, crop_h, crop_w, a.ignore_index)
        if r[11] < a.flip:
            image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label.contiguous()


def eval_transform(
    image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation: the identity (the prepared size is the model's input size)."""
    return image, label


def _place(size: int, crop: int, u: float) -> int:
    """Top/left of a `crop`-long window on a `size`-long axis: inside it when it fits,
    overhanging it (negative) when it does not; uniform over the possible positions."""
    lo, hi = min(0, size - crop), max(0, size - crop)
    return lo + min(int(u * (hi - lo + 1)), hi - lo)


def resize_pair(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image (3, H, W) uint8 bilinear with anti-aliasing and label (H, W) uint8
    nearest to `size` = (width, height)."""
    width, height = size
    if (height, width) == tuple(label.shape):
        return image, label
    image = F.resize(image, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
    label = F.resize(label[None], [height, width], interpolation=InterpolationMode.NEAREST_EXACT)[0]
    return image, label


def window(x: torch.Tensor, top: int, left: int, height: int, width: int, fill: int | tuple[int, ...]) -> torch.Tensor:
    """The (..., height, width) window of `x` (..., H, W) at (top, left); parts outside `x`
    (negative offsets or overhang) get `fill` (a scalar, or one value per channel)."""
    H, W = x.shape[-2:]
    if top == 0 and left == 0 and (height, width) == (H, W):
        return x
    out = torch.empty((*x.shape[:-2], height, width), dtype=x.dtype)
    out[...] = torch.as_tensor(fill, dtype=x.dtype).reshape(-1, 1, 1) if isinstance(fill, tuple) else fill
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, H), min(left + width, W)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top : y1 - top, x0 - left : x1 - left] = x[..., y0:y1, x0:x1]
    return out


def jitter(
    image: torch.Tensor,
    *,
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    hue: float = 0.0,
    order: list[int] | None = None,
) -> torch.Tensor:
    """Colour jitter of a uint8 (3, H, W) RGB image, as torchvision's ColorJitter: factors of
    1 and a hue of 0 leave it unchanged; `order` permutes [brightness, contrast, saturation, hue].

    Each factor blends as torchvision's adjust_* do (with black, the mean luma, each pixel's
    luma), computed by OpenCV on (H, W, 3) pixels: it rounds where torchvision truncates, so
    values are within 2 of torchvision's per op (tested), at about a quarter of the time."""
    ops = [
        (brightness != 1.0, lambda x: cv2.convertScaleAbs(x, alpha=brightness)),
        (contrast != 1.0, lambda x: _blend_with_mean_luma(x, contrast)),
        (saturation != 1.0, lambda x: _blend_with_luma(x, saturation)),
        (hue != 0.0, lambda x: _rotate_hue(x, hue)),
    ]
    steps = [ops[k][1] for k in order or range(4) if ops[k][0]]
    if not steps:
        return image
    pixels = to_pixels(image)
    for step in steps:
        pixels = step(pixels)
    return to_planes(pixels)


def _blend_with_mean_luma(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Contrast: factor * pixels + (1 - factor) * the image's mean luma, saturated to uint8."""
    mean = float(np.dot(cv2.mean(pixels)[:3], _LUMA))
    return cv2.addWeighted(pixels, factor, pixels, 0.0, (1.0 - factor) * mean)


def _blend_with_luma(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Saturation: factor * pixels + (1 - factor) * each pixel's luma, saturated to uint8."""
    grey = cv2.cvtColor(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(pixels, factor, grey, 1.0 - factor, 0.0)


def _rotate_hue(pixels: np.ndarray, hue: float) -> np.ndarray:
    """Rotate the hue of uint8 (H, W, 3) RGB pixels by `hue` turns via OpenCV's full-range
    8-bit HSV (hue 0..255 wraps modulo 256)."""
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(round(hue * 256) % 256)  # uint8 arithmetic wraps: a rotation
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def shift_hue(image: torch.Tensor, hue: float) -> torch.Tensor:
    """Rotate the hue of a uint8 (3, H, W) RGB image by `hue` turns (-0.5..0.5) via OpenCV's
    full-range 8-bit HSV (hue 0..255 wraps modulo 256)."""
    return to_planes(_rotate_hue(to_pixels(image), hue))

"""Training losses: cross-entropy with ignore index 255, class weights from pixel counts,
online hard-pixel mining (OHEM), and Dice or Lovasz-Softmax from segmentation-models-pytorch.

All losses take logits (N, C, H, W) (any float dtype; computed in float32) and targets
(N, H, W) int64 class indices with 255 = ignore, and return a float32 scalar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from urbanseg.errors import UserError

WeightMethod = Literal["none", "inverse", "median", "sqrt"]
LossKind = Literal["ce", "ce+dice", "ce+lovasz"]


def pixel_count_array(pixel_counts: Sequence[int] | Mapping[str, int], classes: Sequence[str]) -> np.ndarray:
    """Pixel counts per class as int64 (C,), from a list in class order or a {name: count} dict."""
    if isinstance(pixel_counts, Mapping):
        missing = [c for c in classes if c not in pixel_counts]
        if missing:
            raise UserError(f"pixel counts lack classes {missing}; re-run `urbanseg pack` to rebuild spec.json")
        counts = [pixel_counts[c] for c in classes]
    else:
        counts = list(pixel_counts)
    if len(counts) != len(classes):
        raise UserError(f"{len(counts)} pixel counts for {len(classes)} classes; re-run `urbanseg pack`")
    return np.asarray(counts, dtype=np.int64)


def class_weights(pixel_counts: np.ndarray, method: WeightMethod) -> np.ndarray | None:
    """Cross-entropy class weights, float32 (C,), from training pixel counts int (C,).

    With f_c the pixel frequency of class c: ``inverse`` 1/f_c, ``sqrt`` 1/sqrt(f_c),
    ``median`` median(f)/f_c (median-frequency balancing, Eigen & Fergus 2015,
    https://arxiv.org/abs/1411.4734). All are scaled so the classes that occur average
    weight 1; a class with no training pixels gets weight 0 (it never appears in a target).
    Returns None for ``none``.
    """
    if method == "none":
        return None
    counts = np.asarray(pixel_counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise UserError("the training split has no labelled pixels: cannot compute class weights")
    freq = counts / counts.sum()
    weights = np.zeros_like(freq)
    if method == "inverse":
        weights[present] = 1.0 / freq[present]
    elif method == "sqrt":
        weights[present] = 1.0 / np.sqrt(freq[present])
    elif method == "median":
        weights[present] = np.median(freq[present]) / freq[present]
    else:
        raise ValueError(f"unknown class weight method {method!r}")
    weights[present] /= weights[present].mean()
    return weights.astype(np.float32)


def _pixel_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int):
    """Per-pixel weighted NLL (N, H, W) (0 at ignored pixels) and per-pixel weights (N, H, W)."""
    pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if weight is None:
        pix_w = valid.to(pixel.dtype)
    else:
        pix_w = weight[target.clamp(max=logits.shape[1] - 1)] * valid
    return pixel, pix_w


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, ignore_index: int = 255
) -> torch.Tensor:
    """Weighted mean cross-entropy over non-ignored pixels, like `F.cross_entropy`, except
    that a batch with no labelled pixel gives 0 (with a gradient graph) instead of NaN."""
    pixel, pix_w = _pixel_ce(logits.float(), target, weight, ignore_index)
    return pixel.sum() / pix_w.sum().clamp_min(1e-12)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    thresh: float = 0.7,
    min_kept: float = 0.1,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Cross-entropy over the hard pixels only (online hard example mining, as in PSPNet /
    mmsegmentation's OHEMPixelSampler): pixels whose predicted probability of the true class
    is below `thresh`, and at least the `min_kept` fraction (0..1) of the labelled pixels
    with the lowest such probability, so easy batches still give a gradient.

    logits (N, C, H, W) float, target (N, H, W) int64 -> float32 scalar.
    """
    logits = logits.float()
    pixel, pix_w = _pixel_ce(logits, target, weight, ignore_index)
    valid = target != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return pixel.sum() * 0.0
    with torch.no_grad():
        safe = target.clamp(max=logits.shape[1] - 1).unsqueeze(1)
        p_true = logits.softmax(dim=1).gather(1, safe).squeeze(1)
        p_true = torch.where(valid, p_true, torch.full_like(p_true, 2.0))  # ignored pixels: never hard
        keep = max(1, int(np.ceil(min_kept * n_valid)))
        # the probability of the keep-th hardest pixel: everything at or below it is kept
        kth = torch.kthvalue(p_true.flatten(), keep).values
        hard = valid & ((p_true < thresh) | (p_true <= kth))
    hard_w = pix_w * hard
    return (pixel * hard).sum() / hard_w.sum().clamp_min(1e-12)


class SegmentationLoss(nn.Module):
    """Cross-entropy (optionally class-weighted and/or OHEM) plus an optional region loss
    (Dice or Lovasz-Softmax from `segmentation_models_pytorch.losses`, weight 1).

    forward(logits (N, C, H, W) float, target (N, H, W) int64, 255 = ignore) -> float32 scalar.
    """

    weight: torch.Tensor | None  # (C,) class weights, a buffer

    def __init__(
        self,
        kind: LossKind = "ce",
        *,
        weight: np.ndarray | None = None,
        ohem: bool = False,
        ohem_thresh: float = 0.7,
        ohem_min_kept: float = 0.1,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.kind, self.ohem, self.ignore_index = kind, ohem, ignore_index
        self.ohem_thresh, self.ohem_min_kept = ohem_thresh, ohem_min_kept
        # a buffer so .to(device) moves it and state_dict records it
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        if kind == "ce":
            self.region = None
        elif kind == "ce+dice":
            from segmentation_models_pytorch import losses as smp_losses  # imports timm: only when used

            self.region = smp_losses.DiceLoss("multiclass", ignore_index=ignore_index, from_logits=True)
        elif kind == "ce+lovasz":
            from segmentation_models_pytorch import losses as smp_losses

            self.region = smp_losses.LovaszLoss("multiclass", ignore_index=ignore_index)
        else:
            raise ValueError(f"unknown loss {kind!r}; use ce, ce+dice or ce+lovasz")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.ohem:
            loss = ohem_cross_entropy(
                logits,
                target,
                self.weight,
                thresh=self.ohem_thresh,
                min_kept=self.ohem_min_kept,
                ignore_index=self.ignore_index,
            )
        else:
            loss = cross_entropy(logits, target, self.weight, self.ignore_index)
        if self.region is not None:
            # .sum(): smp's Lovasz returns an empty tensor when every pixel is ignored
            loss = loss + self.region(logits, target).sum()
        return loss

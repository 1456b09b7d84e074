"""Stand-in predictors and pictures for the segmentation tests."""

from pathlib import Path

import cv2
import numpy as np

from urbanseg.inference.predictor import Predictor
from urbanseg.labels import get_label_set


class PointwisePredictor(Predictor):
    """Logits = a fixed linear map of each pixel's RGB: no receptive field, so any tiling
    must reproduce the untiled result exactly. Records the batch shapes it saw."""

    def __init__(self, fixed_size=None, blur=0):
        super().__init__(get_label_set("categories8"), (32, 16), source=Path("fake"))
        self.fixed_size = fixed_size
        self.weights = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
        self.blur = blur
        self.calls = []

    def logits(self, batch):
        self.calls.append(batch.shape)
        if self.fixed_size is not None:
            assert batch.shape[2:] == (self.fixed_size[1], self.fixed_size[0])
        out = np.einsum("kc,nchw->nkhw", self.weights, batch / 255.0)
        if self.blur:  # a receptive field: box blur of every logit map (zero padding)
            k = 2 * self.blur + 1
            out = np.stack([[cv2.boxFilter(m, -1, (k, k), borderType=cv2.BORDER_CONSTANT) for m in lg] for lg in out])
        return out.astype(np.float32)


def scene(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.resize(
        rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8),
        (w, h),
        interpolation=cv2.INTER_NEAREST,
    )

"""Synthetic Cityscapes ground truth and predictions for the metric tests and the
evaluation benchmark, and numpy as the official evaluation script expects it."""

from __future__ import annotations

import numpy as np

from urbanseg.labels import ID_TO_LABEL

INSTANCE_LABELS = [24, 25, 26, 27, 29, 30, 32, 33]  # person .. bicycle, caravan/trailer (unscored)
STUFF_LABELS = [i for i in range(34) if not ID_TO_LABEL[i].hasInstances]


def make_scene(rng: np.random.Generator, height: int, width: int, block: int = 32):
    """A synthetic Cityscapes ground truth and a prediction derived from it.

    Returns (gt label ids uint8, gt instance ids int32, predicted label ids uint8), all
    (H, W). Stuff is blocky regions of every non-instance label (scored or not);
    instances are rectangles of very different sizes (so the iIoU weights matter), with
    a crowd region that has no instance id.
    """
    coarse = rng.choice(STUFF_LABELS, (height // block + 1, width // block + 1))
    gt = np.repeat(np.repeat(coarse, block, 0), block, 1)[:height, :width].astype(np.uint8)
    inst = gt.astype(np.int32)
    for k in range(int(rng.integers(15, 40))):
        label = int(rng.choice(INSTANCE_LABELS))
        h, w = (int(v) for v in rng.integers(4, [height // 3, width // 4]))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        gt[y : y + h, x : x + w] = label
        inst[y : y + h, x : x + w] = label * 1000 + k
    gt[:8, : width // 5], inst[:8, : width // 5] = 24, 24  # a crowd of persons: no instance id
    return gt, inst, corrupt_prediction(rng, gt, inst)


def corrupt_prediction(rng: np.random.Generator, gt: np.ndarray, inst: np.ndarray) -> np.ndarray:
    """A prediction of label ids from the ground truth: shifted (boundary errors), random
    blocks overwritten with random ids (unscored ones too), a third of the cars turned
    into trucks (a category hit but a class miss), bus predicted where there is none
    (IoU 0), train nowhere (NaN if the ground truth has none either)."""
    height, width = gt.shape
    pred = np.roll(gt, (3, -5), (0, 1))
    for _ in range(int(rng.integers(20, 60))):
        y, x = int(rng.integers(0, height - 16)), int(rng.integers(0, width - 16))
        pred[y : y + 16, x : x + 16] = rng.choice([i for i in range(34) if i not in (28, 31)])
    cars = np.unique(inst[(inst // 1000) == 26])
    pred[np.isin(inst, cars[::3]) & (pred == 26)] = 27
    pred[-10:, -30:] = 28
    return pred


class Numpy24Shim:
    """numpy as the official script expects it: `np.in1d` was removed in numpy 2.4."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def in1d(a, b, invert=False):
        return np.isin(np.ravel(a), b, invert=invert)


def flat_scores(scores: dict) -> dict:
    """{"class_iou": {"road": x}} -> {"class_iou/road": x}."""
    out = {}
    for key, value in scores.items():
        out.update({f"{key}/{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return out

"""Segmentation scores from a streaming confusion matrix.

Scores are *dataset-level*: pixel counts are summed over every image first and the
ratios taken once at the end, so a large image weighs more than a small one and a class
missing from one image does not score 0 there (the original project averaged per-batch
scores, which does both). Definitions, for a class c with tp/fp/fn pixel counts:

- iou = tp / (tp + fp + fn), precision = tp / (tp + fp), recall = tp / (tp + fn),
  f1 = 2 tp / (2 tp + fp + fn) (the harmonic mean of precision and recall, exactly).
- A class absent from both ground truth and prediction is *n/a* (None): every ratio is
  0/0. It is left out of the averages (``miou``, ``mean_precision``, ...). A class that
  is present on one side only scores 0 where the ratio is 0/0 on that side.
- Ground truth equal to ``ignore_index`` (255) is left out entirely.
- A prediction outside 0..C-1 (255, say) is no class: it counts as a miss (fn) of the
  ground-truth class, lowering its recall and IoU, and as nobody's false positive. The
  official Cityscapes script treats a prediction of an unscored label id the same way.
- Ground truth outside 0..C-1 that is not ``ignore_index`` is a data error (ValueError).
- pixel_accuracy = correct / scored pixels; mean_accuracy = mean recall over the classes
  with ground-truth pixels (Long et al., "Fully Convolutional Networks", 2015).

Inputs may be numpy arrays or torch tensors; with tensors the counting runs on their
device (a GPU validation loop stays on the GPU) and torch is only imported when a
tensor is given.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

IGNORE_INDEX = 255


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # no tensor can exist unless torch is loaded
    return torch is not None and isinstance(x, torch.Tensor)


def pair_counts(pred: Any, target: Any, num_classes: int, ignore_index: int = IGNORE_INDEX, *, batch: bool = False):
    """Count (ground truth, prediction) pairs with one vectorised bincount.

    pred, target: integer arrays or tensors of the same shape (any shape). With
    ``batch=True`` the first axis indexes images and each gets its own counts.
    Returns int64 counts shaped (N, C+1, C+1) (N = 1 unless batch), numpy or a torch
    tensor on the inputs' device: row/column c < C is class c, the last column counts
    predictions outside 0..C-1; the last row counts ground truth outside 0..C-1 that is
    not ignore_index (callers treat it as an error). Ignored pixels are not counted.
    """
    if not (_is_tensor(pred) or _is_tensor(target)):
        pred, target = np.asarray(pred), np.asarray(target)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground truth shape {tuple(target.shape)}")
    c, n1 = num_classes, num_classes + 1
    n = int(target.shape[0]) if batch and target.ndim else 1
    size = (c + 2) * n1  # one more row for ignored pixels, dropped after counting
    if _is_tensor(pred) or _is_tensor(target):
        import torch

        device = pred.device if _is_tensor(pred) else target.device
        t = torch.as_tensor(target, device=device).long().reshape(n, -1)
        p = torch.as_tensor(pred, device=device).long().reshape(n, -1)
        row = torch.where(t == ignore_index, c + 1, torch.where((t >= 0) & (t < c), t, c))
        col = torch.where((p >= 0) & (p < c), p, c)
        code = row * n1 + col + torch.arange(n, device=device).unsqueeze(1) * size
        counts: Any = torch.bincount(code.reshape(-1), minlength=n * size)  # a tensor or an array
    else:
        tn = np.asarray(target).reshape(n, -1).astype(np.int64)
        pn = np.asarray(pred).reshape(n, -1).astype(np.int64)
        rows = np.where(tn == ignore_index, c + 1, np.where((tn >= 0) & (tn < c), tn, c))
        cols = np.where((pn >= 0) & (pn < c), pn, c)
        codes = rows * n1 + cols + np.arange(n, dtype=np.int64)[:, None] * size
        counts = np.bincount(codes.reshape(-1), minlength=n * size)
    return counts.reshape(n, c + 2, n1)[:, :n1]


def _check_target(counts: Any, target: Any, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError naming the bad values when the ground truth has any outside 0..C-1."""
    if int(counts[..., num_classes, :].sum()) == 0:
        return
    values = np.unique(np.asarray(target.cpu() if _is_tensor(target) else target))
    bad = [int(v) for v in values if not (0 <= v < num_classes or v == ignore_index)]
    raise ValueError(
        f"ground truth holds values {bad[:10]} outside the class indices 0..{num_classes - 1} and not the "
        f"ignore index {ignore_index}; check that the labels were made with the same label set as the model"
    )


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (float64)."""
    return np.divide(num, den, out=np.zeros(num.shape, np.float64), where=den > 0)


def scores_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class scores from counts shaped (..., C+1, C+1) as made by `pair_counts`.

    Returns float64 arrays shaped (..., C): iou, precision, recall, f1 (0 where a ratio
    is 0/0), and ``present`` (bool: the class has ground-truth or predicted pixels; the
    others are n/a), ``gt`` and ``pred`` (int64 pixel counts), ``correct`` and
    ``total`` (int64, shaped (...)).
    """
    counts = np.asarray(counts, dtype=np.int64)
    m = counts[..., :-1, :-1]
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    gt = counts[..., :-1, :].sum(-1)  # a prediction outside 0..C-1 is a miss
    pred = m.sum(-2)
    union = gt + pred - tp
    return {
        "iou": _divide(tp, union),
        "precision": _divide(tp, pred),
        "recall": _divide(tp, gt),
        "f1": _divide(2 * tp, gt + pred),  # == 2 tp / (2 tp + fp + fn)
        "present": union > 0,
        "gt": gt,
        "pred": pred,
        "correct": tp.sum(-1),
        "total": gt.sum(-1),
    }


def _mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    return float(values[mask].mean()) if mask.any() else None


class ConfusionMatrix:
    """A streaming confusion matrix over `num_classes` classes; rows = ground truth.

    ``update`` adds one batch of any shape (numpy or torch; tensors are counted on
    their own device); ``merge``/``all_reduce`` combine matrices from several workers or
    processes; ``compute`` gives the dataset-level scores (see the module docstring).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if not 1 <= num_classes < 2**15:
            raise ValueError(f"num_classes must be in 1..32767, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # (C+1, C+1) int64, numpy or a tensor on the device of the first tensor given.
        self._counts: Any = None

    def reset(self) -> None:
        self._counts = None

    def update(self, pred: Any, target: Any) -> None:
        """Add class-index predictions and ground truth (same shape, any integer dtype)."""
        counts = pair_counts(pred, target, self.num_classes, self.ignore_index)[0]
        _check_target(counts, target, self.num_classes, self.ignore_index)
        self._add(counts)

    def _add(self, counts: Any) -> None:
        if self._counts is None:
            self._counts = counts.clone() if _is_tensor(counts) else np.array(counts, dtype=np.int64)
        elif _is_tensor(self._counts):
            import torch

            self._counts += torch.as_tensor(counts, device=self._counts.device)
        else:
            self._counts += counts.cpu().numpy() if _is_tensor(counts) else counts

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add the counts of `other` (same classes and ignore index) into this one."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class one (ignore {self.ignore_index})"
            )
        if other._counts is not None:
            self._add(other._counts)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over all torch.distributed processes (no-op when not initialised).

        Every process must call it, also one that saw no images."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        was_numpy = not _is_tensor(self._counts)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        if was_numpy:
            counts = torch.as_tensor(self.counts, device=device or "cpu")
        else:
            counts = self._counts.to(device) if device is not None else self._counts
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self._counts = counts.cpu().numpy() if was_numpy else counts.to(self._counts.device)
        return self

    @property
    def counts(self) -> np.ndarray:
        """int64 (C+1, C+1) numpy copy: the last column counts predictions outside 0..C-1."""
        n1 = self.num_classes + 1
        if self._counts is None:
            return np.zeros((n1, n1), np.int64)
        return self._counts.cpu().numpy().copy() if _is_tensor(self._counts) else self._counts.copy()

    @property
    def matrix(self) -> np.ndarray:
        """int64 (C, C) numpy: matrix[i, j] = pixels of ground-truth class i predicted as j."""
        return self.counts[:-1, :-1]

    def compute(self) -> dict[str, Any]:
        """Dataset-level scores, JSON-ready (floats, ints, None for n/a).

        Keys: ``per_class`` {"iou", "precision", "recall", "f1": list of C float|None,
        "gt_pixels", "pred_pixels": list of C int}, the averages over the classes that
        are not n/a ``miou``, ``mean_precision``, ``mean_recall``, ``mean_f1``, and
        ``pixel_accuracy``, ``mean_accuracy``, ``pixels`` (scored pixels),
        ``invalid_predictions`` (pixels predicted outside 0..C-1), ``num_classes``,
        ``scored_classes`` (how many are not n/a; None values when no pixel was scored).
        """
        counts = self.counts
        s = scores_from_counts(counts)
        present = s["present"]
        per_class = {
            k: [float(v) if ok else None for v, ok in zip(s[k], present, strict=True)]
            for k in ("iou", "precision", "recall", "f1")
        }
        total = int(s["total"])
        return {
            "num_classes": self.num_classes,
            "per_class": {**per_class, "gt_pixels": s["gt"].tolist(), "pred_pixels": s["pred"].tolist()},
            "miou": _mean(s["iou"], present),
            "mean_precision": _mean(s["precision"], present),
            "mean_recall": _mean(s["recall"], present),
            "mean_f1": _mean(s["f1"], present),
            "pixel_accuracy": int(s["correct"]) / total if total else None,
            "mean_accuracy": _mean(s["recall"], s["gt"] > 0),
            "pixels": total,
            "invalid_predictions": int(counts[:-1, -1].sum()),
            "scored_classes": int(present.sum()),
        }


def image_scores(pred: Any, target: Any, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[dict[str, Any]]:
    """Per-image mIoU and pixel accuracy of a batch, for per_image.csv and gallery ranking.

    pred, target: (N, H, W) class indices, numpy or torch (one bincount for the whole
    batch). Returns N dicts {"miou": float|None, "pixel_accuracy": float|None,
    "pixels": int}: mIoU over the classes present in that image's ground truth or
    prediction (the n/a rule per image); None when the image has no scored pixel.
    """
    if not (_is_tensor(target) or isinstance(target, np.ndarray)):
        target = np.asarray(target)
    if target.ndim != 3:
        raise ValueError(
            f"image_scores needs a batch shaped (N, H, W), got {tuple(target.shape)}; wrap one image as x[None]"
        )
    if target.shape[0] == 0:
        return []
    counts = pair_counts(pred, target, num_classes, ignore_index, batch=True)
    _check_target(counts, target, num_classes, ignore_index)
    counts = counts.cpu().numpy() if _is_tensor(counts) else counts
    s = scores_from_counts(counts)
    out = []
    for iou, present, correct, total in zip(s["iou"], s["present"], s["correct"], s["total"], strict=True):
        out.append(
            {
                "miou": _mean(iou, present),
                "pixel_accuracy": int(correct) / int(total) if total else None,
                "pixels": int(total),
            }
        )
    return out


def format_table(result: dict[str, Any], class_names: list[str] | tuple[str, ...]) -> str:
    """The markdown table of the original project's report, from `ConfusionMatrix.compute`.

    A row per class (iou | precision | recall | f1_score, 4 decimals, "n/a" for a class
    absent from both ground truth and prediction), an ``average`` row, then a footnote
    saying which classes the averages cover.
    """
    per_class = result["per_class"]
    if len(class_names) != len(per_class["iou"]):
        raise ValueError(f"{len(class_names)} class names for {len(per_class['iou'])} classes")

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    keys = ("iou", "precision", "recall", "f1")
    lines = ["| class | iou | precision | recall | f1_score |", "|-|-|-|-|-|"]
    for i, name in enumerate(class_names):
        lines.append(f"| {name} | " + " | ".join(cell(per_class[k][i]) for k in keys) + " |")
    means = (result["miou"], result["mean_precision"], result["mean_recall"], result["mean_f1"])
    lines.append("| average | " + " | ".join(cell(v) for v in means) + " |")
    absent = [name for i, name in enumerate(class_names) if per_class["iou"][i] is None]
    note = f"Averages over the {len(class_names) - len(absent)} classes that are not n/a"
    if absent:
        note += f"; n/a = absent from both ground truth and prediction: {', '.join(absent)}"
    lines += ["", note + ". Scores are dataset-level (pixel counts summed over all images)."]
    return "\n".join(lines) + "\n"

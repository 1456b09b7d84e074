"""The official Cityscapes pixel-level scores, vectorised and streaming.

Re-implements the definitions of cityscapesscripts'
``evaluation/evalPixelLevelSemanticLabeling.py`` (its pure-Python path) so that the
figures are equal to 1e-9 on the same data (tests/test_metrics.py runs the script as the
reference), without its per-instance full-image masks, its ``np.in1d`` (gone in numpy
2.4) or its files. Inputs per image, at any resolution (the official protocol is the
raw 2048x1024):

- ground truth Cityscapes label ids (``*_gtFine_labelIds.png``), values 0..33;
- ground-truth instance ids (``*_gtFine_instanceIds.png``): label_id * 1000 + k for
  an instance, the bare label id where there is none (crowds, stuff);
- the prediction as Cityscapes label ids (`LabelSet.cityscapes_ids` maps class indices).

Definitions (official): a 34x34 confusion matrix over label ids, rows = ground truth.
For a scored label l (not ``ignoreInEval``): tp = C[l, l]; fn = row sum - tp (a
prediction of an unscored id is a miss); fp = predictions of l on pixels whose ground
truth is another *scored* label (ground truth that is not scored is ignored).
IoU = tp / (tp + fp + fn), NaN (here None) when that is 0/0, i.e. no ground truth and
no false positive; averages skip the NaNs. Categories (7, void excluded: it has no
scored label) use the same formulas over groups of label ids. iIoU replaces tp and fn by
instance-weighted sums: each ground-truth instance of class c with s pixels, t of them
predicted c, adds t * w and (s - t) * w with w = AVG_CLASS_SIZE[c] / s, so every
instance counts as much as an average-sized one; fp stays unweighted. Category iIoU
(human, vehicle: the categories whose labels all have instances) counts a pixel as hit
when its prediction is any label of the category, ignored ones included, and its fp
counts predictions of any label of the category.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from urbanseg.errors import UserError
from urbanseg.labels import CATEGORIES, ID_TO_LABEL, LabelSet

NUM_IDS = 34  # label ids 0..33; license plate (-1) never appears in gtFine label images
# evalPixelLevelSemanticLabeling.py `args.avgClassSize`: mean instance size in pixels
# per class over the training set (test_metrics checks it against the installed script).
AVG_CLASS_SIZE = {
    "bicycle": 4672.3249222261,
    "caravan": 36771.8241758242,
    "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518,
    "bus": 35732.1511111111,
    "train": 67583.7075812274,
    "car": 12794.0202738185,
    "person": 3462.4756337644,
    "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}
Level = Literal["classes", "categories"]

_LABELS = [ID_TO_LABEL[i] for i in range(NUM_IDS)]
_SCORED = np.array([not lab.ignoreInEval for lab in _LABELS])  # (34,) bool
_CATEGORY = np.array([lab.categoryId for lab in _LABELS])  # (34,) 0..7
# Per label id: the iIoU weight numerator, 0 for labels without instance scores.
_AVG_SIZE = np.array(
    [AVG_CLASS_SIZE[lab.name] if lab.hasInstances and not lab.ignoreInEval else 0.0 for lab in _LABELS]
)
_INSTANCE_CLASSES = np.flatnonzero(_AVG_SIZE > 0)  # person, rider, car, ... (8)
# Categories with instance scores: every label (id >= 0) of the category has instances.
_INSTANCE_CATEGORIES = np.array(
    [k for k in range(len(CATEGORIES)) if all(lab.hasInstances for lab in _LABELS if lab.categoryId == k)]
)
_SCORED_IDS = np.flatnonzero(_SCORED)  # the 19 classes
_SCORED_CATEGORIES = np.unique(_CATEGORY[_SCORED])  # flat .. vehicle (7)


def official_levels(label_set: LabelSet) -> tuple[Level, ...]:
    """Which official scores a model with this label set can be judged on.

    "classes" when every scored label id comes back as itself through class index and
    `LabelSet.cityscapes_ids` (classes19); "categories" when it comes back as a label of
    its own category (all three built-in sets)."""
    lut = label_set.cityscapes_ids()  # UserError for a colour-only set: id_to_class is set below
    assert label_set.id_to_class is not None
    back = lut[np.asarray(label_set.id_to_class[:NUM_IDS])[_SCORED_IDS]]
    levels: list[Level] = []
    if np.array_equal(back, _SCORED_IDS):
        levels.append("classes")
    if np.array_equal(_CATEGORY[back], _CATEGORY[_SCORED_IDS]):
        levels.append("categories")
    return tuple(levels)


def read_ground_truth(label_ids_path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``*_gtFine_labelIds.png`` and its sibling ``*_gtFine_instanceIds.png``.

    Returns (label ids (H, W) uint8, instance ids (H, W) int32)."""
    path = Path(label_ids_path)
    inst_path = path.with_name(path.name.replace("labelIds", "instanceIds"))
    label_ids, instance_ids = (_read_single_channel(p) for p in (path, inst_path))
    return label_ids.astype(np.uint8, copy=False), instance_ids.astype(np.int32, copy=False)


def _read_single_channel(path: Path) -> np.ndarray:
    """An 8- or 16-bit single-channel PNG as stored (palette images give their indices)."""
    hint = "it needs *_gtFine_labelIds.png and *_gtFine_instanceIds.png side by side"
    if not path.is_file():
        raise UserError(f"cannot read Cityscapes ground truth {path}: no such file; {hint}")
    import cv2

    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # decodes PNG ~1.7x faster than PIL
    if array is None or array.ndim != 2:
        from PIL import Image  # a palette PNG: PIL gives the stored indices, as the official script reads it

        try:
            with Image.open(path) as im:
                array = np.asarray(im)
        except OSError as e:
            raise UserError(f"cannot read Cityscapes ground truth {path}: {e}; {hint}") from None
    if array.ndim != 2:
        raise UserError(f"Cityscapes ground truth {path} has shape {array.shape}; expected one channel of ids")
    return array


def _check_ids(ids: np.ndarray, what: str, name: str) -> None:
    if ids.size and int(ids.max()) >= NUM_IDS:
        bad = np.unique(ids[ids >= NUM_IDS])[:10].tolist()
        where = f" in {name}" if name else ""
        raise ValueError(f"{what}{where} holds ids {bad} outside the Cityscapes label ids 0..{NUM_IDS - 1}")


def _ratio(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> list[float | None]:
    """tp / (tp + fp + fn) as floats, None where the denominator is 0 (the official NaN)."""
    den = tp + fp + fn
    return [float(t) / d if d else None for t, d in zip(tp.tolist(), den.tolist(), strict=True)]


def _mean(values: list[float | None]) -> float | None:
    valid = [v for v in values if v is not None]
    return sum(valid) / len(valid) if valid else None


class OfficialEvaluator:
    """Accumulates the official Cityscapes scores image by image.

    State is a 34x34 int64 matrix plus weighted instance sums per label and category,
    so memory does not grow with the number of images. `label_set` (optional) limits
    the result to the levels the model can be judged on (`official_levels`) and lets
    `update_classes` take class-index predictions.
    """

    def __init__(self, label_set: LabelSet | None = None) -> None:
        self.label_set = label_set
        self.levels: tuple[Level, ...] = official_levels(label_set) if label_set else ("classes", "categories")
        self._lut = label_set.cityscapes_ids() if label_set else None
        self.confusion = np.zeros((NUM_IDS, NUM_IDS), np.int64)
        # Instance-weighted true positives / false negatives per label id and category id.
        self.class_tp_w = np.zeros(NUM_IDS)
        self.class_fn_w = np.zeros(NUM_IDS)
        self.category_tp_w = np.zeros(len(CATEGORIES))
        self.category_fn_w = np.zeros(len(CATEGORIES))
        self.images = 0

    def update_classes(
        self, pred: np.ndarray, gt_ids: np.ndarray, gt_instance_ids: np.ndarray, *, name: str = ""
    ) -> None:
        """Like `update`, with pred as (H, W) class indices of the evaluator's label set."""
        if self._lut is None:
            raise ValueError("update_classes needs OfficialEvaluator(label_set=...)")
        self.update(self._lut[np.asarray(pred)], gt_ids, gt_instance_ids, name=name)

    def update(self, pred_ids: np.ndarray, gt_ids: np.ndarray, gt_instance_ids: np.ndarray, *, name: str = "") -> None:
        """Add one image: (H, W) predicted label ids, gt label ids and gt instance ids.

        `name` (the file) goes into error messages. Raises ValueError on shape mismatch,
        ids outside 0..33, or an instance of a label that has no instance scores."""
        pred, gt, inst = np.asarray(pred_ids), np.asarray(gt_ids), np.asarray(gt_instance_ids)
        if not (pred.ndim == 2 and pred.shape == gt.shape == inst.shape):
            raise ValueError(
                f"{name or 'image'}: prediction {pred.shape}, label ids {gt.shape} and instance ids {inst.shape} "
                "must be (H, W) of the same size; upsample the prediction to the ground truth's size"
            )
        _check_ids(gt, "ground-truth label ids", name)
        _check_ids(pred, "predicted label ids", name)
        code = gt.astype(np.uint16) * NUM_IDS + pred  # < 34 * 34: uint16 is enough
        confusion = np.bincount(code.ravel(), minlength=NUM_IDS * NUM_IDS).reshape(NUM_IDS, NUM_IDS)
        sums = self._instance_sums(pred, inst, name)  # may raise: add nothing before it passed
        self.confusion += confusion
        for key, value in sums.items():
            setattr(self, key, getattr(self, key) + value)
        self.images += 1

    def _instance_sums(self, pred: np.ndarray, inst: np.ndarray, name: str) -> dict[str, np.ndarray]:
        """Instance-weighted hits and misses of one image, per label id and category id.

        One bincount over (instance id, predicted id) pairs replaces the official script's
        full-image mask per instance."""
        sel = inst > 1000  # the official threshold: ids <= 1000 are not instances
        if not sel.any():
            return {}
        iid = inst[sel].astype(np.intp)
        if int(iid.max()) >= NUM_IDS * 1000:
            bad = np.unique(iid[iid >= NUM_IDS * 1000])[:10].tolist()
            raise ValueError(f"instance ids {bad} in {name or 'image'} name label ids >= {NUM_IDS} (id // 1000)")
        # (instance id, predicted label id) pixel counts: at most 34000 x 34 bins.
        table = np.bincount(iid * NUM_IDS + pred[sel], minlength=(int(iid.max()) + 1) * NUM_IDS)
        table = table.reshape(-1, NUM_IDS)
        size = table.sum(1)
        ids = np.flatnonzero(size)
        lab = ids // 1000
        keep = _SCORED[lab]  # the official script skips instances of ignoreInEval labels
        ids, lab = ids[keep], lab[keep]
        if (_AVG_SIZE[lab] == 0).any():
            bad = sorted({_LABELS[i].name for i in lab[_AVG_SIZE[lab] == 0]})
            raise ValueError(f"instance ids in {name or 'image'} belong to labels without instances: {bad}")
        rows = table[ids]  # (instances, 34)
        s, h = size[ids], rows[np.arange(ids.size), lab]
        # Category hit: the prediction is any label id of the instance's category.
        ch = (rows * (_CATEGORY[None, :] == _CATEGORY[lab][:, None])).sum(1)
        w = _AVG_SIZE[lab] / s.astype(np.float64)
        cat, k = _CATEGORY[lab], len(CATEGORIES)
        return {
            "class_tp_w": np.bincount(lab, weights=h * w, minlength=NUM_IDS),
            "class_fn_w": np.bincount(lab, weights=(s - h) * w, minlength=NUM_IDS),
            "category_tp_w": np.bincount(cat, weights=ch * w, minlength=k),
            "category_fn_w": np.bincount(cat, weights=(s - ch) * w, minlength=k),
        }

    def merge(self, other: OfficialEvaluator) -> OfficialEvaluator:
        """Add another evaluator's sums (e.g. from a worker process) into this one."""
        for key in ("confusion", "class_tp_w", "class_fn_w", "category_tp_w", "category_fn_w"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.images += other.images
        return self

    def compute(self) -> dict[str, Any]:
        """The official scores, JSON-ready; None where the official script gives NaN.

        Keys for "classes": ``class_iou`` (19 names), ``class_iiou`` (8 instance
        classes), ``mean_class_iou``, ``mean_class_iiou``; for "categories":
        ``category_iou`` (7), ``category_iiou`` (human, vehicle), ``mean_category_iou``,
        ``mean_category_iiou``; always ``images`` and ``pixels``."""
        c = self.confusion
        out: dict[str, Any] = {"images": self.images, "pixels": int(c.sum())}
        if "classes" in self.levels:
            tp = np.diagonal(c)
            fn = c.sum(1) - tp
            fp = c[_SCORED].sum(0) - np.where(_SCORED, tp, 0)
            iou = _ratio(tp[_SCORED_IDS], fp[_SCORED_IDS], fn[_SCORED_IDS])
            ids = _INSTANCE_CLASSES
            iiou = _ratio(self.class_tp_w[ids], fp[ids], self.class_fn_w[ids])
            out["class_iou"] = {_LABELS[i].name: v for i, v in zip(_SCORED_IDS, iou, strict=True)}
            out["class_iiou"] = {_LABELS[i].name: v for i, v in zip(ids, iiou, strict=True)}
            out["mean_class_iou"], out["mean_class_iiou"] = _mean(iou), _mean(iiou)
        if "categories" in self.levels:
            out.update(self._category_scores())
        return out

    def _category_scores(self) -> dict[str, Any]:
        k = len(CATEGORIES)
        # One-hot (34, 8) groupings: scored label ids by category, and all label ids.
        scored = np.zeros((NUM_IDS, k), np.int64)
        scored[_SCORED_IDS, _CATEGORY[_SCORED_IDS]] = 1
        every = np.zeros((NUM_IDS, k), np.int64)
        every[np.arange(NUM_IDS), _CATEGORY] = 1
        rows = scored.T @ self.confusion  # (8, 34): gt summed per category, scored rows only
        a = rows @ scored  # (8, 8) scored gt category x scored predicted category
        tp = np.diagonal(a)
        fn = rows.sum(1) - tp  # any other prediction, unscored ids included, is a miss
        fp = a.sum(0) - tp
        cats = _SCORED_CATEGORIES
        iou = _ratio(tp[cats], fp[cats], fn[cats])
        b = rows @ every  # (8, 8) scored gt category x predicted category (all its ids)
        fp_all = b.sum(0) - np.diagonal(b)
        inst = _INSTANCE_CATEGORIES
        iiou = _ratio(self.category_tp_w[inst], fp_all[inst], self.category_fn_w[inst])
        return {
            "category_iou": {CATEGORIES[i]: v for i, v in zip(cats, iou, strict=True)},
            "category_iiou": {CATEGORIES[i]: v for i, v in zip(inst, iiou, strict=True)},
            "mean_category_iou": _mean(iou),
            "mean_category_iiou": _mean(iiou),
        }

"""Scoring a model on a coarser label set through the official Cityscapes table: a
`classes19` model's predictions on `categories8` or `categories7` data are mapped class ->
category after the argmax (trainId -> its label's category, `urbanseg.labels.LABELS`).

A projection from label set A to label set B exists when, for every class of A, the
Cityscapes labels it covers that B scores all fall in one class of B: classes19 ->
categories8 / categories7, categories7 -> categories8, and any set to itself. Labels
either set ignores (255: void, parking, guard rail, ... for classes19) do not count; a
class of A with no scored label in B (categories8's void in categories7) has no image,
so there is no projection.

Consequence worth knowing: categories8's class 0, void, has no member among the 19
classes, so a projected 19-class model never predicts it; where the data has void pixels
(categories8 scores them) they all count as misses, and void's IoU is 0, which is what
the original project's table defines for a class predicted nowhere but present.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from urbanseg.errors import UserError
from urbanseg.labels import IGNORE, LABELS, LabelSet


@dataclass(frozen=True)
class Projection:
    """`lut[k]` is the `target` class of `source` class k (255: ignored); (256,) uint8,
    so `lut[pred]` maps any (H, W) uint8 prediction, the ignore index to itself."""

    source: LabelSet
    target: LabelSet
    lut: np.ndarray

    def members(self) -> list[list[int]]:
        """For each target class, the source classes mapped to it (empty: never predicted)."""
        return [
            np.flatnonzero(self.lut[: self.source.num_classes] == j).tolist() for j in range(self.target.num_classes)
        ]

    def describe(self) -> str:
        text = (
            f"predictions of {self.source.name} ({self.source.num_classes} classes) mapped to "
            f"{self.target.name} after the argmax, through the official Cityscapes table"
        )
        never = [self.target.classes[j] for j, m in enumerate(self.members()) if not m]
        if never:
            text += f"; {', '.join(never)} is never predicted, so its IoU is 0 wherever the data has it"
        return text


def find_projection(source: LabelSet, target: LabelSet) -> Projection | None:
    """The projection `source` -> `target` (see the module docstring), or None when there
    is none: a set defined by colours only, a class of `source` split between classes of
    `target` (a finer target), or one that `target` ignores entirely."""
    if source.id_to_class is None or target.id_to_class is None:
        return None
    targets: dict[int, set[int]] = {k: set() for k in range(source.num_classes)}
    for label in LABELS:
        k, j = source.id_to_class[label.id & 0xFF], target.id_to_class[label.id & 0xFF]
        if k < source.num_classes and j < target.num_classes:  # labels either side ignores do not count
            targets[k].add(j)
    if any(len(js) != 1 for js in targets.values()):
        return None
    lut = np.full(256, IGNORE, np.uint8)
    for k, (j,) in targets.items():
        lut[k] = j
    return Projection(source, target, lut)


def require_projection(
    source: LabelSet, target: LabelSet, model: str, data: str, fix: str | None = None
) -> Projection | None:
    """None when the sets are the same classes; the projection when there is one; else a
    UserError naming both sets (`model`, `data` say whose they are) and what would be needed
    (`fix`, default: evaluate's, other data or fine-tuning)."""
    if tuple(source.classes) == tuple(target.classes):
        return None
    found = find_projection(source, target)
    if found is not None:
        return found
    why = (
        "one of them is a custom label map (defined by colours, not by the Cityscapes table)"
        if source.id_to_class is None or target.id_to_class is None
        else f"some {source.name} class covers Cityscapes labels of several {target.name} classes"
    )
    fix = fix or (
        f"Use data prepared with --labels {source.name}, or fine-tune the model on this data "
        f"(urbanseg train --init ...), which gives it a {target.name} head"
    )
    raise UserError(
        f"{model} predicts {source.name} {list(source.classes)}, {data} is labelled with {target.name} "
        f"{list(target.classes)}, and there is no class -> class mapping from the first to the second ({why}). "
        f"Only a finer Cityscapes set maps onto a coarser one (classes19 -> categories8 or categories7). {fix}"
    )

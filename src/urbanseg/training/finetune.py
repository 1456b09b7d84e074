"""Fine-tuning from a checkpoint or a pretrained model (`train --init`): a new head that
starts from the old one when the data's label set is a coarser projection of the model's
(`urbanseg.projection`: classes19 -> categories8/7), and the encoder kept fixed for the
first `--freeze-encoder N` steps.

The head is linear in its input features, so a coarse class's row can be built from its
members' rows. Two rules (`project_head`), measured by benchmarks/bench_init_head.py
against the projected model and a fresh head (step-0 val mIoU on categories8: projected
0.361, dominant 0.354, mean 0.244, fresh 0.015; docs/pretrained.md):

- ``dominant`` (what `train --init` uses): each coarse class takes the row of one
  member, the one the model predicts most often on a sample of the training images
  (`predicted_counts`): road for flat, building for construction, car for vehicle on
  street scenes. Pixels of the other members then score through that row, which the
  dominant member's usually wins anyway.
- ``mean``: the mean of the member rows, bias + log(members), log-sum-exp of the members
  where their logits are close; needs no data, but averages in rare classes' rows.

A coarse class with no member (categories8's void for a 19-class model) gets zero
weights and a bias well below every other class's: like the projected model, it is
never predicted at step 0, and training learns it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from urbanseg.projection import Projection

HeadRule = Literal["mean", "dominant"]
# How far below the lowest projected bias an unpredicted coarse class starts (logits).
_ABSENT_MARGIN = 10.0


def project_head(
    model: Any,
    old_state: dict[str, torch.Tensor],
    projection: Projection,
    *,
    rule: HeadRule = "dominant",
    dominant: Sequence[int] | None = None,
) -> list[str]:
    """Set `model`'s head (tensors under `model.head_prefixes` with one row per class) from
    the checkpoint's head in `old_state` through `projection` (old classes -> the model's);
    returns the keys set. With `rule="dominant"`, `dominant[j]` is the old class whose row
    coarse class j takes (see `dominant_members`; default: its first member)."""
    old_n, new_n = projection.source.num_classes, projection.target.num_classes
    members = projection.members()
    weights = torch.zeros(new_n, old_n, dtype=torch.float64)
    for j, group in enumerate(members):
        if rule == "dominant" and group:
            pick = dominant[j] if dominant is not None else group[0]
            weights[j, pick] = 1.0
        elif group:
            weights[j, group] = 1.0 / len(group)
    log_n = torch.tensor([math.log(len(g)) if g and rule == "mean" else 0.0 for g in members], dtype=torch.float64)
    absent = torch.tensor([not g for g in members])
    state = model.state_dict()
    done: list[str] = []
    for key, value in state.items():
        old = old_state.get(key)
        if not key.startswith(model.head_prefixes) or old is None or old.shape[:1] != (old_n,):
            continue
        if value.shape != (new_n, *old.shape[1:]):
            continue
        new = (weights @ old.double().reshape(old_n, -1)).reshape(value.shape)
        if old.ndim == 1:  # a bias: the log-count once (LR-ASPP sums two heads' logits)
            if not any(k.endswith("bias") for k in done):
                new = new + log_n
            new[absent] = (new[~absent].min() - _ABSENT_MARGIN) if (~absent).any() else 0.0
        state[key] = new.to(value.dtype)
        done.append(key)
    model.load_state_dict(state)
    return done


def predicted_counts(model: Any, images: Any, num_classes: int) -> Any:
    """How many pixels of `images` (a sequence of (3, H, W) 0..255 tensors) `model`
    predicts as each of its `num_classes` classes: (num_classes,) int64 numpy."""
    counts = np.zeros(num_classes, np.int64)
    model.eval()
    with torch.inference_mode():
        for image in images:
            pred = model(image[None].float()).argmax(1)
            counts += np.bincount(pred.flatten().numpy(), minlength=num_classes)[:num_classes]
    return counts


def dominant_members(projection: Projection, counts: Sequence[int]) -> list[int]:
    """For each coarse class, its member predicted most often (`counts` per fine class);
    0 for a class without members (unused)."""
    return [max(group, key=lambda k: counts[k]) if group else 0 for group in projection.members()]


def set_encoder_frozen(model: Any, frozen: bool) -> None:
    """Freeze or unfreeze `model.encoder`'s parameters (`requires_grad`): a frozen encoder
    gets no gradient, so AdamW and SGD skip it (no step, no weight decay, no optimizer
    state) and it stays bit-exact; its backward is skipped too. Under
    DistributedDataParallel the model is wrapped with `find_unused_parameters` for this
    (`urbanseg.training.train.setup`)."""
    model.encoder.requires_grad_(not frozen)

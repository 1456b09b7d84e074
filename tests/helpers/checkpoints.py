"""Tiny randomly initialised checkpoints, saved as training saves them."""

from __future__ import annotations

from pathlib import Path

from urbanseg.labels import get_label_set

SIZE = (64, 32)  # training input size (W, H) of the test checkpoints


def make_checkpoint(path: Path, name: str = "unet-original", labels: str = "categories8", **kwargs) -> Path:
    """A randomly initialised model saved as a training checkpoint would be."""
    import torch

    from urbanseg.checkpoint import build_payload, save_checkpoint
    from urbanseg.models import create_model

    torch.manual_seed(0)
    label_set = get_label_set(labels)
    if name == "unet-original":
        kwargs.setdefault("base_channels", 4)
    model = diversify_head(create_model(name, label_set.num_classes, **kwargs).eval())
    payload = build_payload(
        model, label_set=label_set, input_size=SIZE, config={}, step=7, epoch=1, metrics={"miou": 0.5}
    )
    save_checkpoint(path, payload)
    return path


def diversify_head(model):
    """Random N(0, 1) head weights and zero biases: a freshly initialised model predicts
    one class everywhere, which would make agreement tests pass trivially."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(model.head_prefixes):
                p.normal_(0.0, 1.0) if p.ndim > 1 else p.zero_()
    return model

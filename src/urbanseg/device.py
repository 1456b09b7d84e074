"""Choosing the PyTorch device, one rule for every command (train, evaluate, predict).

The flag's text is validated without PyTorch in `urbanseg.config.check_device`; here it
becomes a `torch.device` that exists on this machine.
"""

from __future__ import annotations

import torch

from urbanseg.errors import UserError


def pick_device(requested: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """`auto` -> cuda if available, else cpu. `cuda` -> the current GPU, or the GPU of
    `local_rank` (one GPU per process under torchrun); `cuda:N` must exist. A CUDA device
    becomes the current one. UserError naming the flag's value when it cannot be had."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    if device.index is None:
        device = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise UserError(
            f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"numbered 0..{torch.cuda.device_count() - 1}"
        )
    torch.cuda.set_device(device)
    return device

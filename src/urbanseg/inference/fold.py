"""Preparing a PyTorch model for fast inference: every convolution followed by a batch
norm is folded into one convolution (`torch.fx.experimental.optimization.fuse`, which
uses `torch.nn.utils.fusion.fuse_conv_bn_eval`: PyTorch's own folding) and, on the CPU,
weights and inputs are channels-last (oneDNN's native layout: no reorder around each
convolution). Why this matters: docs/benchmarks.md, "Inference against the floor".
"""

from __future__ import annotations

from typing import Any


def optimize_for_inference(model: Any, device: Any) -> tuple[Any, list[str]]:
    """(model in eval mode with batch norms folded into the convolutions before them, and
    channels-last on the CPU; the list of what was done). The logits equal the unfolded
    model's up to float rounding (tests/test_engine.py)."""
    import torch

    model = model.eval()
    before = _count_batch_norms(model)
    model = fold_batch_norms(model)
    done = [f"{before - _count_batch_norms(model)} of {before} batch norms folded"] if before else []
    if torch.device(device).type == "cpu":
        model = model.to(memory_format=torch.channels_last)
        done.append("channels-last")
    return model.to(device), done


def fold_batch_norms(module: Any) -> Any:
    """Fold every Conv2d -> BatchNorm2d pair (eval mode) in place: the convolution becomes
    `torch.nn.utils.fusion.fuse_conv_bn_eval`'s folded one, the batch norm an Identity.

    Pairs are found in the graph `torch.fx.symbolic_trace` records (a convolution whose
    only use is a batch norm), so a pair is folded only where the data really flows from
    one to the other; the modules keep their classes and attributes (only leaves are
    swapped). A module that cannot be traced (its forward branches on the input's size)
    is searched child by child. timm's BatchNormAct2d (batch norm, dropout, activation)
    becomes its dropout and activation."""
    from torch import fx, nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, qualname)

    if _count_batch_norms(module) == 0:
        return module
    try:
        graph = Tracer().trace(module)
    except Exception:  # fx raises TraceError, TypeError, ... on Python control flow over traced values
        for _, child in module.named_children():
            fold_batch_norms(child)
        return module
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(module.get_submodule(str(node.target)), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv_name, bn_name = str(source.target), str(node.target)
        conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
        rest = _after_folding(bn)
        if type(conv) is not nn.Conv2d or rest is None or calls[conv_name] != 1 or calls[bn_name] != 1:
            continue
        _set_submodule(module, conv_name, fuse_conv_bn_eval(conv, bn))
        _set_submodule(module, bn_name, rest)
    return module


def _after_folding(bn: Any) -> Any:
    """What replaces batch norm `bn` once folded: an Identity for a plain BatchNorm2d,
    the dropout and activation of timm's BatchNormAct2d, None for anything else (kept)."""
    from torch import nn

    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and isinstance(getattr(bn, "act", None), nn.Module):
        return nn.Sequential(bn.drop, bn.act)
    return None


def _set_submodule(root: Any, target: str, new: Any) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _count_batch_norms(module: Any) -> int:
    from torch import nn

    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())

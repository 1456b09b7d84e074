"""Choosing the inference engine for `--engine auto|torch|onnxruntime`, and making each fast.

- ``torch``: the checkpoint in PyTorch, batch norms folded into the convolutions and
  channels-last on the CPU (`urbanseg.inference.fold`).
- ``onnxruntime``: an ONNX model, or the checkpoint exported to ONNX and cached beside it
  (`cached_onnx`): ``.<checkpoint name>.<first 16 hex digits of its SHA-256>.engine.onnx``,
  with the full hash in the model's metadata. A changed checkpoint has another hash,
  so the next run exports it again and removes the stale export; a file is removed only
  when both its name and its metadata say it is this checkpoint's cache.
- ``auto`` (default): on a CPU, ONNX Runtime through the cache (the faster engine on a
  CPU: docs/benchmarks.md); a folder that cannot be written, or a model that does not
  export, falls back to PyTorch with one printed note. On CUDA, PyTorch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Literal

from urbanseg.errors import UserError
from urbanseg.inference.export import export_onnx, is_onnx_file, verify_onnx
from urbanseg.inference.metadata import OnnxMetadata, read_entry
from urbanseg.inference.predictor import OnnxPredictor, Predictor, TorchPredictor
from urbanseg.util import atomic_path, remove_dead_temporaries

Engine = Literal["auto", "torch", "onnxruntime"]

CACHE_SUFFIX = ".engine.onnx"
CACHE_KEY = "engine_cache"  # inside the urbanseg metadata entry: {"format", "checkpoint", "sha256"}
# 2: exports of urbanseg >= this change (LR-ASPP without its pad and crops, one
# BatchNormalization for the input normalisation); a cache of format 1 is exported again.
CACHE_FORMAT = 2
CACHE_OPSET = 18


# --------------------------------------------------------------------------- the cache


def checkpoint_hash(path: Path) -> str:
    """SHA-256 of the checkpoint file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_path(checkpoint: Path, digest: str) -> Path:
    """The hidden export of `checkpoint` with content hash `digest`, beside it."""
    return checkpoint.with_name(f".{checkpoint.name}.{digest[:16]}{CACHE_SUFFIX}")


def cache_marker(path: Path) -> dict[str, Any] | None:
    """The engine-cache entry of ONNX file `path`'s urbanseg metadata, None when it has
    none (not a cache, or not readable as ONNX)."""
    entry = read_entry(path)
    if entry is not None:
        with contextlib.suppress(ValueError):
            marker = json.loads(entry).get(CACHE_KEY)
            return marker if isinstance(marker, dict) else None
    return None


def _own_marker(path: Path, checkpoint: Path, digest: str | None = None) -> dict[str, Any] | None:
    """The marker of `path` when it is named and marked as an engine cache of `checkpoint`
    (of content hash `digest` when given; of any cache format), else None."""
    if not (path.name.startswith(f".{checkpoint.name}.") and path.name.endswith(CACHE_SUFFIX)):
        return None
    marker = cache_marker(path)
    ours = (
        marker is not None
        and marker.get("checkpoint") == checkpoint.name
        and (digest is None or marker.get("sha256") == digest)
    )
    return marker if ours else None


def stale_caches(checkpoint: Path, digest: str) -> list[Path]:
    """This checkpoint's cache files for other contents (named and marked as such)."""
    keep = cache_path(checkpoint, digest)
    found = checkpoint.parent.glob(f".{checkpoint.name}.*{CACHE_SUFFIX}")
    return sorted(p for p in found if p != keep and p.is_file() and _own_marker(p, checkpoint) is not None)


def cached_onnx(checkpoint: Path) -> Path:
    """The checkpoint's ONNX export, from the cache beside it or exported into it now
    (stale exports of the same checkpoint are removed). OSError when the folder cannot
    be written; UserError when the model does not export faithfully."""
    checkpoint = Path(checkpoint)
    digest = checkpoint_hash(checkpoint)
    target = cache_path(checkpoint, digest)
    marker = _own_marker(target, checkpoint, digest) if target.is_file() else None
    if marker is not None and marker.get("format") == CACHE_FORMAT:
        return target
    if target.exists() and marker is None:  # (an own export of an older format is replaced below)
        raise UserError(
            f"{target} is in the way of the ONNX export urbanseg caches for {checkpoint} but is not one "
            "(its metadata says otherwise); remove it, or run with --engine torch"
        )
    _export_cache(checkpoint, digest, target)
    for old in stale_caches(checkpoint, digest):
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return target


def _export_cache(checkpoint: Path, digest: str, target: Path) -> None:
    from urbanseg.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)  # first: a checkpoint refused is not announced as exported
    remove_dead_temporaries(target)  # of exports killed mid-write
    print(f"exporting {checkpoint} to ONNX for ONNX Runtime (once per checkpoint): {target}")
    model = model_from_checkpoint(ckpt).eval()
    meta = OnnxMetadata.from_checkpoint(ckpt, checkpoint, CACHE_OPSET, True).to_dict()
    meta[CACHE_KEY] = {"format": CACHE_FORMAT, "checkpoint": checkpoint.name, "sha256": digest}
    with atomic_path(target) as tmp:
        export_onnx(model, tmp, tuple(ckpt["input_size"]), opset=CACHE_OPSET, dynamic=True, metadata=meta)
        verify_onnx(model, tmp, tuple(ckpt["input_size"]), dynamic=True)
        # The hash and the weights come from two reads of the file: a checkpoint replaced in
        # between (a training saving best.pt) would give a cache named for one and holding the other.
        if checkpoint_hash(checkpoint) != digest:
            raise UserError(
                f"{checkpoint} changed while it was being exported for ONNX Runtime (is a training writing "
                "it?); nothing was cached: run again once it is written"
            )


# --------------------------------------------------------------------------- choosing


def load_engine(
    *, checkpoint: Path | None = None, model: Path | None = None, engine: str = "auto", device: str = "auto"
) -> Predictor:
    """The predictor `--engine` asks for, for a checkpoint or an ONNX `model`; prints
    one line saying which engine runs (and a note when `auto` falls back to PyTorch).
    An ONNX model never imports PyTorch."""
    if model is not None or (checkpoint is not None and is_onnx_file(checkpoint)):
        onnx_file = Path(model if model is not None else checkpoint)  # type: ignore[arg-type]
        if engine == "torch":
            raise UserError(
                f"--engine torch needs a PyTorch checkpoint; {onnx_file} is an ONNX model, run by ONNX Runtime: "
                "drop --engine torch, or give --checkpoint/--run instead"
            )
        return _announce(OnnxPredictor(onnx_file), "onnxruntime", f"ONNX model {onnx_file}")
    if checkpoint is None:
        raise UserError("give --checkpoint PATH, --run runs/NAME or --model model.onnx")
    from urbanseg.device import pick_device

    checkpoint = Path(checkpoint)
    target = pick_device(device)
    if engine == "torch" or (engine == "auto" and target.type == "cuda"):
        return _torch(checkpoint, str(target))
    if engine == "onnxruntime":
        try:
            return _announce(OnnxPredictor(cached_onnx(checkpoint)), "onnxruntime", "cached ONNX export", checkpoint)
        except OSError as e:  # the folder cannot be written: export to a temporary file for this run
            print(f"note: cannot cache the ONNX export beside {checkpoint} ({e.strerror or e}); exporting for this run")
            with tempfile.TemporaryDirectory(prefix="urbanseg-engine-") as tmp:
                path = Path(tmp) / checkpoint.name
                path.symlink_to(checkpoint.resolve())
                predictor = OnnxPredictor(cached_onnx(path))  # the session holds the graph in memory
            predictor.source = checkpoint
            return _announce(predictor, "onnxruntime", "ONNX export for this run only")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        note = "onnxruntime is not installed; running PyTorch (pip install onnxruntime for the faster engine)"
        return _torch(checkpoint, str(target), note)
    try:
        predictor = OnnxPredictor(cached_onnx(checkpoint))
    except OSError as e:
        note = (
            f"cannot write the ONNX export cache beside {checkpoint} ({e.strerror or e}); "
            "running PyTorch (--engine onnxruntime exports for each run)"
        )
        return _torch(checkpoint, str(target), note)
    except UserError as e:  # a checkpoint that cannot be read fails again, as itself, in PyTorch
        return _torch(checkpoint, str(target), f"no ONNX Runtime engine for {checkpoint} ({e}); running PyTorch")
    return _announce(predictor, "onnxruntime", "cached ONNX export", checkpoint)


def _torch(checkpoint: Path, device: str, note: str | None = None) -> Predictor:
    """The PyTorch engine; `note` (why `auto` did not pick ONNX Runtime) is printed once it loaded."""
    predictor = TorchPredictor(checkpoint, device)
    if note:
        print(f"note: {note}")
    return _announce(predictor, "torch", f"{predictor.device}, " + ", ".join(predictor.optimizations or ["as is"]))


def _announce(predictor: Predictor, engine: str, how: str, cached_from: Path | None = None) -> Predictor:
    """Print which engine runs (and the cache file it runs from); record it in `info`
    (with a cache, also the checkpoint it was exported from: what the user named)."""
    source = f" from {predictor.source}" if cached_from is not None else ""
    print(f"engine: {engine} ({how}{source})")
    predictor.info = {**predictor.info, "engine": engine}
    if cached_from is not None:
        predictor.info["checkpoint"] = str(cached_from)

    return predictor

"""Loading PyTorch files safely: `torch.load(weights_only=True)` only, and a file holding
pickled Python objects is refused (never loaded: loading it could run code) with a
message that says so, distinct from a truncated or corrupt file.

Used for checkpoints (`urbanseg.checkpoint`) and encoder weights files
(`urbanseg.models.load_encoder_weights`).
"""

from __future__ import annotations

import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from urbanseg.errors import UserError

# Globals of plain data in a protocol-2 pickle (bytes and sets), not worth naming in an error.
_PLAIN_GLOBALS = {f"{m}.{n}" for m in ("builtins", "__builtin__") for n in ("set", "frozenset", "bytes", "bytearray")}
_PLAIN_GLOBALS.add("_codecs.encode")


def torch_load(
    path: Path | str,
    map_location: Any = "cpu",
    *,
    what: str = "checkpoint",
    fix: str = "use another checkpoint (best.pt or last.pt of the run) or train again",
) -> Any:
    """`torch.load(path, weights_only=True)`; any failure -> UserError naming `what`,
    `path` and `fix`. A well-formed pickle that PyTorch's weights-only unpickler rejects
    holds Python objects: that is "refused", never "corrupt", and PyTorch's advice to load
    with `weights_only=False` (which would run the payload) is never quoted."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the error below says more
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip, pickle, EOF and weights-only errors
        names = _pickled_globals(Path(path)) if isinstance(e, pickle.UnpicklingError) else None
        if names is None:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            detail = "damaged pickle data" if "weights_only" in str(e) else f"{type(e).__name__}: {first}"
            raise UserError(
                f"{what} {path} cannot be read ({detail}); it is truncated, corrupt or not a PyTorch file: {fix}"
            ) from None
        foreign = [
            n for n in dict.fromkeys(names) if not n.startswith(("torch.", "collections.")) and n not in _PLAIN_GLOBALS
        ][:3]
        shown = f" ({', '.join(foreign)})" if foreign else ""
        raise UserError(
            f"{what} {path} refused: not a plain {what} (it contains pickled Python objects{shown}, "
            f"which urbanseg never loads because loading them can run code); {fix}"
        ) from None


def _pickled_globals(path: Path) -> list[str] | None:
    """The "module.name" globals the pickle stream of a torch file refers to, read with
    `pickletools.genops` (which parses opcodes and runs nothing); None when the file holds
    no complete pickle stream (truncated, corrupt or foreign)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
        else:
            data = path.read_bytes()
        names: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
        return names
    except Exception:
        return None

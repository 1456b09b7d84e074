"""Typed reading of urbanseg's on-disk formats (manifest.json, spec.json, checkpoints, ONNX
metadata, config.yaml): a cursor over a parsed JSON/YAML/torch value that turns any wrong
shape or value into one `FormatError` naming the file, the field and the fix, and the one
rule for format versions.

    doc = Node.root(json.loads(text), file=path, fix="re-run `urbanseg pack`")
    check_version(doc, SUPPORTED, "shard spec")     # newer -> "upgrade urbanseg"
    width = doc["width"].integer(min=1)
    # -> "shards/train/spec.json: `width` is "big" (a string), expected an integer >= 1; re-run `urbanseg pack`"
    shards = [n["records"].integer(min=0) for n in doc["shards"].items()]

Only the standard library is imported: the ONNX predictor reads its metadata without PyTorch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from urbanseg import __version__
from urbanseg.errors import UserError

T = TypeVar("T")
_ABSENT: Any = type("_Absent", (), {"__repr__": lambda self: "<absent>"})()
_KINDS = {
    dict: "an object",
    list: "a list",
    tuple: "a list",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


class FormatError(UserError):
    """A file of a urbanseg format whose content has the wrong shape or value."""


def describe(value: Any) -> str:
    """A short rendering of a value found in a file, with its kind: `"big" (a string)`."""
    if value is _ABSENT:
        return "missing"
    if value is None:
        return "null"
    kind = next((name for t, name in _KINDS.items() if type(value) is t), f"a {type(value).__name__}")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return f"{text[:60] + ' ...' if len(text) > 60 else text} ({kind})"


@dataclass(frozen=True)
class Node:
    """One value of a parsed file and where it is (`path`, e.g. "splits.train.count").

    Every accessor returns a plain Python value of the asked type or raises FormatError;
    `node["key"]` of an absent key is a Node whose accessors say "is missing"."""

    value: Any
    file: str
    fix: str
    path: str = ""

    @classmethod
    def root(cls, value: Any, *, file: Path | str, fix: str) -> Node:
        return cls(value, str(file), fix)

    # ------------------------------------------------------------------ errors

    def error(self, expected: str) -> FormatError:
        """`<file>: `<path>` is <what was found>, expected <expected>; <fix>`."""
        found = "is missing" if self.value is _ABSENT else f"is {describe(self.value)}"
        where = f"`{self.path}` {found}" if self.path else f"the file holds {describe(self.value)}"
        return FormatError(f"{self.file}: {where}, expected {expected}; {self.fix}")

    def invalid(self, problem: str) -> FormatError:
        """`<file>: `<path>` <problem>; <fix>` for a value that is well-typed but wrong."""
        return FormatError(f"{self.file}: `{self.path or '(top level)'}` {problem}; {self.fix}")

    # ------------------------------------------------------------------ structure

    @property
    def present(self) -> bool:
        return self.value is not _ABSENT

    def optional(self) -> Node | None:
        """None for an absent key or a null value, else this node."""
        return None if self.value is _ABSENT or self.value is None else self

    def maybe(self, read: Callable[[Node], T]) -> T | None:
        """`read(self)` (e.g. `Node.text`), or None for an absent key or a null value."""
        return None if self.optional() is None else read(self)

    def obj(self) -> dict[str, Any]:
        if not isinstance(self.value, dict):
            raise self.error("an object {...}")
        return self.value

    def __getitem__(self, key: str) -> Node:
        value = self.obj().get(key, _ABSENT)
        return Node(value, self.file, self.fix, f"{self.path}.{key}" if self.path else key)

    def members(self) -> dict[str, Node]:
        """The members of an object whose keys are names (e.g. split names)."""
        return {str(k): self[str(k)] for k in self.obj()}

    def items(self, *, length: int | None = None) -> list[Node]:
        if not isinstance(self.value, (list, tuple)) or (length is not None and len(self.value) != length):
            raise self.error("a list" + (f" of {length} items" if length is not None else ""))
        return [Node(v, self.file, self.fix, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    # ------------------------------------------------------------------ scalars

    def integer(self, *, min: int | None = None, max: int | None = None) -> int:
        ok = (
            isinstance(self.value, int)
            and not isinstance(self.value, bool)
            and (min is None or self.value >= min)
            and (max is None or self.value <= max)
        )
        if not ok:
            raise self.error("an integer" + _bounds(min, max))
        return int(self.value)

    def number(self, *, positive: bool = False) -> float:
        ok = (
            isinstance(self.value, (int, float))
            and not isinstance(self.value, bool)
            and math.isfinite(self.value)
            and (not positive or self.value > 0)
        )
        if not ok:
            raise self.error("a positive number" if positive else "a finite number")
        return float(self.value)

    def text(self, *, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(self.value, str) or not self.value or (choices and self.value not in choices):
            raise self.error(f"one of {', '.join(choices)}" if choices else "a non-empty string")
        return self.value

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.error("true or false")
        return self.value

    def ints(self, *, length: int | None = None, min: int | None = None, max: int | None = None) -> list[int]:
        return [n.integer(min=min, max=max) for n in self.items(length=length)]

    def texts(self) -> list[str]:
        return [n.text() for n in self.items()]

    def file_name(self) -> str:
        """A plain file name (no folder part): what a format lists beside itself."""
        name = self.text()
        if name in (".", "..") or "/" in name or "\\" in name:
            raise self.error("a file name without a folder")
        return name


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in {low}..{high}"
    return f" >= {low}" if low is not None else f" <= {high}" if high is not None else ""


def check_version(doc: Node, supported: int, what: str) -> int:
    """The one format-version rule of every urbanseg format: `format_version` must be an
    integer >= 1; one newer than `supported` was written by a newer urbanseg, whose
    format this one cannot know: "upgrade urbanseg". Returns the version."""
    version = doc["format_version"].integer(min=1)
    if version > supported:
        writer = doc["urbanseg_version"].value if doc["urbanseg_version"].present else "a newer version"
        raise FormatError(
            f"{doc.file} has {what} format {version}, written by urbanseg {writer}; this urbanseg "
            f"({__version__}) reads format {supported} at most: upgrade urbanseg"
        )
    return version


def load_json(path: Path, *, what: str, fix: str, missing: str) -> Node:
    """The root Node of a JSON file; FormatError for a missing, unreadable or invalid file
    (`missing` is the whole message for a file that does not exist)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(missing) from None
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} cannot be read as {what} ({type(e).__name__}: {e}); {fix}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path} is not a valid {what}: not JSON ({e}); {fix}") from None
    return Node.root(value, file=path, fix=fix)

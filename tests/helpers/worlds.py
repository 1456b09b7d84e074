"""The shared worlds the session fixtures of `tests/conftest.py` build once, and the rule
that keeps them shared: tests read them and never write into them.

`ReadOnlyWorlds` records a snapshot of each protected folder (every path with its size,
mode, mtime and ctime: a write changes the ctime even when it restores the mtime) and
reports what changed since; `writable_copy` gives a test its own copy to change.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from helpers.cityscapes import write_raw_cityscapes
from helpers.training import make_shards

Snapshot = dict[str, tuple[int, ...]]
RAW_CITYSCAPES_SIZE = (64, 32)


@dataclass(frozen=True)
class SynthData:
    """`urbanseg synth` scenes (128x64) -> `prepare` (categories8, 64x32) -> `pack` (2 shards)."""

    root: Path
    raw: Path
    prepared: Path
    shards: Path


def build_synth_data(root: Path, *, train: int, val: int) -> SynthData:
    shards = make_shards(root, train=train, val=val)
    return SynthData(root=root, raw=root / "raw", prepared=root / "prepared-categories8", shards=shards)


def build_raw_cityscapes(root: Path) -> Path:
    """Raw Cityscapes-layout scenes at 64x32 annotated by the official renderer: 4 train,
    2 val and 2 void-only test scenes."""
    write_raw_cityscapes(root, {"train": 4, "val": 2, "test": 2}, size=RAW_CITYSCAPES_SIZE, seed=1)
    return root


def snapshot(root: Path) -> Snapshot:
    """{relative path: (size, mode, mtime_ns, ctime_ns)} of everything under `root`, itself included."""
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns)
    return out


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """What changed from `before` to `after`, one line per path: added, removed or changed."""
    lines = [f"added {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    lines += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return lines


class ReadOnlyWorlds:
    """The folders tests share; `changes()` lists what was written into them since the
    last call (each change is reported once, by the test that made it)."""

    def __init__(self) -> None:
        self.snapshots: dict[str, tuple[Path, Snapshot]] = {}

    def protect(self, name: str, root: Path) -> None:
        self.snapshots[name] = (root, snapshot(root))

    def changes(self) -> list[str]:
        out = []
        for name, (root, before) in self.snapshots.items():
            after = snapshot(root) if root.exists() else {}
            if after != before:
                out += [f"{name} ({root}): {line}" for line in differences(before, after)]
                self.snapshots[name] = (root, after)
        return out


def writable_copy(source: Path, destination: Path) -> Path:
    """A private copy of a shared folder (or file) a test may change; returns `destination`."""
    if source.is_dir():
        return Path(shutil.copytree(source, destination, symlinks=True))
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(source, destination))

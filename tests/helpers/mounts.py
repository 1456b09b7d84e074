"""Read-only folders and full disks for the write-error tests: a read-only bind mount of a
folder onto itself, and a small tmpfs (root only; skipped otherwise, with the reason)."""

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


def _mount(args: list[str], reason: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{reason} needs root to mount a file system (and root's writes ignore chmod)")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"{reason}: mount failed ({result.stderr.strip()})")


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only in place (a read-only bind mount of itself)."""
    _mount(["--bind", str(folder), str(folder)], "a read-only folder")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` mounted on `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], "a full disk")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(disk: Path) -> None:
    """Write into `disk` until it is full."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(chunk))
    finally:
        os.close(fd)

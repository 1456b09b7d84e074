"""The read-only rule of the shared fixture worlds (tests/conftest.py) can fail: every kind
of write into a protected folder is reported once, naming the path; reads are not."""

from __future__ import annotations

import os
import shutil
import time

from helpers.worlds import ReadOnlyWorlds, writable_copy


def _world(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.png").write_bytes(b"png")
    (root / "y.json").write_text("{}")
    return root


def test_every_kind_of_write_is_named_once_and_reads_are_not(tmp_path):
    root = _world(tmp_path / "world")
    worlds = ReadOnlyWorlds()
    worlds.protect("w", root)
    time.sleep(0.05)  # file times move in kernel ticks: writes below land in a later one
    (root / "y.json").read_text()
    shutil.copytree(root, tmp_path / "copy")
    assert worlds.changes() == []

    (root / "a" / "new.txt").write_text("")
    assert worlds.changes() == [f"w ({root}): added a/new.txt", f"w ({root}): changed a"]
    assert worlds.changes() == []  # reported once, by the test that wrote

    st = (root / "y.json").stat()
    (root / "y.json").write_text("[]")  # same size, mtime put back: the ctime still moves
    os.utime(root / "y.json", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert worlds.changes() == [f"w ({root}): changed y.json"]

    shutil.rmtree(root / "a" / "b")
    assert worlds.changes() == [f"w ({root}): removed a/b", f"w ({root}): removed a/b/x.png", f"w ({root}): changed a"]


def test_writable_copy_is_private(tmp_path):
    root = _world(tmp_path / "world")
    worlds = ReadOnlyWorlds()
    worlds.protect("w", root)
    copy = writable_copy(root, tmp_path / "mine")
    (copy / "a" / "b" / "x.png").write_bytes(b"changed")
    one = writable_copy(root / "y.json", tmp_path / "f" / "y.json")
    one.write_text("[1]")
    assert worlds.changes() == [] and (root / "a" / "b" / "x.png").read_bytes() == b"png"

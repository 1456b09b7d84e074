"""Output folders: which ones a command may write into, and one run at a time in each.

Every command that writes a folder (synth, prepare, pack, train, evaluate, predict,
demo) goes through `claim`, so the rules are the same everywhere:

- **Ownership.** The folder must be new, empty, or carry urbanseg's marker
  ``.urbanseg.json`` naming the same command; folders made before the marker existed
  are recognised by that command's own files (`LEGACY_PROOFS`). Anything else is
  refused with a UserError before anything in it is touched: urbanseg replaces only
  what it can prove it wrote.
- **One run at a time.** ``.urbanseg.lock`` inside the folder is locked exclusively
  (`fcntl.flock`, non-blocking) while the command runs; a second one stops at once,
  naming the first one's PID. The OS releases the lock when the holder's process ends,
  however it ends: a SIGKILL never leaves a stale lock (the file stays; unlocked, it
  means nobody writes). Forked children close their copy, so a lingering worker never
  keeps it; worker pools end with their parent (`urbanseg.util.exit_with_parent`).
- **Writable, checked first.** A small file is written and removed before the command's
  long work, so a read-only folder or a full disk shows at once, not after an hour.
- **No trace of a failed start.** When the command fails before writing anything into a
  folder its claim created, the claim removes that folder again (its marker and lock are
  all it holds), so fixing the input and rerunning meets a clean slate.

A command that writes one file (`export`) uses `check_file`. An OSError raised inside
`claim` that names no file is made to name the folder; `urbanseg.cli` turns write
errors into exit 2 with the path and the reason in words.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from urbanseg import __version__
from urbanseg.errors import UserError
from urbanseg.util import atomic_write_text, name_the_file

MARKER = ".urbanseg.json"
LOCK = ".urbanseg.lock"
_SHOW = 4  # names of a foreign folder's entries quoted in the refusal

T = TypeVar("T")

# Lock descriptors this process holds. A forked child (a worker pool, DataLoader workers)
# closes its copies: a flock belongs to the open file, and a child outliving its parent
# or its pool would otherwise keep the folder locked.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- ownership


def _json_with(name: str, keys: set[str]) -> Callable[[Path], bool]:
    def proof(folder: Path) -> bool:
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and keys <= data.keys()

    return proof


def _yaml_with(name: str, keys: set[str]) -> Callable[[Path], bool]:
    def proof(folder: Path) -> bool:
        import yaml

        try:
            data = yaml.safe_load((folder / name).read_text())
        except (OSError, ValueError, yaml.YAMLError):
            return False
        return isinstance(data, dict) and keys <= data.keys()

    return proof


_pack_split = _json_with("spec.json", {"format_version", "shards", "split"})


def _pack_folder(folder: Path) -> bool:
    """A packed split (spec.json), or a folder of them."""
    return _pack_split(folder) or any(_pack_split(p) for p in folder.iterdir() if p.is_dir())


def _in_run_predict(folder: Path) -> bool:
    """`predict`'s default place, RUN/predict/NAME, inside a training run's folder."""
    run = folder.parent.parent
    return folder.parent.name == "predict" and LEGACY_PROOFS["train"](run)


# What proves that a release before the marker wrote a folder: its command's own files,
# checked for content so that a user's unrelated config.yaml or spec.json proves nothing.
LEGACY_PROOFS: dict[str, Callable[[Path], bool]] = {
    "synth": _yaml_with("synth_config.yaml", {"seed", "size", "out"}),
    "prepare": _json_with(".urbanseg-prepare.json", {"data", "size", "label_set"}),
    "pack": _pack_folder,
    "train": _yaml_with("config.yaml", {"data", "run", "model", "lr"}),
    "evaluate": _json_with("metrics.json", {"format_version", "protocol", "confusion_matrix"}),
    "predict": _in_run_predict,
    "demo": lambda folder: (folder / ".urbanseg-demo").is_file(),
}


def read_marker(folder: Path) -> str | None:
    """The command named by `folder`'s marker, or None if it has none."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["command"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is damaged ({type(e).__name__}: {e}); if the folder is urbanseg's output, "
            "delete the folder, else choose another one"
        ) from None


def write_marker(folder: Path, command: str) -> None:
    """Mark `folder` as written by `urbanseg <command>` (kept as it is if already so)."""
    if read_marker(folder) != command:
        doc = {"command": command, "urbanseg_version": __version__, "created": _now()}
        atomic_write_text(Path(folder) / MARKER, json.dumps(doc) + "\n")


def _contents(folder: Path) -> list[str]:
    """Names in `folder` besides the lock file ([] for a missing folder)."""
    if not folder.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name != LOCK)


def is_owned(folder: Path, command: str) -> bool:
    """Whether `folder` holds output of `urbanseg <command>`: its marker, or for folders
    older than the marker that command's own files."""
    marker = read_marker(folder)
    return marker == command if marker is not None else LEGACY_PROOFS[command](folder)


def _check_parents(path: Path, what: str) -> None:
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{what} {path} cannot be made: {blocking} is a file, not a folder; give another path")


def check_owner(folder: Path | str, command: str, what: str = "--out") -> None:
    """UserError unless `urbanseg <command>` may write into `folder`: new, empty, or its
    own output (`is_owned`). `what` names the folder in the message (a flag or a word)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} is a file; give a folder")
    _check_parents(folder, what)
    found = _contents(folder)
    if not found or is_owned(folder, command):
        return
    marker = read_marker(folder)
    whose = f"it holds the output of `urbanseg {marker}`" if marker else f"it has no {MARKER}"
    shown = ", ".join(found[:_SHOW]) + (", ..." if len(found) > _SHOW else "")
    raise UserError(
        f"{what} {folder} is not empty and was not written by `urbanseg {command}` ({whose}; found "
        f"{shown}); urbanseg replaces only what it wrote: choose a new or empty folder"
    )


def check_file(path: Path | str, command: str, is_ours: Callable[[Path], bool], what: str = "--out") -> None:
    """The same rule for a command that writes one file: an existing `path` may be
    replaced only if `is_ours(path)` proves that `urbanseg <command>` wrote it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    _check_parents(path, what)
    if path.exists() and not is_ours(path):
        raise UserError(
            f"{what} {path} exists and was not written by `urbanseg {command}`; urbanseg replaces "
            "only what it wrote: give another file name or move that file away"
        )


# --------------------------------------------------------------------------- the lock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0))
        return f"`urbanseg {info['command']}` (PID {info['pid']}) since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is still writing its details
        return "another urbanseg process"


def _in_use(folder: Path, fd: int) -> UserError:
    return UserError(f"{folder} is in use by {_holder(fd)}; wait for it to finish or choose another folder")


# File systems without flock support (some FUSE and network mounts): run unlocked, with a warning.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def _flock(fd: int, folder: Path) -> None:
    """Lock `fd` exclusively; UserError naming the holder if another process has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder, fd) from None
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
        print(
            f"urbanseg: warning: cannot lock {folder / LOCK} ({os.strerror(e.errno)}): make sure no other "
            "urbanseg command writes into this folder meanwhile",
            file=sys.stderr,
        )


def _lock(folder: Path, command: str) -> int:
    """An open descriptor of folder/LOCK holding its lock, with this process's details
    written in it."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        _flock(fd, folder)
        details = {"pid": os.getpid(), "command": command, "argv": sys.argv, "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(details) + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    _HELD.add(fd)
    return fd


def _refuse_if_in_use(folder: Path) -> None:
    """UserError naming the holder if another process holds `folder`'s lock (else nothing)."""
    if not (folder / LOCK).is_file():
        return
    fd = os.open(folder / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder, fd) from None
    except OSError:
        return  # a file system without locks: the check's own message stands
    finally:
        os.close(fd)  # releases the lock if it was taken here


def _first_missing(folder: Path) -> Path | None:
    """The topmost folder on `folder`'s path that does not exist yet (None if it exists)."""
    if folder.exists():
        return None
    top = folder
    while not top.parent.exists():
        top = top.parent
    return top


def _remove_if_untouched(folder: Path, top: Path | None) -> None:
    """After a failure: remove `folder` and its new parents up to `top` (the ones this
    claim created) if nothing but the marker and the lock was written into them."""
    if top is None or _contents(folder) not in ([], [MARKER]):
        return
    for name in (MARKER, LOCK):
        (folder / name).unlink(missing_ok=True)
    path = folder
    with contextlib.suppress(OSError):  # a folder something else wrote into stays
        while True:
            path.rmdir()
            if path == top:
                break
            path = path.parent


def make_folder(folder: Path, what: str = "--out") -> None:
    """mkdir -p, with a UserError where the system has no such place to make it (a path
    under /proc, or a parent replaced by a file meanwhile); other OSErrors (read-only,
    no permission, disk full) are named by `urbanseg.cli`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UserError(
            f"{what} {folder} cannot be made ({e.strerror}: {e.filename}); choose a folder on a writable file system"
        ) from None


def _probe(folder: Path) -> None:
    """Write and remove a small file: a read-only folder or a full disk shows now."""
    fd, path = tempfile.mkstemp(prefix=".urbanseg-probe.", dir=folder)
    try:
        os.write(fd, bytes(4096))
    finally:
        os.close(fd)
        os.unlink(path)


@contextlib.contextmanager
def claim(
    folder: Path | str, command: str, *, what: str = "--out", check: Callable[[], T] | None = None, enabled: bool = True
) -> Iterator[T | None]:
    """Hold `folder` for `urbanseg <command>`: refuse a folder it may not write
    (`check_owner`), create it, take its lock (UserError naming the holder), check
    again under the lock (another run may have written in between) together with the
    command's own `check` (read-only; its result is yielded), mark the folder, probe
    that it is writable. The lock is released when the block ends.

    `enabled=False` (torchrun processes other than rank 0, which write nothing) does
    nothing and yields None."""
    if not enabled:
        yield None
        return
    folder = Path(folder)
    check_owner(folder, command, what)
    if check:
        try:
            check()
        except UserError:
            _refuse_if_in_use(folder)  # what the check saw may be a run in progress
            raise
    fd, created = -1, _first_missing(folder)
    try:
        make_folder(folder, what)
        fd = _lock(folder, command)
        check_owner(folder, command, what)
        result = check() if check else None
        write_marker(folder, command)
        _probe(folder)
        yield result
    except BaseException as e:
        if fd >= 0:
            _remove_if_untouched(folder, created)
        if isinstance(e, OSError):
            name_the_file(e, folder)
        raise
    finally:
        if fd >= 0:
            _HELD.discard(fd)
            os.close(fd)  # releases the lock

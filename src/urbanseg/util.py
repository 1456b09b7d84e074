"""Small shared helpers: atomic file writes, a parallel map with a progress bar."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_TMP = ".tmp"  # temporary files are named .<name>.<pid>-<random>.tmp<suffix>


def temporary_glob(name: str = "*") -> str:
    """The glob pattern of the temporary files `atomic_path` makes for a file called
    `name` ("*": any file), e.g. to remove those a killed process left behind."""
    return f".{name}.*{_TMP}*"


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block
    succeeds, so an interrupted or failed write never leaves a half-written file and
    any previous file at `path` stays intact. An OSError that names no file (a failed
    write() on a full disk) is made to name `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=_TMP + path.suffix, dir=path.parent)
    except OSError as e:  # (read-only, full): name the file the user asked for, not a random temporary
        e.filename = str(path)
        raise
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            name_the_file(e, path)
        raise


def remove_dead_temporaries(path: Path | str) -> None:
    """Remove the temporary files of `path` (`atomic_path`'s) whose writer is no longer
    running: a SIGKILL mid-write leaves one, which nothing else removes where no folder
    lock guards the writes (an ONNX export beside its checkpoint). A writer's PID is in the
    name; a live one's file is left alone (PIDs of this machine: a file another machine is
    writing on a shared folder could be taken for dead)."""
    path = Path(path)
    for tmp in path.parent.glob(temporary_glob(path.name)):
        pid = tmp.name[len(path.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def name_the_file(error: OSError, path: Path | str) -> None:
    """Make `error` name `path` if it names no file (errors of write() and close() do
    not), so that the message can say where a write failed."""
    if error.filename is None and error.errno is not None:
        error.filename = str(path)


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_if_changed(path: Path | str, data: bytes | str) -> bool:
    """Write `data` atomically unless `path` already holds exactly it; an identical file
    is left untouched, so its mtime keeps telling when the content last changed (and
    `prepare` keeps seeing the synthetic scenes it made as up to date). Returns whether
    it wrote."""
    path = Path(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def progress_map(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int = 1, desc: str = "", total: int | None = None
) -> list[R]:
    """`[fn(x) for x in items]` with a tqdm progress bar, in `workers` processes when
    workers > 1 (fn and items must then be picklable). Results keep the input order."""
    from tqdm import tqdm

    items = list(items)
    total = len(items) if total is None else total
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in tqdm(items, desc=desc, total=total, unit="img", dynamic_ncols=True)]
    with ProcessPoolExecutor(max_workers=workers, initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        results = pool.map(fn, items, chunksize=1)
        return list(tqdm(results, desc=desc, total=total, unit="img", dynamic_ncols=True))


def exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """Pool initializer: end this worker process once `parent` is gone.

    A worker waits on the pool's task queue, which the parent feeds; when the parent is
    killed (SIGKILL, OOM killer) nothing wakes it, and it would live on forever holding
    the output folder's lock. A daemon thread watching the parent PID is portable and
    has no pitfalls of Linux's PR_SET_PDEATHSIG (which fires when the *thread* that
    forked the worker ends, not the process); it notices within `interval` seconds."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)  # no cleanup: the parent that would collect the results is gone

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1

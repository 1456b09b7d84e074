"""Small shared helpers: atomic file writes, PNG I/O, a parallel map with a progress bar."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block
    succeeds, so an interrupted or failed write never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(fn, items, chunksize=1)
        return list(tqdm(results, desc=desc, total=total, unit="img", dynamic_ncols=True))


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1

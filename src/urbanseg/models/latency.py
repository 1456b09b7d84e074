"""CPU latency of models, each in its own process, timed round-robin: the harness behind
`urbanseg models --measure` and benchmarks/bench_models.py (one implementation for both).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch

from urbanseg.models.registry import create_model


def measure_latency(
    names: Iterable[str],
    size: tuple[int, int],
    *,
    repeats: int = 5,
    warmup: int = 1,
    threads: int = 1,
    desc: str = "latency",
) -> dict[str, float]:
    """Median CPU latency in ms of a batch-1 forward pass at size (W, H) per model, with
    `threads` intra-op threads (1 by default: on a shared machine, multi-threaded
    small models spend most of their time waiting at thread barriers for a core).

    Each model lives in its own process (no model's memory or thread state can affect
    another's timing), and the models are timed round-robin, one pass each per round,
    so a slow spell on a shared machine hits them all alike and their ratios stay fair."""

    from tqdm import tqdm

    names = list(names)
    ctx = multiprocessing.get_context("spawn")
    workers: dict[str, tuple[Any, Any]] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for n in names:
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_latency_worker, args=(n, size, threads, child), daemon=True)
            proc.start()
            workers[n] = (proc, conn)
            _receive(conn, n, size)  # started one after another: imports are heavy on a small machine
        with tqdm(total=(warmup + repeats) * len(names), desc=desc, dynamic_ncols=True) as bar:
            for r in range(warmup + repeats):
                for n in names:
                    workers[n][1].send(True)
                    ms = _receive(workers[n][1], n, size)
                    if r >= warmup:
                        times[n].append(ms)
                    bar.update()
    finally:
        for proc, conn in workers.values():
            with contextlib.suppress(OSError):
                conn.send(False)
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    return {n: statistics.median(t) for n, t in times.items()}


def _receive(conn: Any, name: str, size: tuple[int, int]) -> Any:
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(f"the latency worker for {name} at {size} died (out of memory?)") from None


def _latency_worker(name: str, size: tuple[int, int], threads: int, conn: Any) -> None:
    """Build `name`, then time one forward pass per request until told to stop."""
    torch.set_num_threads(threads)
    model = create_model(name, 8).eval()
    x = torch.randint(0, 256, (1, 3, size[1], size[0]), dtype=torch.uint8).float()
    conn.send(None)  # ready
    with torch.inference_mode():
        while conn.recv():
            start = time.perf_counter()
            model(x)
            conn.send((time.perf_counter() - start) * 1000)

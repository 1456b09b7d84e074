"""Side-by-side timing for the benchmarks."""

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def rotated(
    runs: Sequence[Callable[[], Any]], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    """Median ms of each callable in `runs`, timed in turn for `repeats` rounds (one warm-up
    each; a change of load hits them alike), each after a short pause: ONNX Runtime's
    intra-op threads spin for a while after a run, and a session timed right after another
    one's shares the cores with that spinning (up to 1.6x slower, docs/benchmarks.md)."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for k, run in enumerate(runs):
            time.sleep(0.2)
            start = clock()
            run()
            times[k].append((clock() - start) * 1000.0)
    return [statistics.median(t) for t in times]

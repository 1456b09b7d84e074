"""Micro-batching for `urbanseg serve`: one worker thread owns the model and runs the
queued requests through it a few at a time.

- Requests wait in a bounded queue; a full queue refuses at once (`QueueFull`, which the
  service answers with 503 and Retry-After) instead of growing a backlog.
- The worker takes the oldest request and the queued requests that may share its forward
  pass (equal `key`), up to `max_batch` and while their `cost`s (the service: pixels)
  stay within `max_cost`: a batch of large pictures at their own resolution held the
  memory of all of them at once. A request is never refused for its cost alone. It waits
  up to `wait` seconds for the batch to fill only when others were queued behind the
  first request: a lone client never waits.
- A request whose future was cancelled (its client went away or timed out) is skipped.
- A batch that raises is run again one request at a time, so one bad request fails alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

# run(key, payloads) -> one result per payload, in order
RunFn = Callable[[Any, list[Any]], list[Any]]


class QueueFull(Exception):
    """The queue holds `max_queue` requests; retry after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"{depth} requests are already waiting for the model")
        self.retry_after = retry_after


@dataclass
class Job:
    key: Hashable
    payload: Any
    cost: float = 0.0
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """A worker thread that calls `run(key, payloads)` on batches of submitted payloads.

    `on_batch(size, seconds)` is called after each batch (for metrics)."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch: int = 4,
        max_cost: float = float("inf"),
        wait: float = 0.005,
        max_queue: int = 32,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "urbanseg-model",
    ) -> None:
        self._run_fn = run
        self.max_batch = max_batch
        self.max_cost = max_cost
        self.wait = wait
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._batch_seconds = 0.1  # running mean, for Retry-After
        self.skipped = 0  # cancelled before they ran
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken by the worker)."""
        return len(self._queue)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread.is_alive()

    def submit(self, key: Hashable, payload: Any, cost: float = 0.0) -> Future:
        """Queue one payload; its Future gets the result or the exception. QueueFull when full."""
        job = Job(key, payload, cost)
        with self._cond:
            if self._closed:
                raise RuntimeError("the model worker has stopped")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), self.retry_after())
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def retry_after(self) -> int:
        """Whole seconds until the queue has likely drained (its batches at the recent pace)."""
        batches = -(-len(self._queue) // self.max_batch)
        return max(1, round(batches * self._batch_seconds + 0.5))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the batch it is running; cancel what is still queued."""
        with self._cond:
            self._closed = True
            for job in self._queue:
                job.future.cancel()
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch:
                self._run(batch)
            elif self._closed:
                return

    def _take(self) -> list[Job]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            backlog = len(self._queue) > 1
            batch: list[Job] = []
            self._collect(batch)
            if backlog and batch and self.wait > 0:
                deadline = time.monotonic() + self.wait
                while len(batch) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    self._collect(batch)
            return batch

    def _collect(self, batch: list[Job]) -> None:
        """Move queued jobs that may join `batch` (same key, within max_batch and max_cost)
        into it, skipping cancelled ones."""
        rest: deque[Job] = deque()
        cost = sum(job.cost for job in batch)
        while self._queue:
            job = self._queue.popleft()
            full = len(batch) >= self.max_batch or (bool(batch) and cost + job.cost > self.max_cost)
            if full or (batch and job.key != batch[0].key):
                rest.append(job)
            elif job.future.set_running_or_notify_cancel():
                batch.append(job)
                cost += job.cost
            else:
                self.skipped += 1
        self._queue = rest

    def _run(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        try:
            results = self._run_fn(batch[0].key, [job.payload for job in batch])
            for job, result in zip(batch, results, strict=True):
                job.future.set_result(result)
        except Exception as e:
            if len(batch) == 1:
                batch[0].future.set_exception(e)
            else:  # find the bad request(s): the others still get their answer
                for job in (j for j in batch if not j.future.done()):
                    try:
                        job.future.set_result(self._run_fn(job.key, [job.payload])[0])
                    except Exception as one:
                        job.future.set_exception(one)
        seconds = time.perf_counter() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self._on_batch is not None:
            self._on_batch(len(batch), seconds)

"""What `urbanseg serve` tells Prometheus (`Metrics`), and the ASGI middleware that
counts every request, checks the bearer token and adds the security headers (`Guard`)."""

from __future__ import annotations

import hmac
import time
from collections import deque
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The page runs only its own script and style, talks only to this server, and cannot be framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


class Metrics:
    """Prometheus metrics of one app, in a registry of its own."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds
        self.requests = Counter("urbanseg_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.errors = Counter("urbanseg_errors", "requests refused or failed, by reason", ["reason"], registry=r)
        self.latency = Histogram(
            "urbanseg_request_seconds",
            "time from request to response",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.in_flight = Gauge("urbanseg_in_flight", "segment requests being received, queued or run", registry=r)
        self.queue = Gauge("urbanseg_queue_depth", "requests waiting for the model", registry=r)
        self.batch = Histogram(
            "urbanseg_batch_size", "requests per forward pass", buckets=range(1, max_batch + 1), registry=r
        )
        self.inference = Histogram("urbanseg_batch_seconds", "model time per batch", registry=r)
        self.recent: deque[float] = deque(maxlen=2048)
        r.register(self)  # collect() below: percentiles of the recent segment latencies

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch.observe(size)
        self.inference.observe(seconds)

    def collect(self) -> Any:
        g = GaugeMetricFamily(
            "urbanseg_segment_latency_seconds",
            "percentiles of the last 2048 POST /v1/segment latencies",
            labels=["quantile"],
        )
        if self.recent:
            for q, v in zip(("0.5", "0.95", "0.99"), np.percentile(np.array(self.recent), [50, 95, 99]), strict=True):
                g.add_metric([q], float(v))
        yield g


class Guard:
    """ASGI middleware around every request: the bearer token (401), security headers,
    and the request count/latency metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, token: str | None) -> None:
        self.app, self.metrics, self.token = app, metrics, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ("/", "/v1/segment", "/v1/model", "/healthz", "/metrics") else "other"
        status = 500
        start = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
            await send(message)

        if route == "/v1/segment":
            self.metrics.in_flight.inc()
        try:
            if (path.startswith("/v1/") or path == "/metrics") and not self._authorized(scope):
                self.metrics.errors.labels("unauthorized").inc()
                reply = JSONResponse(
                    {"error": "unauthorized", "detail": "send the server's token as `Authorization: Bearer TOKEN`"},
                    401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await reply(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            seconds = time.perf_counter() - start
            if route == "/v1/segment":
                self.metrics.in_flight.dec()
                self.metrics.recent.append(seconds)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)

    def _authorized(self, scope: Scope) -> bool:
        if self.token is None:
            return True
        sent = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(sent, b"Bearer " + self.token.encode())

"""`urbanseg serve`: one model behind an HTTP API and a page to try it, on uvicorn.

The app itself (routes, limits, metrics) is `urbanseg.inference.service`; the worker that
batches requests through the model is `urbanseg.inference.batching`; the page is
``static/``. This module loads the model, binds the socket and runs the server until
Ctrl+C.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from typing import Any

import uvicorn

from urbanseg.config import ServeConfig
from urbanseg.errors import UserError
from urbanseg.inference.engine import load_engine
from urbanseg.inference.predictor import Predictor
from urbanseg.inference.service import Limits, create_app
from urbanseg.rundir import resolve_checkpoint


def serve(config: ServeConfig) -> int:
    """Entry point of `urbanseg serve`: serve until interrupted, then return 0."""
    predictor = load_model(config)
    token = config.token or os.environ.get("URBANSEG_TOKEN") or None
    app = create_app(predictor, limits_from(config, token))
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(
        f"model: {predictor.info.get('checkpoint') or predictor.source} "
        f"({type(predictor).__name__}, {predictor.label_set.num_classes} classes "
        f"{predictor.label_set.name}, input {predictor.input_size[0]}x{predictor.input_size[1]})\n"
        f"serving on {url}/  (page: {url}/, API: POST {url}/v1/segment, metrics: {url}/metrics)"
        + (", bearer token required on /v1/* and /metrics" if token else ""),
        flush=True,
    )
    if not _loopback(config.host) and token is None:
        print(f"warning: listening on {config.host} without a token: anyone who reaches it can use the model")
    server = make_server(app, config.max_connections)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: uvicorn ends the requests in flight, then re-raises
        server.run(sockets=[sock])
    print("stopped")
    return 0


def make_server(app: Any, max_connections: int) -> uvicorn.Server:
    """uvicorn for the app: no access log (the metrics count requests), and at most
    `max_connections` open connections (uvicorn answers more with 503)."""
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", limit_concurrency=max_connections + 1
    )
    return uvicorn.Server(config)


def load_model(config: ServeConfig) -> Predictor:
    """The Predictor of --model, or of --checkpoint/--run with --engine, as `urbanseg predict` loads it."""
    checkpoint = None
    if config.model is None:
        from urbanseg.models.convert import resolve_model_checkpoint  # a pretrained source: its conversion

        checkpoint = resolve_checkpoint(config.run, resolve_model_checkpoint(config.checkpoint))
    return load_engine(checkpoint=checkpoint, model=config.model, engine=config.engine, device=config.device)


def limits_from(config: ServeConfig, token: str | None) -> Limits:
    return Limits(
        max_upload_bytes=int(config.max_upload_mb * 1_000_000),
        max_pixels=config.max_pixels,
        upload_timeout=config.upload_timeout,
        inference_timeout=config.inference_timeout,
        max_batch=config.max_batch,
        batch_wait=config.batch_wait_ms / 1000.0,
        max_queue=config.max_queue,
        tile_overlap=config.tile_overlap,
        alpha=config.alpha,
        token=token,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one). UserError when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=512)
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port (0 picks a free one) or --host"
        ) from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""The ASGI app of `urbanseg serve` (Starlette): its routes and the page. Uploads are read
by `urbanseg.inference.uploads`, requests counted and guarded by
`urbanseg.inference.metrics`, and batched through the model by `urbanseg.inference.batching`.

Routes: ``POST /v1/segment`` (an image -> label/colour/overlay PNG or JSON class shares),
``GET /v1/model``, ``GET /healthz``, ``GET /metrics`` (Prometheus text) and the page at
``/`` with its two static files. Every upload goes through the same checks, in this order:
bearer token (401), declared and counted size (413), upload stall (408), image header and
pixel count before decoding (400 / 413), decoding (400), the model queue (503 with
Retry-After when full) and the model (504 after the inference timeout). Requests carry
bytes, never file-system paths.

Starlette rather than FastAPI: six routes need no schema layer, and FastAPI's /docs page
loads Swagger UI from a CDN, which the offline, CSP-locked page must not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from urbanseg.config import parse_scales, parse_size
from urbanseg.errors import UserError
from urbanseg.imaging import decode_image, overlay
from urbanseg.inference.batching import MicroBatcher, QueueFull
from urbanseg.inference.engine import checkpoint_hash
from urbanseg.inference.metrics import Guard, Metrics
from urbanseg.inference.plan import Plan, label_maps
from urbanseg.inference.predictor import Predictor, TorchPredictor
from urbanseg.inference.segment import TTA
from urbanseg.inference.uploads import Problem, image_size, read_upload

log = logging.getLogger("urbanseg.serve")

OUTPUTS = ("label", "color", "overlay", "json")
PARAMS = {"output", "tile", "native", "tile_size", "tile_overlap", "alpha", "tta", "scales", "protocol"}
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the service (`ServeConfig` flags)."""

    max_upload_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    upload_timeout: float = 30.0
    inference_timeout: float = 120.0
    max_batch: int = 4
    batch_wait: float = 0.005
    max_queue: int = 32
    tile_overlap: float = 0.25
    alpha: float = 0.5
    token: str | None = None


def run_model(predictor: Predictor, images: list[np.ndarray], plan: Plan) -> list[np.ndarray]:
    """(H, W) uint8 class indices for each (H, W, 3) uint8 image, by the function
    `urbanseg predict` and `urbanseg evaluate` segment through
    (`urbanseg.inference.plan.label_maps`), so the service answers what predict writes.
    The requests of one batch share their plan; they run as one batch."""
    return label_maps(predictor, images, dataclasses.replace(plan, batch_size=max(1, len(images))))


# --------------------------------------------------------------------------- the app


def model_identity(predictor: Predictor) -> dict[str, Any]:
    """Who answers: architecture, file name (not its path), SHA-256 prefix, training step, engine."""
    source = Path(predictor.info.get("checkpoint") or predictor.source)  # not the engine's cached export
    model = predictor.info.get("model") or {}
    return {
        "name": model.get("name", source.stem),
        "file": source.name,
        "sha256": checkpoint_hash(source)[:16],
        "step": predictor.info.get("step"),
        "engine": predictor.info.get("engine")
        or (f"pytorch ({predictor.device})" if isinstance(predictor, TorchPredictor) else "onnxruntime"),
    }


def create_app(predictor: Predictor, limits: Limits) -> Starlette:
    """The service for one loaded model. Its worker thread starts here and stops with the app."""
    identity = model_identity(predictor)
    ls = predictor.label_set
    metrics = Metrics(limits.max_batch)
    batcher = MicroBatcher(
        lambda res, images: run_model(predictor, images, res),
        max_batch=limits.max_batch,
        max_cost=limits.max_pixels,  # a batch's pictures hold at most --max-pixels together
        wait=limits.batch_wait,
        max_queue=limits.max_queue,
        on_batch=metrics.on_batch,
    )
    metrics.queue.set_function(lambda: batcher.depth)
    description = {
        "model": identity,
        "label_set": ls.name,
        "classes": list(ls.classes),
        "palette": [list(c) for c in ls.palette],
        "input_size": list(predictor.input_size),
        "fixed_size": list(predictor.fixed_size) if predictor.fixed_size else None,
        "outputs": list(OUTPUTS),
        "limits": {
            "max_upload_bytes": limits.max_upload_bytes,
            "max_pixels": limits.max_pixels,
            "max_batch": limits.max_batch,
            "max_queue": limits.max_queue,
        },
    }
    page = {name: (resources.files("urbanseg.inference") / "static" / name).read_bytes() for name in STATIC}
    index = (resources.files("urbanseg.inference") / "static" / "index.html").read_bytes()

    # Decoding and encoding are CPU work: as many threads as cores, not one per request.
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="urbanseg-io")
    service = _Service(predictor, batcher, limits, identity, pool)

    async def segment_route(request: Request) -> Response:
        try:
            return await _segment(request, service)
        except Problem as p:
            metrics.errors.labels(p.reason).inc()
            return JSONResponse({"error": p.reason, "detail": p.detail}, p.status, headers=p.headers)

    async def model_route(request: Request) -> Response:
        return JSONResponse(description)

    async def health_route(request: Request) -> Response:
        alive = batcher.alive
        return JSONResponse(
            {"status": "ok" if alive else "worker stopped", "queue": batcher.depth}, 200 if alive else 503
        )

    async def metrics_route(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def index_route(request: Request) -> Response:
        return Response(index, media_type="text/html; charset=utf-8")

    async def static_route(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:  # a fixed set of names: nothing is looked up on disk
            return JSONResponse({"error": "not_found", "detail": f"no static file {name!r}"}, 404)
        return Response(page[name], media_type=STATIC[name])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        batcher.close()
        pool.shutdown(wait=False, cancel_futures=True)

    app = Starlette(
        routes=[
            Route("/", index_route),
            Route("/static/{name}", static_route),
            Route("/v1/segment", segment_route, methods=["POST"]),
            Route("/v1/model", model_route),
            Route("/healthz", health_route),
            Route("/metrics", metrics_route),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(Guard, metrics=metrics, token=limits.token)
    app.state.batcher = batcher
    return app


@dataclass(frozen=True)
class _Service:
    predictor: Predictor
    batcher: MicroBatcher
    limits: Limits
    identity: dict[str, Any]
    pool: ThreadPoolExecutor


async def _segment(request: Request, svc: _Service) -> Response:
    limits = svc.limits
    output, resolution, alpha = _options(request, limits, svc.predictor.info)
    if svc.batcher.depth >= limits.max_queue:  # refuse before reading and decoding the upload
        raise _queue_full(QueueFull(svc.batcher.depth, svc.batcher.retry_after()))
    data = await read_upload(request, limits.max_upload_bytes, limits.upload_timeout)
    loop = asyncio.get_running_loop()
    width, height = await loop.run_in_executor(svc.pool, image_size, data, limits.max_pixels)
    try:
        image = await loop.run_in_executor(svc.pool, decode_image, data, "the upload")
    except ValueError as e:
        raise Problem(400, "corrupt_image", str(e)) from None
    try:
        future = svc.batcher.submit(resolution, image, cost=width * height)
    except QueueFull as e:
        raise _queue_full(e) from None
    labels = await _wait(request, future, limits.inference_timeout)
    if output == "json":
        shares = class_shares(labels, svc.predictor)
        return JSONResponse(
            {"width": width, "height": height, "mode": resolution.mode, "classes": shares, "model": svc.identity}
        )
    png = await loop.run_in_executor(svc.pool, _render, svc.predictor, image, labels, output, alpha)
    return Response(png, media_type="image/png")


def _queue_full(e: QueueFull) -> Problem:
    return Problem(503, "queue_full", f"{e}; retry later", {"Retry-After": str(e.retry_after)})


def class_shares(labels: np.ndarray, predictor: Predictor) -> list[dict[str, Any]]:
    """Pixel count and share of each class of the model's label set in (H, W) class indices."""
    ls = predictor.label_set
    counts = np.bincount(labels.ravel(), minlength=ls.num_classes)[: ls.num_classes]
    return [
        {"index": i, "name": name, "color": list(rgb), "pixels": int(n), "share": int(n) / labels.size}
        for i, (name, rgb, n) in enumerate(zip(ls.classes, ls.palette, counts, strict=True))
    ]


def _options(request: Request, limits: Limits, info: dict[str, Any]) -> tuple[str, Plan, float]:
    """(output, plan, alpha) from the query; the plan as predict builds it from its flags
    (`Plan.from_config`: a pretrained model's recorded protocol unless tile=1, native=1
    or protocol=0)."""
    q = request.query_params
    unknown = sorted(set(q) - PARAMS)
    if unknown:
        raise Problem(400, "bad_parameter", f"unknown query parameter(s) {unknown}; known: {sorted(PARAMS)}")
    output = q.get("output", "label")
    if output not in OUTPUTS:
        raise Problem(400, "bad_parameter", f"output={output!r}: choose one of {', '.join(OUTPUTS)}")
    tile, native = _flag(q.get("tile"), "tile"), _flag(q.get("native"), "native")
    if tile and native:
        raise Problem(400, "bad_parameter", "tile=1 already runs at native resolution; drop native=1")
    if q.get("tile_size") and not tile:
        raise Problem(400, "bad_parameter", "tile_size needs tile=1")
    try:
        if q.get("tile_size"):
            parse_size(q["tile_size"], "tile_size")  # a bad size is the request's error (400), not the plan's
    except UserError as e:
        raise Problem(400, "bad_parameter", str(e)) from None
    overlap = _number(q.get("tile_overlap"), limits.tile_overlap, "tile_overlap", 0.0, 0.999)
    alpha = _number(q.get("alpha"), limits.alpha, "alpha", 0.0, 1.0)
    tta = _tta(q.get("tta", "none"), q.get("scales", "1"))
    flags = SimpleNamespace(
        tile=tile,
        native=native,
        tile_size=q.get("tile_size", ""),
        tile_overlap=overlap,
        protocol=_flag(q.get("protocol", "1"), "protocol"),
    )
    return output, dataclasses.replace(Plan.from_config(flags, info), tta=tta), alpha


def _tta(tta: str, scales: str) -> TTA:
    """Test-time augmentation from ?tta=none|flip and ?scales=S1,S2,... (as predict's flags)."""
    if tta not in ("none", "flip"):
        raise Problem(400, "bad_parameter", f"tta={tta!r}: choose none or flip")
    try:
        return TTA(parse_scales(scales, "scales"), flip=(tta == "flip"))
    except UserError as e:
        raise Problem(400, "bad_parameter", str(e)) from None


def _flag(value: str | None, name: str) -> bool:
    if value is None or value.lower() in ("0", "false", "no", ""):
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    raise Problem(400, "bad_parameter", f"{name}={value!r}: use {name}=1 or {name}=0")


def _number(value: str | None, default: float, name: str, low: float, high: float) -> float:
    if value is None:
        return default
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not low <= x <= high:
        raise Problem(400, "bad_parameter", f"{name}={value!r}: give a number in [{low}, {high}]")
    return x


async def _wait(request: Request, future: Any, timeout: float) -> np.ndarray:
    """The job's result; cancels the job when the client leaves (skipped if not yet run) or
    after `timeout` seconds (504)."""
    waiter = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({waiter, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiter in done:
        try:
            return waiter.result()
        except UserError as e:  # an option this model cannot run, e.g. native=1 on a fixed-size export
            raise Problem(400, "bad_option", str(e)) from None
        except Exception as e:
            log.exception("inference failed")
            raise Problem(
                500, "inference_failed", f"the model failed on this image ({type(e).__name__}: {e})"
            ) from None
    future.cancel()
    if gone in done:
        raise Problem(499, "client_closed", "the client closed the connection")
    raise Problem(504, "inference_timeout", f"no result within {timeout:g} s; the server is busy, retry later")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _render(predictor: Predictor, image: np.ndarray, labels: np.ndarray, output: str, alpha: float) -> bytes:
    """The PNG bytes of one output: label (uint8 class indices), color or overlay."""
    from PIL import Image

    if output == "label":
        array = labels
    else:
        color = predictor.label_set.colorize(labels)
        array = color if output == "color" else overlay(image, color, alpha)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()

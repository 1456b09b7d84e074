"""`urbanseg serve`: the API against `urbanseg predict`'s own files, every refused request
followed by a good one, the micro-batcher, the CLI, and the page in headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from helpers.browser import CHROMIUM, SKIP_REASON, DevTools
from helpers.checkpoints import make_checkpoint
from urbanseg.cli import main
from urbanseg.config import ServeConfig
from urbanseg.inference.batching import MicroBatcher, QueueFull
from urbanseg.inference.predictor import Predictor, TorchPredictor
from urbanseg.inference.serve import bind, load_model, make_server
from urbanseg.inference.service import Limits, create_app

TOKEN = "s3cret-token"


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random picture (a model's argmax varies across it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "best.pt")


@pytest.fixture(scope="module")
def predictor(ckpt):
    return TorchPredictor(ckpt, "cpu")


LIMITS = Limits(max_upload_bytes=300_000, max_pixels=200_000, upload_timeout=1.0, inference_timeout=30.0)


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, LIMITS)) as c:
        yield c


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One image per format predict reads, as predict would find them in a folder."""
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(scene(45, 70)).save(folder / "plain.png")
    Image.fromarray(scene(50, 100, 5)).save(folder / "photo.jpg", quality=90)
    Image.fromarray(scene(40, 60, 6)).save(folder / "web.webp", quality=80)
    cv2.imwrite(str(folder / "deep.tif"), scene(25, 26, 4)[..., 0].astype(np.uint16) * 257)
    Image.fromarray(np.dstack([scene(33, 50, 1), np.full((33, 50), 128, np.uint8)]), "RGBA").save(folder / "rgba.png")
    return folder


@pytest.fixture(scope="module")
def predicted(ckpt, inputs, tmp_path_factory):
    """`urbanseg predict`'s label and colour PNGs in each resolution mode: mode -> folder."""
    out = {}
    for mode, flags in {"resize": [], "native": ["--native"], "tile": ["--tile", "--tile-size", "32x24"]}.items():
        out[mode] = tmp_path_factory.mktemp(f"predict-{mode}")
        args = ["predict", "--checkpoint", str(ckpt), "--input", str(inputs), "-o", str(out[mode]), "--device", "cpu"]
        args += ["--engine", "torch"]
        assert main([*args, "--outputs", "labels", "color", "overlay", *flags]) == 0
    return out


GOOD = png_bytes(scene(45, 70))


def assert_good(client: TestClient, headers: dict | None = None) -> None:
    """The service still answers a good request with the right labels."""
    r = client.post("/v1/segment?output=json", content=GOOD, headers=headers or {})
    assert r.status_code == 200, r.text
    labels = decode(client.post("/v1/segment", content=GOOD, headers=headers or {}).content)
    assert [c["pixels"] for c in r.json()["classes"]] == np.bincount(labels.ravel(), minlength=8).tolist()


# --------------------------------------------------------------------------- the API


@pytest.mark.parametrize("mode", ["resize", "native", "tile"])
def test_label_and_colour_pngs_equal_predicts_pixel_for_pixel(client, inputs, predicted, mode):
    query = {"resize": "", "native": "&native=1", "tile": "&tile=1&tile_size=32x24"}[mode]
    for path in sorted(inputs.iterdir()):
        prefix = predicted[mode] / path.stem
        for output, suffix in (("label", "labels"), ("color", "color"), ("overlay", "overlay")):
            r = client.post(f"/v1/segment?output={output}{query}", content=path.read_bytes())
            assert r.status_code == 200, (path.name, r.text)
            assert r.headers["content-type"] == "image/png"
            expected = np.asarray(Image.open(f"{prefix}_{suffix}.png"))
            np.testing.assert_array_equal(decode(r.content), expected, err_msg=f"{path.name} {output} {mode}")


def test_tta_equals_predicts_tta(client, ckpt, inputs, tmp_path):
    """?tta=flip&scales=... runs predict's test-time augmentation: the same labels as
    `urbanseg predict --tta flip --scales ...`; a bad scale is 400, then a good request."""
    out = tmp_path / "tta"
    args = ["predict", "--checkpoint", str(ckpt), "--input", str(inputs / "plain.png"), "-o", str(out)]
    assert main([*args, "--device", "cpu", "--engine", "torch", "--tta", "flip", "--scales", "0.75,1"]) == 0
    r = client.post("/v1/segment?tta=flip&scales=0.75,1", content=(inputs / "plain.png").read_bytes())
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(decode(r.content), np.asarray(Image.open(out / "plain_labels.png")))
    for query in ("scales=0,1", "scales=x", "tta=rotate"):
        r = client.post(f"/v1/segment?{query}", content=GOOD)
        assert r.status_code == 400 and r.json()["error"] == "bad_parameter", query
    assert_good(client)


def test_multipart_upload_equals_raw_body(client, inputs):
    data = (inputs / "photo.jpg").read_bytes()
    raw = client.post("/v1/segment", content=data)
    form = client.post("/v1/segment", files={"image": ("../../etc/passwd", data, "image/jpeg")})
    assert raw.status_code == form.status_code == 200
    np.testing.assert_array_equal(decode(raw.content), decode(form.content))


def test_json_gives_class_shares_and_model_identity(client, predictor):
    r = client.post("/v1/segment?output=json", content=GOOD)
    body = r.json()
    labels = decode(client.post("/v1/segment?output=label", content=GOOD).content)
    counts = np.bincount(labels.ravel(), minlength=8)
    assert len(np.unique(labels)) > 1, "the test model should predict several classes"
    assert (body["width"], body["height"]) == (70, 45)
    assert [c["name"] for c in body["classes"]] == list(predictor.label_set.classes)
    assert [c["pixels"] for c in body["classes"]] == counts.tolist()
    assert sum(c["share"] for c in body["classes"]) == pytest.approx(1.0)
    assert body["model"]["file"] == "best.pt" and body["model"]["step"] == 7
    assert body["model"]["name"] == "unet-original" and body["model"]["engine"] == "pytorch (cpu)"
    assert "/" not in body["model"]["file"]


def test_onnx_model_fixed_size_answers_as_predict_and_refuses_native(ckpt, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ONNX tooling may write files into the current directory
    model = tmp_path / "fixed.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--no-dynamic", "-o", str(model)]) == 0
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(model), "--input", str(inputs / "plain.png"), "-o", str(out)]) == 0
    with TestClient(create_app(load_model(ServeConfig(model=model)), Limits())) as c:
        description = c.get("/v1/model").json()
        assert description["fixed_size"] == [64, 32] and description["model"]["engine"] == "onnxruntime"
        r = c.post("/v1/segment", content=(inputs / "plain.png").read_bytes())
        np.testing.assert_array_equal(decode(r.content), np.asarray(Image.open(out / "plain_labels.png")))
        r = c.post("/v1/segment?native=1", content=GOOD)
        assert r.status_code == 400 and r.json()["error"] == "bad_option" and "fixed" in r.json()["detail"]
        assert_good(c)


def test_run_folder_loads_its_best_checkpoint(ckpt, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(ckpt.read_bytes())
    assert load_model(ServeConfig(run=run, device="cpu", engine="torch")).source == run / "best.pt"


def test_model_health_and_metrics_routes(client, predictor):
    model = client.get("/v1/model").json()
    assert model["classes"] == list(predictor.label_set.classes)
    assert model["palette"] == [list(c) for c in predictor.label_set.palette]
    assert model["input_size"] == [64, 32] and model["label_set"] == "categories8"
    assert model["limits"]["max_pixels"] == LIMITS.max_pixels
    assert client.get("/healthz").json()["status"] == "ok"
    client.post("/v1/segment", content=b"not an image")
    text = client.get("/metrics").text
    for name in (
        'urbanseg_requests_total{route="/v1/segment",status="200"}',
        'urbanseg_errors_total{reason="not_an_image"}',
        "urbanseg_request_seconds_bucket",
        'urbanseg_segment_latency_seconds{quantile="0.99"}',
        "urbanseg_queue_depth",
        "urbanseg_in_flight",
        "urbanseg_batch_size_bucket",
        "process_resident_memory_bytes",
    ):
        assert name in text, name


def test_page_and_static_files_are_served_with_a_strict_csp(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "http" not in page.text.replace("http-equiv", ""), "the page must load nothing from elsewhere"
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/..%2F..%2Fservice.py").status_code == 404
    assert client.get("/static/index.html").status_code == 404


# --------------------------------------------------------------------------- refused requests


def _truncated_png() -> bytes:
    data = png_bytes(scene(60, 80, 3))
    return data[: len(data) // 2]


def _bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A PNG of a few hundred KB that would decode to `width` x `height` grey pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _chunks(total: int):
    for _ in range(total // 10_000):
        yield b"\0" * 10_000


BAD = {  # built when the test runs: the bomb takes a few seconds to compress
    "not an image": (lambda: dict(content=b"hello, world"), 400, "not_an_image"),
    "corrupt image": (lambda: dict(content=_truncated_png()), 400, "corrupt_image"),
    "empty body": (lambda: dict(content=b""), 400, "empty_upload"),
    "html": (lambda: dict(content=b"<html><script>alert(1)</script></html>"), 400, "not_an_image"),
    "too large (Content-Length)": (lambda: dict(content=b"\0" * 400_000), 413, "upload_too_large"),
    "too large (counted, chunked)": (lambda: dict(content=_chunks(400_000)), 413, "upload_too_large"),
    "decompression bomb": (lambda: dict(content=_bomb()), 413, "too_many_pixels"),
    "too many pixels": (lambda: dict(content=png_bytes(np.zeros((500, 500, 3), np.uint8))), 413, "too_many_pixels"),
    "two files": (lambda: dict(files=[("a", ("a.png", GOOD)), ("b", ("b.png", GOOD))]), 400, "bad_form"),
    "unknown output": (lambda: dict(params={"output": "jpeg"}, content=GOOD), 400, "bad_parameter"),
    "unknown parameter": (lambda: dict(params={"path": "/etc/passwd"}, content=GOOD), 400, "bad_parameter"),
    "tile and native": (lambda: dict(params={"tile": "1", "native": "1"}, content=GOOD), 400, "bad_parameter"),
    "bad tile size": (lambda: dict(params={"tile": "1", "tile_size": "big"}, content=GOOD), 400, "bad_parameter"),
    "bad alpha": (lambda: dict(params={"output": "overlay", "alpha": "2"}, content=GOOD), 400, "bad_parameter"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_is_refused_with_its_reason_then_a_good_one_works(client, case):
    kwargs, status, reason = BAD[case]
    r = client.post("/v1/segment", **kwargs())
    assert r.status_code == status, r.text
    assert r.json()["error"] == reason and r.json()["detail"]
    assert_good(client)


def test_token_is_required_on_the_api_and_metrics(predictor):
    with TestClient(create_app(predictor, Limits(token=TOKEN))) as c:
        for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = c.post("/v1/segment", content=GOOD, headers=bad)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert c.get("/v1/model", headers=bad).status_code == 401
            assert c.get("/metrics", headers=bad).status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
        assert_good(c, {"Authorization": f"Bearer {TOKEN}"})


class Gated(Predictor):
    """A real predictor whose forward passes wait for `gate` (to fill the queue, or time out),
    and fail on an all-black image (a model error on one request)."""

    def __init__(self, inner: Predictor) -> None:
        super().__init__(inner.label_set, inner.input_size, inner.source, inner.info, inner.fixed_size)
        self.inner, self.gate, self.entered, self.sizes = inner, threading.Event(), threading.Event(), []

    def logits(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(30)
        self.sizes.append(len(batch))
        if (batch.reshape(len(batch), -1).max(axis=1) == 0).any():
            raise RuntimeError("black image")
        return self.inner.logits(batch)


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@contextlib.contextmanager
def running(app, max_connections: int = 64):
    """The app on a real uvicorn server on a free loopback port: its base URL."""
    sock = bind("127.0.0.1", 0)
    server = make_server(app, max_connections)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)


def test_inference_timeout_504_skips_the_cancelled_request_then_a_good_one_works(predictor):
    gated = Gated(predictor)
    app = create_app(gated, Limits(inference_timeout=0.5))
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        running_one = pool.submit(c.post, "/v1/segment", content=GOOD)  # the worker runs it: the gate stays shut
        assert gated.entered.wait(30)
        queued = c.post("/v1/segment", content=png_bytes(scene(45, 70, 9)))  # waits behind it, in the queue
        for r in (running_one.result(), queued):
            assert r.status_code == 504 and r.json()["error"] == "inference_timeout"
        gated.gate.set()
        assert_good(c)
        assert app.state.batcher.skipped == 1  # the queued one was cancelled, never run
        assert len(gated.sizes) == 3  # the first request, then the two of assert_good


def test_full_queue_503_and_a_failing_request_in_a_batch_fails_alone(predictor):
    gated = Gated(predictor)
    limits = Limits(max_queue=3, max_batch=4, batch_wait=0.05, inference_timeout=30)
    images = [png_bytes(scene(45, 70, s)) for s in range(5)]
    black = png_bytes(np.zeros((20, 30, 3), np.uint8))
    app = create_app(gated, limits)
    with TestClient(app) as c, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(c.post, "/v1/segment", content=images[0])]
        assert gated.entered.wait(30)  # the worker holds the first at the gate
        for k, data in enumerate([images[1], black, images[2]], start=1):  # three queue, in this order
            futures.append(pool.submit(c.post, "/v1/segment", content=data))
            wait_until(lambda k=k: app.state.batcher.depth == k)
        futures += [pool.submit(c.post, "/v1/segment", content=data) for data in images[3:]]  # refused
        wait_until(lambda: all(f.done() for f in futures[4:]))
        gated.gate.set()
        answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200, 200, 500, 200, 503, 503]
        assert all(int(a.headers["retry-after"]) >= 1 for a in answers[4:])
        assert answers[2].json()["error"] == "inference_failed" and "black image" in answers[2].json()["detail"]
        assert 3 in gated.sizes, gated.sizes  # images 1, black, 2 went through the model together
        for data, a in zip([images[0], images[1], images[2]], [answers[0], answers[1], answers[3]]):
            np.testing.assert_array_equal(decode(a.content), decode(c.post("/v1/segment", content=data).content))
        assert_good(c)
        text = c.get("/metrics").text
        assert 'urbanseg_errors_total{reason="queue_full"} 2.0' in text
        assert 'urbanseg_errors_total{reason="inference_failed"} 1.0' in text


def test_upload_stall_408_on_a_real_server_then_a_good_request(predictor):
    with running(create_app(predictor, Limits(upload_timeout=0.5))) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + GOOD[:100])
            reply = b""
            while b"upload_timeout" not in reply and (part := s.recv(65536)):  # headers and body may come apart
                reply += part
            text = reply.decode(errors="replace")
        assert text.startswith("HTTP/1.1 408") and "upload_timeout" in text, text
        r = httpx.post(f"{url}/v1/segment", content=GOOD, timeout=30)
        assert r.status_code == 200
        np.testing.assert_array_equal(decode(r.content), decode(httpx.post(f"{url}/v1/segment", content=GOOD).content))
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_connections_over_the_limit_get_503_then_a_good_request(predictor):
    with running(create_app(predictor, Limits(upload_timeout=20)), max_connections=2) as url:
        port = int(url.rsplit(":", 1)[1])
        head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            for s in stalled:  # two slow uploads hold both connections
                s.sendall(head + GOOD[:100])
            time.sleep(0.5)
            r = httpx.post(f"{url}/v1/segment", content=GOOD, timeout=30)
            assert r.status_code == 503
        finally:
            for s in stalled:
                s.close()
        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=30).status_code == 200)
        r = httpx.post(f"{url}/v1/segment", content=GOOD, timeout=30)
        assert r.status_code == 200
        np.testing.assert_array_equal(decode(r.content), decode(httpx.post(f"{url}/v1/segment", content=GOOD).content))


# --------------------------------------------------------------------------- the batcher


def test_batcher_batches_queued_requests_isolates_failures_and_skips_cancelled():
    gate, started, calls = threading.Event(), threading.Event(), []

    def run(key, payloads):
        started.set()
        gate.wait(10)
        calls.append((key, list(payloads)))
        if "bad" in payloads:
            raise ValueError("bad payload")
        return [f"{key}:{p}" for p in payloads]

    batcher = MicroBatcher(run, max_batch=3, wait=0.01, max_queue=5)
    try:
        first = batcher.submit("a", "0")
        assert started.wait(10)  # the worker holds "0" at the gate; the rest queue up
        futures = [batcher.submit(k, p) for k, p in [("a", "1"), ("b", "x"), ("a", "bad"), ("a", "3"), ("a", "4")]]
        with pytest.raises(QueueFull) as full:
            batcher.submit("a", "5")
        assert full.value.retry_after >= 1
        futures[-1].cancel()
        gate.set()
        assert first.result(10) == "a:0"
        assert futures[0].result(10) == "a:1" and futures[3].result(10) == "a:3"
        assert futures[1].result(10) == "b:x"
        with pytest.raises(ValueError, match="bad payload"):
            futures[2].result(10)
        assert futures[4].cancelled() and batcher.skipped == 1
        assert ("a", ["1", "bad", "3"]) in calls, calls  # one batch of equal keys, in order
        assert ("a", ["1"]) in calls and ("a", ["3"]) in calls  # then one by one after it failed
        assert all(key != "b" or payloads == ["x"] for key, payloads in calls)
    finally:
        batcher.close()
    assert not batcher.alive


def test_batcher_keeps_a_batch_within_its_cost():
    """Large pictures at their own resolution: a batch holds at most `max_cost` pixels
    (one request alone may be as large as it is allowed to be)."""
    gate, calls = threading.Event(), []

    def run(key, payloads):
        gate.wait(10)
        calls.append(list(payloads))
        return payloads

    batcher = MicroBatcher(run, max_batch=4, wait=0.01, max_cost=100)
    try:
        first = batcher.submit("native", "a", cost=100)
        time.sleep(0.2)  # the worker holds "a" at the gate; the rest queue up
        rest = [batcher.submit("native", p, cost=c) for p, c in [("b", 60), ("c", 40), ("d", 30), ("e", 120)]]
        gate.set()
        assert first.result(10) == "a" and [f.result(10) for f in rest] == ["b", "c", "d", "e"]
        assert calls == [["a"], ["b", "c"], ["d"], ["e"]], calls
    finally:
        batcher.close()


def test_batcher_does_not_wait_for_a_lone_request():
    batcher = MicroBatcher(lambda key, payloads: payloads, max_batch=4, wait=2.0)
    try:
        start = time.perf_counter()
        assert batcher.submit(None, 1).result(5) == 1
        assert time.perf_counter() - start < 1.0
    finally:
        batcher.close()


# --------------------------------------------------------------------------- the command


def test_serve_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--checkpoint",
        "--run",
        "--model",
        "--host",
        "--port",
        "--token",
        "--max-batch",
        "--batch-wait-ms",
        "--max-queue",
        "--max-upload-mb",
        "--max-pixels",
        "--upload-timeout",
        "--inference-timeout",
    ):
        assert flag in text, flag
    assert "127.0.0.1" in text and "URBANSEG_TOKEN" in text


def test_serve_refuses_bad_flags_with_exit_2(capsys, ckpt):
    assert main(["serve"]) == 2
    assert main(["serve", "--checkpoint", str(ckpt), "--max-batch", "0"]) == 2
    assert main(["serve", "--checkpoint", str(ckpt), "--token", "short"]) == 2
    assert "--token" in capsys.readouterr().err


def test_serve_command_runs_with_a_token_from_the_environment_and_stops_on_ctrl_c(ckpt):
    env = {**os.environ, "URBANSEG_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "urbanseg", "serve", "--checkpoint", str(ckpt), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("serving on "):
                url = line.split()[2].rstrip("/")
                break
        assert url and url.startswith("http://127.0.0.1:"), url
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.post(f"{url}/v1/segment", content=GOOD).status_code == 401
        r = httpx.post(f"{url}/v1/segment?output=json", content=GOOD, headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["model"]["file"] == "best.pt"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_serve_refuses_a_taken_port(ckpt):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(ckpt), "--port", str(port), "--device", "cpu"]) == 2


# --------------------------------------------------------------------------- the page


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_page_in_chromium_shows_overlay_legend_and_download_matching_the_api(predictor, inputs, tmp_path):
    with running(create_app(predictor, Limits())) as url, DevTools() as page:
        page.send(
            "Page.addScriptToEvaluateOnNewDocument",
            source="window.__csp = []; document.addEventListener('securitypolicyviolation',"
            " e => window.__csp.push(e.violatedDirective));",
        )
        page.navigate(url + "/")
        page.wait_for("document.getElementById('model').textContent.includes('unet-original')")
        image = inputs / "plain.png"
        page.set_files("#file", image)
        state = page.wait_for("document.body.dataset.state !== 'busy' && document.body.dataset.state")
        assert state == "done", page.evaluate("document.getElementById('status').textContent")
        page.screenshot(tmp_path / "page.png")

        api_labels = decode(httpx.post(f"{url}/v1/segment", content=image.read_bytes()).content)
        api_color = decode(httpx.post(f"{url}/v1/segment?output=color", content=image.read_bytes()).content)
        api_json = httpx.post(f"{url}/v1/segment?output=json", content=image.read_bytes()).json()

        mask = page.evaluate("document.getElementById('mask').toDataURL('image/png')")
        np.testing.assert_array_equal(decode(base64.b64decode(mask.split(",", 1)[1]))[..., :3], api_color)
        assert page.evaluate("document.getElementById('download').hidden") is False
        downloads = tmp_path / "downloads"
        page.send("Page.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
        page.evaluate("document.getElementById('download').click()")  # as a user clicks it
        saved = downloads / "plain_labels.png"
        deadline = time.monotonic() + 30
        while not saved.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        np.testing.assert_array_equal(decode(saved.read_bytes()), api_labels)
        legend = page.evaluate(
            "[...document.querySelectorAll('#legend li')].map(li => [+li.dataset.class, +li.dataset.pixels,"
            " li.textContent])"
        )
        assert {k: n for k, n, _ in legend} == {c["index"]: c["pixels"] for c in api_json["classes"]}
        top = max(api_json["classes"], key=lambda c: c["pixels"])
        assert legend[0][2] == f"{top['name']}{100 * top['share']:.1f} %"
        page.evaluate(
            "(() => { const s = document.getElementById('opacity'); s.value = '0.2';"
            " s.dispatchEvent(new Event('input')); })()"
        )
        assert page.evaluate("getComputedStyle(document.getElementById('mask')).opacity") == "0.2"
        assert page.evaluate("document.getElementById('result').hidden") is False
        shown = page.evaluate(
            "(() => { const r = document.getElementById('mask').getBoundingClientRect();"
            " return [r.width, r.height]; })()"
        )
        assert shown[0] > 0 and shown[1] > 0
        assert page.evaluate("window.__csp") == [], "the page broke its own Content-Security-Policy"
        notes = tmp_path / "notes.png"  # not an image, whatever its name: the server's reason is shown
        notes.write_text("shopping list")
        page.set_files("#file", notes)
        assert page.wait_for("document.body.dataset.state === 'error'")
        assert "400: the upload is not a readable image" in page.evaluate(
            "document.getElementById('status').textContent"
        )


def test_a_recorded_protocol_applies_unless_protocol_0(ckpt):
    """A pretrained model's recorded protocol (here sliding 32x24 windows, stride 16x12)
    is what the service runs, as predict does; ?protocol=0 resizes like any model and
    ?tile=1 with a tile_size wins over the record."""
    from urbanseg.inference.segment import segment

    predictor = TorchPredictor(ckpt, "cpu")
    predictor.info["inference"] = {"mode": "slide", "size": [32, 24], "stride": [16, 12]}
    image = scene(45, 70, 3)
    with TestClient(create_app(predictor, LIMITS)) as c:
        slide = decode(c.post("/v1/segment", content=png_bytes(image)).content)
        plain = decode(c.post("/v1/segment?protocol=0", content=png_bytes(image)).content)
        own = decode(c.post("/v1/segment?tile=1&tile_size=40x30", content=png_bytes(image)).content)
    np.testing.assert_array_equal(slide, segment(predictor, [image], mode="tile", tile_size=(32, 24), overlap=0.5)[0])
    np.testing.assert_array_equal(plain, segment(predictor, [image], mode="resize")[0])
    np.testing.assert_array_equal(own, segment(predictor, [image], mode="tile", tile_size=(40, 30), overlap=0.25)[0])

"""Load benchmark of `urbanseg serve`: requests/s and latency percentiles with 1 and N
concurrent clients on the loopback interface, next to in-process one-image-at-a-time
prediction on the same model, in the same run.

    python benchmarks/bench_serve.py [--model NAME] [--onnx] [--clients 1 16] [--seconds 20] [--max-requests 2000]

The server runs as `urbanseg serve --port 0` in a process of its own, on 127.0.0.1 only;
each phase stops after `--seconds` or `--max-requests`, whichever comes first, and the
server is stopped at the end. Every request is counted as answered (200), rejected (503
with Retry-After: the client waits that long, as it is asked) or an error. The server's
resident memory is sampled over the whole run: it must stay flat.

Target (issue 11): with 16 clients, at least 1.5x the requests/s of one client.
Random weights (speed does not depend on the values), 1024x512 PNG inputs resized to the
model's 512x256 input, as `urbanseg predict` does by default.
"""

from __future__ import annotations

import argparse
import http.client
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def make_checkpoint(folder: Path, model_name: str) -> Path:
    import torch

    from urbanseg.checkpoint import build_payload, save_checkpoint
    from urbanseg.labels import get_label_set
    from urbanseg.models import create_model

    torch.manual_seed(0)
    ls = get_label_set("categories8")
    model = create_model(model_name, ls.num_classes).eval()
    payload = build_payload(model, label_set=ls, input_size=(512, 256), config={}, step=0, epoch=0, metrics={})
    path = folder / "best.pt"
    save_checkpoint(path, payload)
    return path


def street_png(seed: int, size: tuple[int, int] = (1024, 512)) -> bytes:
    """A smooth random picture as PNG bytes (sizes like a camera frame, a few hundred KB)."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(cv2.resize(small, size, interpolation=cv2.INTER_CUBIC)).save(buffer, format="PNG")
    return buffer.getvalue()


def export(checkpoint: Path) -> Path:
    """`urbanseg export` of the checkpoint, run in its folder (ONNX tooling may write files
    into the current directory)."""
    out = checkpoint.with_suffix(".onnx")
    cmd = [sys.executable, "-m", "urbanseg", "export", "--checkpoint", str(checkpoint), "--out", str(out)]
    subprocess.run(cmd, cwd=checkpoint.parent, check=True, stdout=subprocess.DEVNULL)
    return out


def model_flags(model: Path) -> list[str]:
    if model.suffix == ".onnx":
        return ["--model", str(model)]
    return ["--checkpoint", str(model), "--device", "cpu", "--engine", "torch"]


def in_process(checkpoint: Path, images: list[bytes], seconds: float, max_requests: int) -> list[float]:
    """Latencies (s) of decode + segment + label PNG, one image at a time, in this process."""
    from PIL import Image

    from urbanseg.imaging import decode_image
    from urbanseg.inference.predictor import OnnxPredictor, Predictor, TorchPredictor
    from urbanseg.inference.segment import segment

    if checkpoint.suffix == ".onnx":
        predictor: Predictor = OnnxPredictor(checkpoint)
    else:
        predictor = TorchPredictor(checkpoint, "cpu")
    segment(predictor, [decode_image(images[0])])  # warm-up
    times: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(times) < max_requests:
        start = time.perf_counter()
        labels = segment(predictor, [decode_image(images[len(times) % len(images)])])[0]
        Image.fromarray(labels).save(io.BytesIO(), format="PNG", compress_level=1)
        times.append(time.perf_counter() - start)
    return times


class Server:
    """`urbanseg serve` on 127.0.0.1 with a free port, in a process of its own."""

    def __init__(self, checkpoint: Path, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "urbanseg", "serve", *model_flags(checkpoint), "--port", "0"]
        self.proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", *extra], stdout=subprocess.PIPE, text=True)
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith("serving on "):
                self.port = int(line.split()[2].rstrip("/").rsplit(":", 1)[1])
                break
        else:
            raise RuntimeError("the server did not start")
        self.rss: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.rss.append((time.monotonic(), int(line.split()[1]) * 1024))

    def metric(self, name: str) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(30)


def phase(port: int, clients: int, images: list[bytes], seconds: float, max_requests: int) -> dict:
    """`clients` threads, each on one keep-alive connection, posting images until the time
    or the request budget runs out. Latencies of answered requests and the counts."""
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"ok": 0, "rejected": 0, "errors": 0}
    end = time.monotonic() + seconds
    issued = [0]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < end:
            with lock:
                if issued[0] >= max_requests:
                    break
                issued[0] += 1
                body = images[issued[0] % len(images)]
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/segment", body=body, headers={"Content-Type": "image/png"})
                reply = conn.getresponse()
                reply.read()
                status, retry = reply.status, reply.getheader("Retry-After")
            except (OSError, http.client.HTTPException):
                status, retry = 0, None
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            seconds_taken = time.perf_counter() - start
            with lock:
                if status == 200:
                    counts["ok"] += 1
                    latencies.append(seconds_taken)
                elif status == 503:
                    counts["rejected"] += 1
                else:
                    counts["errors"] += 1
            if status == 503:
                time.sleep(min(float(retry or 1), max(0.0, end - time.monotonic())))
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "wall": wall, "latencies": latencies, **counts}


def percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    p = np.percentile(np.array(values) * 1000.0, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


def main() -> int:
    from urbanseg.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="architecture (random weights)")
    parser.add_argument("--onnx", action="store_true", help="export the model and serve it with ONNX Runtime")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16], help="concurrent clients per phase")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--max-requests", type=int, default=2000, help="request budget of each phase")
    parser.add_argument("--server-args", default="", help="extra `urbanseg serve` flags, e.g. '--max-batch 8'")
    args = parser.parse_args()

    images = [street_png(seed) for seed in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp), args.model)
        if args.onnx:
            checkpoint = export(checkpoint)
        engine = "ONNX Runtime" if args.onnx else "PyTorch"
        print(f"model {args.model} on {engine}, 1024x512 PNG inputs ({len(images[0]) // 1000} KB) resized to 512x256")
        local = in_process(checkpoint, images, args.seconds, args.max_requests)
        server = Server(checkpoint, args.server_args.split())
        try:
            phase(server.port, 2, images, 3.0, 10)  # warm-up: connections, first batches
            results = []
            for n in args.clients:
                t0 = time.monotonic()
                results.append(phase(server.port, n, images, args.seconds, args.max_requests))
                results[-1]["rss"] = [v for t, v in server.rss if t >= t0]
            batches = server.metric("urbanseg_batch_size_count")
            batched = server.metric("urbanseg_batch_size_sum")
        finally:
            server.stop()

    rows = [("in-process predict, one at a time", 1, len(local) / sum(local), *percentiles(local), len(local), 0, 0)]
    for r in results:
        rows.append(
            (f"serve, {r['clients']} client(s)", r["clients"], r["ok"] / r["wall"], *percentiles(r["latencies"]),
             r["ok"], r["rejected"], r["errors"])
        )  # fmt: skip
    print(f"\n{'':36} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'ok':>6} {'503':>5} {'err':>5}")
    for name, _, rps, p50, p95, p99, ok, rejected, errors in rows:
        print(f"{name:36} {rps:7.2f} {p50:8.1f} {p95:8.1f} {p99:8.1f} {ok:6d} {rejected:5d} {errors:5d}")
    one = next((r for r in rows[1:] if r[1] == 1), None)
    if one is not None:
        for row in rows[1:]:
            if row[1] > 1:
                print(f"{row[1]} clients / 1 client: {row[2] / one[2]:.2f}x requests/s (target >= 1.5x at 16)")
        print(f"serve, 1 client / in-process predict: {one[2] / rows[0][2]:.2f}x requests/s")
    print(f"mean batch size over the run: {batched / max(batches, 1):.2f}")
    for r in results:  # flat: the last third of a phase holds no more than its first third
        rss = r["rss"]
        if len(rss) >= 6:
            first, last = statistics.mean(rss[: len(rss) // 3]), statistics.mean(rss[-(len(rss) // 3) :])
            print(
                f"server RSS, {r['clients']} client(s): {first / 2**20:.0f} MB in the first third of the phase, "
                f"{last / 2**20:.0f} MB in the last ({100 * (last - first) / first:+.1f}%), "
                f"max {max(rss) / 2**20:.0f} MB"
            )
    answered = all(r["errors"] == 0 for r in results)
    print("every request answered or explicitly rejected (503)" if answered else "SOME REQUESTS FAILED")
    print(f"median in-process latency {statistics.median(local) * 1000:.1f} ms")
    return 0 if answered else 1


if __name__ == "__main__":
    sys.exit(main())

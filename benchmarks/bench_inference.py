"""Inference latency per model and engine on the CPU, each figure next to its physical
floor: the model's FLOPs divided by this machine's GEMM peak, measured in the same run.

    python benchmarks/bench_inference.py [--quick] [--models NAME ...] [--sizes 512x256 ...]

Engines, side by side in one process (batch 1, `--threads` intra-op threads, float32,
random weights with random batch-norm statistics, 8 classes):

- ``torch NCHW``: the model as trained, in PyTorch (what `predict` ran before --engine);
- ``torch folded CL``: PyTorch with batch norms folded into the convolutions and
  channels-last (`urbanseg.inference.fold`, what `--engine torch` runs);
- ``ORT``: the model exported to ONNX (opset 18, dynamic axes), ONNX Runtime;
- ``auto``: what `predict`/`evaluate` run by default for a checkpoint on this machine
  (`urbanseg.inference.engine.load_engine(engine="auto")`: the ONNX export cached beside
  the checkpoint), through the `Predictor` interface, numpy in and out.

The floor is FLOPs (torch.utils.flop_counter: 2 per multiply-add, convolutions and
matmuls) / the fp32 peak (the best of a few 2048x2048 `torch.matmul`s on the same
threads); "x floor" is ms / floor ms (1.0 would be every FLOP at GEMM speed). The int8
peak (`torch._int_mm`, 2048x2048) gives the floor an int8 model could approach. Each
figure is the median of `--repeats` timed runs after one warm-up (`--quick`: the
default model only, one timed run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the benchmarks' shared timing

from helpers.timing import rotated

MODELS = ["lraspp-mobilenetv3", "fpn-resnet18", "deeplabv3plus-mobilenetv4"]
ENGINES = ["torch NCHW", "torch folded CL", "ORT", "auto"]


def gemm_peaks(n: int = 2048, repeats: int = 5) -> tuple[float, float | None]:
    """(fp32 FLOP/s, int8 OP/s or None) of an n x n x n matrix product on this process's
    threads: the best of `repeats` runs (a peak, not a median)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    fp32 = 2 * n**3 / (min(_runs(lambda: torch.matmul(a, b), repeats)) / 1000.0)
    int8 = None
    try:
        qa = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        qb = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        int8 = 2 * n**3 / (min(_runs(lambda: torch._int_mm(qa, qb), repeats)) / 1000.0)
    except (RuntimeError, AttributeError):  # no int8 GEMM in this build
        pass
    return fp32, int8


def _runs(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of fn() in milliseconds, `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def _model(name: str) -> Any:
    import torch

    from urbanseg.models import create_model

    torch.manual_seed(0)
    model = create_model(name, 8).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # batch norms away from the identity: folding must do real work
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def measure(name: str, sizes: list[tuple[int, int]], repeats: int, workdir: Path) -> dict[tuple[int, int], dict]:
    """{size: {engine: ms, "auto engine": str}} for one model."""
    import copy

    import onnxruntime as ort
    import torch

    from urbanseg.checkpoint import build_payload, save_checkpoint
    from urbanseg.inference.engine import load_engine
    from urbanseg.inference.export import export_onnx, probe_picture
    from urbanseg.inference.fold import optimize_for_inference
    from urbanseg.labels import get_label_set

    model = _model(name)
    folded, _ = optimize_for_inference(copy.deepcopy(model), "cpu")
    onnx_path = workdir / f"{name}.onnx"
    export_onnx(model, onnx_path, (512, 256), opset=18, dynamic=True, metadata={})
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    ckpt = workdir / name / "best.pt"
    ckpt.parent.mkdir(exist_ok=True)
    label_set = get_label_set("categories8")
    payload = build_payload(model, label_set=label_set, input_size=(512, 256), config={}, step=0, epoch=0, metrics={})
    save_checkpoint(ckpt, payload)
    auto = load_engine(checkpoint=ckpt, engine="auto", device="cpu")  # exports into the cache (not timed)
    out: dict[tuple[int, int], dict] = {}
    for size in sizes:
        x = probe_picture(*size)
        row = _time_engines(x, {"torch NCHW": model, "torch folded CL": folded}, session, auto, repeats)
        out[size] = row
        cells = ", ".join(f"{e} {row[e]:.0f} ms" for e in ENGINES)
        print(f"  {name} {size[0]}x{size[1]}: {cells}", file=sys.stderr, flush=True)
    return out


def _time_engines(x: Any, torch_models: dict[str, Any], session: Any, auto: Any, repeats: int) -> dict[str, Any]:
    """{engine: ms} for one (1, 3, H, W) float32 input: the engines take turns within each
    repeat (a change of load hits them alike), each after a short pause, so that no engine
    runs while another one's ONNX Runtime threads still spin after their run; the median."""
    import torch

    t = torch.from_numpy(x)
    inputs = {"torch NCHW": t, "torch folded CL": t.contiguous(memory_format=torch.channels_last)}
    calls: dict[str, Callable[[], Any]] = {
        engine: (lambda m=model, i=inputs[engine]: m(i)) for engine, model in torch_models.items()
    }
    calls["ORT"] = lambda: session.run(None, {"image": x})
    calls["auto"] = lambda: auto.logits(x)
    with torch.inference_mode():
        medians = rotated(list(calls.values()), repeats)
    row: dict[str, Any] = dict(zip(calls, medians, strict=True))
    row["auto engine"] = auto.info.get("engine", type(auto).__name__)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help=f"models (default: {' '.join(MODELS)})")
    parser.add_argument("--sizes", nargs="+", default=["512x256", "2048x1024"], help="input sizes WxH")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for PyTorch and ONNX Runtime")
    parser.add_argument("--quick", action="store_true", help="the default model only, one timed run per figure")
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    from urbanseg.config import parse_size
    from urbanseg.models import model_stats

    torch.set_num_threads(args.threads)
    models = MODELS[:1] if args.quick else args.models
    repeats = 1 if args.quick else args.repeats
    sizes = [parse_size(s) for s in args.sizes]
    fp32, int8 = gemm_peaks(1024 if args.quick else 2048)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # ONNX tooling may drop files into the working directory
        try:
            for name in models:
                results[name] = measure(name, sizes, repeats, Path(tmp))
        finally:
            os.chdir(cwd)
    int8_text = f", int8 GEMM peak {int8 / 1e9:.0f} GOP/s (torch._int_mm)" if int8 else ""
    print(
        f"\nCPU {os.cpu_count()} cores, {args.threads} threads, batch 1, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}; fp32 GEMM peak {fp32 / 1e9:.0f} GFLOP/s (torch.matmul){int8_text}; "
        f"load average {os.getloadavg()[0]:.1f} at the end. Each cell: ms (x the fp32 floor). "
        "auto / fastest: the default path against the fastest engine of its row.\n"
    )
    head = " | ".join(f"{e} ms (x floor)" for e in ENGINES)
    int8_head = " | int8 floor ms" if int8 else ""
    print(f"| model | size | GFLOPs | fp32 floor ms{int8_head} | {head} | auto runs | auto / fastest |")
    print("|-" * (6 + len(ENGINES) + bool(int8)) + "|")
    for name, per_size in results.items():
        for size, row in per_size.items():
            flops = model_stats(name, size)[1]
            floor = flops / fp32 * 1000.0
            cells = " | ".join(f"{row[e]:.0f} ({row[e] / floor:.1f})" for e in ENGINES)
            fastest = min(row[e] for e in ENGINES if e != "auto")
            int8_cell = f" | {flops / int8 * 1000.0:.1f}" if int8 else ""
            print(
                f"| {name} | {size[0]}x{size[1]} | {flops / 1e9:.1f} | {floor:.1f}{int8_cell} | {cells} "
                f"| {row['auto engine']} | {row['auto'] / fastest:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference latency per model on the CPU, PyTorch and ONNX Runtime, at 512x256 and
2048x1024, each as a ratio to unet-original measured in the same run (absolute times
depend on the machine and its load; the ratios are what carries over).

    python benchmarks/bench_inference.py [--models NAME ...] [--sizes 512x256 ...] [--repeats 3]

Batch 1, float32, random weights (latency does not depend on the values), 8 classes.
Each figure is the median of `--repeats` timed runs after one warm-up run; above 1024x512,
one timed run after a warm-up (unet-original, minutes on a CPU: no warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = "unet-original"


def timed(fn, repeats: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def measure(name: str, size: tuple[int, int], repeats: int, workdir: Path) -> tuple[float, float]:
    """(PyTorch ms, ONNX Runtime ms) for one batch-1 forward pass of `name` at size (W, H)."""
    import onnxruntime as ort
    import torch

    from urbanseg.inference.export import export_onnx, probe_picture
    from urbanseg.models import create_model

    torch.manual_seed(0)
    model = create_model(name, 8).eval()
    x = probe_picture(*size)
    large = size[0] * size[1] > 1024 * 512
    # Large inputs: one timed run after a warm-up (none for unet-original, minutes on a CPU).
    reps, warm = (1, int(name != REFERENCE)) if large else (repeats, 1)
    with torch.inference_mode():
        tensor = torch.from_numpy(x)
        torch_ms = timed(lambda: model(tensor), reps, warm)
    path = workdir / f"{name}.onnx"
    if not path.exists():
        export_onnx(model, path, (512, 256), opset=18, dynamic=True, metadata={})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_ms = timed(lambda: session.run(None, {"image": x}), reps, warm)
    return torch_ms, ort_ms


def main(argv: list[str] | None = None) -> int:
    from urbanseg.config import parse_size
    from urbanseg.models import MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="models (default: all)")
    parser.add_argument("--sizes", nargs="+", default=["512x256", "2048x1024"], help="input sizes WxH")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    args = parser.parse_args(argv)
    names = [REFERENCE] + [n for n in args.models if n != REFERENCE]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size_text in args.sizes:
            size = parse_size(size_text)
            ref = None
            for name in names:
                torch_ms, ort_ms = measure(name, size, args.repeats, Path(tmp))
                ref = ref or (torch_ms, ort_ms)
                rows.append((name, size_text, torch_ms, ort_ms, torch_ms / ref[0], ort_ms / ref[1], ort_ms / torch_ms))
                print(f"  {name} {size_text}: torch {torch_ms:.0f} ms, onnxruntime {ort_ms:.0f} ms", file=sys.stderr)
    import os

    import onnxruntime
    import torch

    print(
        f"\nCPU, batch 1, torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
        f"{onnxruntime.__version__}, load average {os.getloadavg()[0]:.1f} at the end; ratios to {REFERENCE} "
        "at the same size and runtime (lower is faster)\n"
    )
    print(
        "| model | size | PyTorch ms | ONNX Runtime ms | PyTorch / unet-original | ORT / unet-original "
        "| ORT / PyTorch |"
    )
    print("|-|-|-|-|-|-|-|")
    for name, size_text, t, o, rt, ro, ot in rows:
        print(f"| {name} | {size_text} | {t:.0f} | {o:.0f} | {rt:.3f} | {ro:.3f} | {ot:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

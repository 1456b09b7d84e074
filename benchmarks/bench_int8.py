"""int8 against fp32 ONNX Runtime, per model, side by side in one run
(`urbanseg export --quantize int8`, `urbanseg.inference.quantize`).

    python benchmarks/bench_int8.py [--models NAME ...] [--sizes 512x256 2048x1024]
                                    [--classes 8] [--threads 2] [--repeats 9] [--train-iters 300]

Speed: each model with random weights (latency does not depend on the values) and a
`--classes`-way head (default: the default label set's, categories8's 8 classes), exported
at 512x256 with dynamic sizes, quantized with the same code as the command (calibrated on
4 synthetic pictures: the ranges do not change the speed). Batch 1; for every size the
fp32 and int8 sessions run in turn, `--repeats` rounds after one warm-up each (at every
size: with 2 rounds the 2048x1024 median wandered by 20 % between runs on this VM), and
the median is shown: ms/image with `--threads` intra-op threads (wall time), the speed-up, and
the same for one thread in CPU time of the calling thread (`time.thread_time`), which a
loaded machine disturbs much less than wall time.

Accuracy: the default model trained for `--train-iters` steps on a small synthetic set
(256x128), then `urbanseg export --quantize int8` on it: its val mIoU before (fp32) and
after (int8) and the argmax agreement, as the command stores them (0 skips this part).

Everything is written in a temporary folder, which is also the working directory (ONNX
tooling writes `<uuid>.data` files there); nothing is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the benchmarks' shared timing

from helpers.timing import rotated

DEFAULT_MODELS = [
    "lraspp-mobilenetv3",
    "deeplabv3plus-mobilenetv4",
    "fpn-resnet18",
    "fpn-mobilenetv3",
    "segformer-mit_b0",
]


def export_pair(name: str, folder: Path, classes: int) -> tuple[Path, Path, dict]:
    """(fp32 path, int8 path, what quantize_onnx did) for model `name`, random weights."""
    import torch

    from urbanseg.inference.export import export_onnx, probe_picture
    from urbanseg.inference.quantize import quantize_onnx
    from urbanseg.models import create_model

    torch.manual_seed(0)
    model = create_model(name, classes).eval()
    fp32, int8 = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
    export_onnx(model, fp32, (512, 256), opset=18, dynamic=True, metadata={})
    images = [probe_picture(512, 256, seed=k) for k in range(4)]
    result = quantize_onnx(fp32, int8, images)
    return fp32, int8, vars(result)


def sessions(paths: list[Path], threads: int) -> list:
    import onnxruntime as ort

    out = []
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        out.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    return out


def speed(fp32: Path, int8: Path, size: tuple[int, int], threads: int, repeats: int) -> dict[str, float]:
    from urbanseg.inference.export import probe_picture

    x = probe_picture(*size)
    wall = sessions([fp32, int8], threads)
    fp32_ms, int8_ms = rotated([lambda s=s: s.run(None, {"image": x}) for s in wall], repeats, time.perf_counter)
    one = sessions([fp32, int8], 1)
    fp32_cpu, int8_cpu = rotated([lambda s=s: s.run(None, {"image": x}) for s in one], repeats, time.thread_time)
    return {"fp32": fp32_ms, "int8": int8_ms, "fp32_cpu": fp32_cpu, "int8_cpu": int8_cpu}


def accuracy(folder: Path, iters: int) -> dict:
    """Train the default model briefly on synthetic scenes, export --quantize int8, return
    the metadata's quantization entry."""
    from urbanseg.cli import main
    from urbanseg.inference.metadata import OnnxMetadata, read_entry

    raw, prepared, shards, run = (folder / n for n in ("raw", "prepared", "shards", "run"))
    steps = [
        ["synth", "--out", str(raw), "--train", "64", "--val", "16", "--size", "512x256", "--seed", "1"],
        ["prepare", "--data", str(raw), "--out", str(prepared), "--labels", "categories8", "--size", "256x128"],
        ["pack", "--prepared", str(prepared), "--out", str(shards), "--shards", "2"],
        ["train", "--data", str(shards), "--run", str(run), "--iters", str(iters), "--batch-size", "8"],
        ["export", "--run", str(run), "--quantize", "int8"],
    ]
    for argv in steps:
        if main(argv) != 0:
            raise SystemExit(f"`urbanseg {' '.join(argv)}` failed")
    q = OnnxMetadata.parse(read_entry(run / "best.int8.onnx"), run / "best.int8.onnx").quantization
    assert q is not None
    return q.to_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--sizes", nargs="+", default=["512x256", "2048x1024"])
    parser.add_argument("--classes", type=int, default=0, help="head size; 0: the default label set's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--train-iters", type=int, default=300, help="0: skip the accuracy part")
    args = parser.parse_args()
    from urbanseg.config import parse_size

    sizes = [parse_size(s, "--sizes") for s in args.sizes]
    if not args.classes:
        from urbanseg.labels import DEFAULT_LABEL_SET, get_label_set

        args.classes = get_label_set(DEFAULT_LABEL_SET).num_classes
    print(f"{args.classes} classes, {args.threads} threads, median of {args.repeats} rounds")
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        os.chdir(tmp)  # ONNX tooling writes into the working directory: let it be this one
        try:
            head = f"fp32 ms ({args.threads} thr) | int8 ms | speed-up | fp32 CPU ms (1 thr) | int8 | speed-up"
            print(f"| model | size | {head} |")
            print("|-|-|-|-|-|-|-|-|")
            for name in args.models:
                fp32, int8, did = export_pair(name, Path(tmp), args.classes)
                for size in sizes:
                    r = speed(fp32, int8, size, args.threads, args.repeats)
                    print(
                        f"| {name} | {size[0]}x{size[1]} | {r['fp32']:.1f} | {r['int8']:.1f} | "
                        f"{r['fp32'] / r['int8']:.2f}x | {r['fp32_cpu']:.1f} | {r['int8_cpu']:.1f} | "
                        f"{r['fp32_cpu'] / r['int8_cpu']:.2f}x |",
                        flush=True,
                    )
                done = ", ".join(f"{k} {len(v) if isinstance(v, list) else v}" for k, v in did.items())
                print(f"  ({name}: {done})")
            if args.train_iters:
                q = accuracy(Path(tmp), args.train_iters)
                print(
                    f"\naccuracy, {DEFAULT_MODELS[0]} after {args.train_iters} steps on synthetic scenes (256x128): "
                    f"val mIoU fp32 {q['miou_fp32']:.4f} -> int8 {q['miou_int8']:.4f} "
                    f"(change {q['miou_int8'] - q['miou_fp32']:+.4f}) on {q['val_images']} images; "
                    f"argmax agreement {q['agreement']:.2%}; calibrated on {q['calibration_images']} "
                    f"{q['calibration_split']} images"
                )
        finally:
            os.chdir(cwd)
    return 0


if __name__ == "__main__":
    sys.exit(main())

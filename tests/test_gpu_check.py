"""benchmarks/gpu_check.sh: its syntax, its refusal without a GPU, and (slow) the whole
script on the CPU with GPU_CHECK_DEVICE=cpu, so the plumbing of every step is run here;
the GPU path itself has not run on a GPU (docs/benchmarks.md#gpu-check)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _env(**extra: str) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_without_a_gpu_it_stops_with_a_message(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=_env(GPU_CHECK_OUT=str(tmp_path)), timeout=120
    )
    assert done.returncode == 1 and "no CUDA GPU is visible" in done.stderr and "GPU_CHECK_DEVICE=cpu" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing made before the check


@pytest.mark.slow
def test_every_step_finishes_on_the_cpu(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        env=_env(GPU_CHECK_DEVICE="cpu", GPU_CHECK_OUT=str(tmp_path)),
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("every step finished", 1)[1]
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", table, re.M))
    for step in (
        "train --amp off --channels-last",
        "torchrun x1 --sync-bn --amp off --channels-last",
        "evaluate",
        "evaluate --tta flip --scales 0.75,1,1.25",
        "predict --split val",
        "ONNX Runtime CPUExecutionProvider (session.run)",
        "predict --model best.onnx",
    ):
        assert re.match(r"\d+\.\d images/s", rows[step]), (step, rows.get(step))
    assert rows["train --compile"] == "skipped on the CPU"
    for run in ("run-amp", "run-torchrun"):
        assert (tmp_path / run / "best.pt").is_file()
    assert len(list((tmp_path / "predict").glob("*.png"))) == 4 == len(list((tmp_path / "predict-onnx").glob("*.png")))

"""A run killed with SIGKILL at an arbitrary moment and resumed ends with the same
weights, bit for bit, as a run never interrupted (CPU, --deterministic).

Real subprocesses (`python -m urbanseg train`), real kills: at a random step plus a random
delay (seeded), twice in one run, and in the middle of writing last.pt.
"""

import csv
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers.training import run_cli, saved_step, subprocess_env, train_args

pytestmark = pytest.mark.slow

TOTAL = 20  # 11 images / batch 4 = 2 steps per epoch: the kills land mid-epoch and on epoch ends
# --log-every 3 with a save every step: kills land inside a logging window, whose losses
# must be carried over (the row after a resume averaged only the steps after it)
EXTRA = ["--iters", str(TOTAL), "--save-every", "1", "--val-every", "5", "--lr", "0.01", "--log-every", "3"]


@pytest.fixture(scope="module")
def shards(synth_data):
    return synth_data.shards


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli(train_args(shards, run, *EXTRA))
    assert result.returncode == 0, result.stderr
    return run


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "urbanseg", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )


def _kill_after(proc: subprocess.Popen, run, step: int, delay: float) -> None:
    """SIGKILL `proc` `delay` seconds after its last.pt reaches `step`."""
    deadline = time.monotonic() + 240
    while saved_step(run / "last.pt") < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the run is too slow"
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: nothing was tested"


def _equal_nested(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal_nested(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


def _metric_rows(run):
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]


def assert_same_run(resumed, reference) -> None:
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (resumed, reference))
    assert a["step"] == b["step"] == TOTAL
    _equal_nested(a["model_state"], b["model_state"], "model_state")
    for key in ("optimizer", "scheduler", "scaler", "best_miou", "best_step", "bad_validations", "epoch"):
        _equal_nested(a["train_state"][key], b["train_state"][key], key)
    best_a, best_b = (torch.load(r / "best.pt", weights_only=True) for r in (resumed, reference))
    _equal_nested(best_a["model_state"], best_b["model_state"], "best.pt")
    # the log reads as if the run had never been interrupted: no duplicated or missing rows
    assert _metric_rows(resumed) == _metric_rows(reference)


def test_sigkill_twice_at_random_moments_then_resume_is_bit_identical(shards, reference, tmp_path):
    rng = random.Random(1234)
    run = tmp_path / "run"
    args = train_args(shards, run, *EXTRA)
    first = rng.randint(1, 8)
    _kill_after(_start(args), run, first, rng.uniform(0, 0.15))
    killed_at = saved_step(run / "last.pt")
    assert 1 <= killed_at < TOTAL
    second = rng.randint(killed_at + 2, 15)
    _kill_after(_start([*args, "--resume"]), run, second, rng.uniform(0, 0.15))
    assert saved_step(run / "last.pt") > killed_at
    result = run_cli([*args, "--resume"])
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


DIE_WHILE_SAVING = """
import io, os, signal, sys
import torch
from urbanseg.cli import main

real_save, saves = torch.save, 0

def save_half_then_die(obj, f, *args, **kwargs):
    global saves
    if isinstance(obj, dict) and "train_state" in obj:
        saves += 1
        if saves == {n}:  # write half of last.pt's bytes to the temporary file, then die
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_half_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_while_writing_last_pt_keeps_the_previous_one(shards, reference, tmp_path):
    run = tmp_path / "run"
    args = train_args(shards, run, *EXTRA)
    n = 7  # the 7th last.pt write (step 7) dies half-way
    proc = subprocess.run(
        [sys.executable, "-c", DIE_WHILE_SAVING.replace("{n}", str(n)), *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = list(run.glob(".last.pt.*.tmp*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written file
    with pytest.raises((RuntimeError, EOFError)):  # a cut zip archive: not loadable
        torch.load(leftovers[0], weights_only=True)
    assert saved_step(run / "last.pt") == n - 1  # the rename never happened: the previous state is intact
    result = run_cli([*args, "--resume"])
    assert result.returncode == 0, result.stderr
    assert not list(run.glob(".last.pt.*.tmp*"))  # resume cleans up
    assert_same_run(run, reference)


FREEZE = ["--iters", "8", "--save-every", "1", "--val-every", "4", "--lr", "0.01", "--freeze-encoder", "4"]


def test_resume_across_the_encoder_unfreeze_is_bit_identical(shards, tmp_path):
    """--freeze-encoder 4: a run killed while writing step 3's last.pt resumes from step 2,
    crosses the unfreeze at step 4 and ends as the uninterrupted run does, bit for bit. The
    optimizer saw the encoder for 4 steps only (AdamW's per-parameter step counts)."""
    reference = tmp_path / "reference"
    done = run_cli(train_args(shards, reference, *FREEZE))
    assert done.returncode == 0, done.stderr
    assert "encoder frozen until step 4" in done.stderr and "step 4: encoder unfrozen" in done.stderr
    run = tmp_path / "run"
    args = train_args(shards, run, *FREEZE)
    proc = subprocess.run(
        [sys.executable, "-c", DIE_WHILE_SAVING.replace("{n}", "3"), *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert saved_step(run / "last.pt") == 2
    result = run_cli([*args, "--resume"])
    assert result.returncode == 0, result.stderr
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (run, reference))
    assert a["step"] == b["step"] == 8
    _equal_nested(a["model_state"], b["model_state"], "model_state")
    _equal_nested(a["train_state"]["optimizer"], b["train_state"]["optimizer"], "optimizer")
    steps = {float(s["step"]) for s in b["train_state"]["optimizer"]["state"].values()}
    assert steps == {4.0, 8.0}  # encoder: steps 4..7; everything else: 0..7
    assert _metric_rows(run) == _metric_rows(reference)

"""`torchrun --nproc_per_node=2 -m urbanseg train` on the CPU (gloo): one run folder written
by rank 0, the same number of steps and (without batch norm or augmentation, so a
process's mean loss is the global mean's share) the same weights as one process with the
same global batch. 11 training and 5 validation images: the split is uneven on purpose.
A torchrun job killed with SIGKILL and resumed under torchrun ends bit-identical to an
uninterrupted job."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers.training import run_cli, saved_step, subprocess_env
from urbanseg.training.runlog import read_metrics

pytestmark = pytest.mark.slow

# no batch norm: per-process batch statistics would differ from the single-process ones
MODEL = ["--model", "unet-original", "--model-args", json.dumps({"base_channels": 4, "batch_norm": False})]


def _args(shards, run):
    return [
        "train",
        "--data",
        str(shards),
        "--run",
        str(run),
        *MODEL,
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--no-augment",
        "--lr",
        "0.01",
        "--log-every",
        "1",
        "--deterministic",
    ]


def test_two_processes_match_one_process(synth_data, tmp_path):
    shards = synth_data.shards
    single = run_cli(_args(shards, tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    # `--`: torchrun's parser would otherwise take our --run for an abbreviation of its --run-path
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "urbanseg",
        "--",
        *_args(shards, tmp_path / "ddp"),
    ]
    ddp = subprocess.run(torchrun, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run = tmp_path / "ddp"
    assert len(list((run / "tb").iterdir())) == 1  # rank 0 alone writes
    assert ddp.stdout.count("training done at step") == 1
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in ("single", "ddp"))
    assert a["step"] == b["step"] == 4  # floor(11 / 4) = 2 steps per epoch either way
    assert len(b["train_state"]["rng"]) == 2 and b["train_state"]["world_size"] == 2
    for k, v in a["model_state"].items():
        # the same global batches; only the order of float additions differs
        torch.testing.assert_close(b["model_state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    rows = {
        r: [x for x in read_metrics(tmp_path / r / "metrics.csv") if x["split"] == "val"] for r in ("single", "ddp")
    }
    assert [x["step"] for x in rows["ddp"]] == [x["step"] for x in rows["single"]] == ["2", "4"]
    for x, y in zip(rows["single"], rows["ddp"]):  # every val image scored once: the uneven 3 + 2 split
        assert float(x["miou"]) == pytest.approx(float(y["miou"]), abs=1e-3)
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-3)


def _torchrun(args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "urbanseg",
        "--",
        *args,
    ]


def test_torchrun_killed_and_resumed_matches_uninterrupted(synth_data, tmp_path):
    """SIGKILL the whole torchrun job (launcher and both ranks) once its last.pt reached a
    step, resume with torchrun: the weights equal the uninterrupted job's, bit for bit."""
    shards = synth_data.shards

    def args(run, *extra):
        return [
            "train",
            "--data",
            str(shards),
            "--run",
            str(run),
            *MODEL,
            "--batch-size",
            "4",
            "--iters",
            "8",
            "--save-every",
            "1",
            "--val-every",
            "4",
            "--workers",
            "0",
            "--lr",
            "0.01",
            "--deterministic",
            *extra,
        ]

    ref = subprocess.run(
        _torchrun(args(tmp_path / "ref")), capture_output=True, text=True, timeout=600, env=subprocess_env()
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    job = subprocess.Popen(
        _torchrun(args(run)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while saved_step(run / "last.pt") < 3:
        assert job.poll() is None, "the job ended before step 3: nothing was tested"
        assert time.monotonic() < deadline, "the job is too slow"
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)  # launcher and ranks alike
    job.wait()
    killed_at = saved_step(run / "last.pt")
    assert 3 <= killed_at < 8, killed_at
    resumed = subprocess.run(
        _torchrun(args(run, "--resume")), capture_output=True, text=True, timeout=600, env=subprocess_env()
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (tmp_path / "ref", run))
    assert a["step"] == b["step"] == 8
    for k, v in a["model_state"].items():
        assert torch.equal(b["model_state"][k], v), k


# Run by torchrun in place of `-m urbanseg`: the command, then the names of the threads still
# running in this process once it returned (Linux: /proc/self/task/*/comm).
THREADS_AT_EXIT = """
import os, sys
from urbanseg.cli import main
code = main(sys.argv[2:] if sys.argv[1:2] == ["--"] else sys.argv[1:])
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print(f"rank {os.environ['RANK']} threads at exit: {' '.join(names)}", flush=True)
sys.exit(code)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists the threads through /proc (Linux)")
def test_freeze_encoder_under_torchrun_matches_one_process(synth_data, tmp_path):
    """--freeze-encoder 2 of 4 steps under torchrun: exit 0 and the weights of one process;
    DDP hands the frozen encoder no gradient (not a zero one), so AdamW saw it for 2 steps
    only, as in one process. No gloo thread outlives `urbanseg train` in either rank: one
    still running at interpreter shutdown aborted a rank now and then ('terminate called
    without an active exception'; see distributed.setup)."""
    args = [*_args(synth_data.shards, tmp_path / "single"), "--freeze-encoder", "2"]
    single = run_cli(args)
    assert single.returncode == 0, single.stderr
    script = tmp_path / "threads_at_exit.py"
    script.write_text(THREADS_AT_EXIT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    args = ["--", *_args(synth_data.shards, tmp_path / "ddp"), "--freeze-encoder", "2"]  # `--`: see above
    ddp = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count("encoder frozen until step 2") == 1 and ddp.stderr.count("step 2: encoder unfrozen") == 1
    threads = [line for line in ddp.stdout.splitlines() if "threads at exit:" in line]
    assert len(threads) == 2 and not [line for line in threads if "gloo" in line], threads
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in ("single", "ddp"))
    assert a["step"] == b["step"] == 4
    for k, v in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for ckpt in (a, b):  # encoder: steps 2..3; everything else: 0..3
        assert {float(s["step"]) for s in ckpt["train_state"]["optimizer"]["state"].values()} == {2.0, 4.0}


def test_torchrun_refused_run_folder_is_one_message_per_rank(synth_data, tmp_path):
    """Rank 0 alone checks and locks --run; when it refuses a folder (a user's), every rank
    says so in one line: rank 1 used to die in the next collective with a gloo traceback."""
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    result = subprocess.run(
        _torchrun(_args(synth_data.shards, run)), capture_output=True, text=True, timeout=600, env=subprocess_env()
    )
    assert result.returncode != 0
    assert "was not written by `urbanseg train`" in result.stderr
    assert "the main process (rank 0) could not take it" in result.stderr
    # (torchrun's own ChildFailedError report follows: the launcher's, not urbanseg's)
    assert "[rank1]:" not in result.stderr and "Connection closed" not in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]

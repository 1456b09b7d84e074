"""`torchrun --nproc_per_node=2 -m urbanseg train` on the CPU (gloo): one run folder written
by rank 0, the same number of steps and (without batch norm or augmentation, so a
process's mean loss is the global mean's share) the same weights as one process with the
same global batch. 11 training and 5 validation images: the split is uneven on purpose."""

import json
import subprocess
import sys

import pytest
import torch
from train_fixtures import make_shards, run_cli, subprocess_env

from urbanseg.runlog import read_metrics

pytestmark = pytest.mark.slow

# no batch norm: per-process batch statistics would differ from the single-process ones
MODEL = ["--model", "unet-original", "--model-args", json.dumps({"base_channels": 4, "batch_norm": False})]


def _args(shards, run):
    return ["train", "--data", str(shards), "--run", str(run), *MODEL, "--batch-size", "4", "--epochs", "2",
            "--workers", "0", "--no-augment", "--lr", "0.01", "--log-every", "1", "--deterministic"]


def test_two_processes_match_one_process(tmp_path):
    shards = make_shards(tmp_path)
    single = run_cli(_args(shards, tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    # `--`: torchrun's parser would otherwise take our --run for an abbreviation of its --run-path
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "urbanseg", "--", *_args(shards, tmp_path / "ddp")]
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
    rows = {r: [x for x in read_metrics(tmp_path / r / "metrics.csv") if x["split"] == "val"]
            for r in ("single", "ddp")}
    assert [x["step"] for x in rows["ddp"]] == [x["step"] for x in rows["single"]] == ["2", "4"]
    for x, y in zip(rows["single"], rows["ddp"]):  # every val image scored once: the uneven 3 + 2 split
        assert float(x["miou"]) == pytest.approx(float(y["miou"]), abs=1e-3)
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-3)

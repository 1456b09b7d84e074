"""`urbanseg train` end to end on tiny shards (64x32, a 4-channel U-Net), its errors, the
Ctrl-C and NaN paths, and the pieces: schedules, resume rules, the run log."""

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers.training import make_shards, run_cli, subprocess_env, train_args
from helpers.worlds import writable_copy
from urbanseg.cli import main
from urbanseg.config import TrainConfig
from urbanseg.rundir import RunDir
from urbanseg.training.loop import augment_settings
from urbanseg.training.resume import load_run_config, merge_for_resume, rng_state, set_rng_state
from urbanseg.training.runlog import RunLog, read_metrics
from urbanseg.training.train import build_optimizer


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """train() sets the thread count and deterministic mode for its process: undo it here."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def shards(synth_data):
    return synth_data.shards


@pytest.fixture(scope="module")
def trained(trained_run):
    """One finished run: 3 epochs of 2 steps, validated every epoch (shared, read-only)."""
    return trained_run


def test_run_folder_tells_how_it_was_made(trained, shards):
    expected = {"config.yaml", "best.pt", "last.pt", "metrics.csv", "tb", "curves.png"}
    assert {p.name for p in trained.iterdir()} >= expected
    config = load_run_config(trained)
    assert config.model == "unet-original" and config.lr == 0.01 and config.epochs == 3 and config.data == shards
    rows = read_metrics(trained / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [int(r["step"]) for r in rows if r["split"] == "val"] == [2, 4, 6]  # one validation per epoch
    assert all(0 <= float(r["miou"]) <= 1 for r in rows if r["split"] == "val")
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/miou")] == [2, 4, 6]
    assert len(events.Scalars("train/loss")) == 6 and "val_iou/vehicle" in events.Tags()["scalars"]


def test_config_records_the_shards_folder_absolute(shards, tmp_path, monkeypatch):
    """`--data` relative to the folder train ran in is saved absolute: evaluate, predict
    and export `--run` find the shards from anywhere."""
    shutil.copytree(shards, tmp_path / "shards")
    monkeypatch.chdir(tmp_path)
    assert main(train_args(Path("shards"), Path("runs/r"), "--iters", "1")) == 0
    saved = yaml.safe_load((tmp_path / "runs/r/config.yaml").read_text())
    assert saved["data"] == str(tmp_path / "shards") and saved["run"] == "runs/r"
    monkeypatch.chdir(tmp_path / "runs")
    assert RunDir("r").data == tmp_path / "shards"


def test_checkpoints_are_self_describing_and_load_weights_only(trained):
    from urbanseg.checkpoint import REQUIRED_KEYS, model_from_checkpoint

    last = torch.load(trained / "last.pt", weights_only=True)
    best = torch.load(trained / "best.pt", weights_only=True)
    for ckpt in (last, best):
        assert set(REQUIRED_KEYS) <= set(ckpt)
        assert ckpt["model"] == {"name": "unet-original", "kwargs": {"num_classes": 8, "base_channels": 4}}
        assert ckpt["input_size"] == [64, 32] and ckpt["label_set"]["name"] == "categories8"
        assert ckpt["normalization"]["mean"] == pytest.approx([123.675, 116.28, 103.53])
        assert ckpt["config"]["model"] == "unet-original"
    ts = last["train_state"]
    assert last["step"] == 6 and last["epoch"] == 3 and ts["step_in_epoch"] == 0
    # the format older last.pt files have (--resume reads these keys), plus the logging
    # window's losses (absent from older files: they start an empty window)
    assert set(ts) - {"loss_sum", "loss_steps"} == {
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "world_size",
        "step",
        "epoch",
        "step_in_epoch",
        "best_miou",
        "best_step",
        "bad_validations",
        "samples_in_epoch",
    }
    assert "train_state" not in best and best["step"] == ts["best_step"]
    assert best["metrics"]["miou"] == pytest.approx(ts["best_miou"])
    model = model_from_checkpoint(best)
    assert model(torch.zeros(1, 3, 32, 64)).shape == (1, 8, 32, 64)


def test_it_learns(shards, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            train_args(
                shards, run, "--iters", "16", "--lr", "0.02", "--val-every", "16", "--no-augment", deterministic=False
            )
        )
        == 0
    )
    losses = [float(r["loss"]) for r in read_metrics(run / "metrics.csv") if r["split"] == "train"]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < 0.75 * losses[0]  # ~0.65 measured


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "no-such-net"], "unknown model 'no-such-net'; valid names: unet-original"),
        (["--batch-size", "12"], "--batch-size 12 is larger than the train split (11 images"),
        (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
        (["--model-args", "[1]"], "--model-args '[1]' is not a JSON object"),
        (["--epochs", "2", "--iters", "3"], "give --epochs or --iters, not both"),
        (["--iters", "0"], "--iters 0 must be >= 1"),
        (["--crop", "100000x50000"], "--crop 100000x50000 at --batch-size 4 (inputs and logits alone"),
        (["--crop", "300x100"], "--crop 300x100 is more than twice the training images"),
        (["--resume"], "config.yaml not found"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(shards, tmp_path, capsys, extra, message):
    assert main(train_args(shards, tmp_path / "run", "--iters", "1", *extra, deterministic=False)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_epochs_0_is_refused_and_nothing_is_written(shards, tmp_path, capsys):
    assert main(train_args(shards, tmp_path / "run", "--epochs", "0", deterministic=False)) == 2
    assert "--epochs 0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_memory_is_refused_before_any_work(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(shards, run, "--iters", "1", "--crop", "100000x50000", deterministic=False)) == 2
    err = capsys.readouterr().err
    # the estimate, the machine's memory and the fix
    assert "needs about" in err and " GB of memory, but this machine has " in err and " GB in all)" in err
    assert "use a smaller --crop (about 64x32 at most at this batch size)" in err  # the data's size: it fits
    assert not run.exists()


def test_a_crop_larger_than_the_data_warns_once(shards, tmp_path, capsys):
    assert main(train_args(shards, tmp_path / "run", "--iters", "1", "--crop", "96x24", deterministic=False)) == 0
    err = capsys.readouterr().err
    assert err.count("warning: --crop 96x24 is larger than the training images (64x32 in ") == 1
    assert "use --crop 64x24 or smaller" in err


def test_a_corrupt_shard_stops_before_step_1_and_the_run_restarts_after_repacking(small_synth_data, tmp_path, capsys):
    from helpers.training import repack
    from urbanseg.data.tfrecord import read_index

    root = writable_copy(small_synth_data.root, tmp_path / "data")  # the shard is damaged below
    shards = root / small_synth_data.shards.name
    shard = shards / "val" / "00001-of-00002.tfrecord"
    offset = int(read_index(shard)[0, 0]) + 100  # inside the first record's data
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    run = tmp_path / "run"
    args = train_args(shards, run, "--iters", "2", deterministic=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{shard}: record 0 at byte offset 0: data CRC mismatch" in err and "re-run `urbanseg pack`" in err
    assert f"Found by checking every record before the first step: nothing was written to {run}" in err
    assert "Traceback" not in err
    assert not run.exists()  # nothing written: the same command can run again
    repack(root, shards)
    assert main(args) == 0
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2


def test_ctrl_c_before_the_first_validation_reports_only_last_pt(shards, tmp_path, capsys, monkeypatch):
    """The real signal handler: SIGINT arrives during step 1, training stops after step 2."""
    import os

    from urbanseg.training import loop

    real_step = loop.train_step

    def step_then_interrupt(t, batch, stop_requested):
        if not stop_requested:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(t, batch, stop_requested)

    monkeypatch.setattr(loop, "train_step", step_then_interrupt)
    run = tmp_path / "run"
    assert main(train_args(shards, run, "--iters", "10", "--val-every", "5", deterministic=False)) == 130
    out = capsys.readouterr().out
    assert f"training interrupted at step 2/10; no validation yet; state -> {run / 'last.pt'}" in out
    assert "best" not in out and not (run / "best.pt").exists()
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2


def test_missing_or_incomplete_shards_exit_2(shards, tmp_path, capsys):
    assert main(train_args(tmp_path / "nothing", tmp_path / "run", deterministic=False)) == 2
    assert "nothing/train/spec.json not found" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train").symlink_to(shards / "train")
    assert main(train_args(partial, tmp_path / "run", deterministic=False)) == 2
    assert "partial/val/spec.json not found" in capsys.readouterr().err


def test_existing_run_needs_resume_and_resume_keeps_the_config(trained, shards, capsys):
    assert main(train_args(shards, trained, "--epochs", "3", deterministic=False)) == 2
    assert "already holds a training run; continue it with --resume" in capsys.readouterr().err
    assert main(train_args(shards, trained, "--resume", "--lr", "0.5", deterministic=False)) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5 (the run has 0.01)" in err and "--init" in err
    # a typed flag with its default value differs from the run's all the same (it was ignored)
    default_batch = TrainConfig(data=shards, run=trained).batch_size
    assert default_batch != 4  # the run's (train_args)
    args = train_args(shards, trained, "--resume", deterministic=False)
    for flag in ("--batch-size", "--batch"):  # argparse takes the abbreviation too
        assert main([*args, flag, str(default_batch)]) == 2
        assert f"--batch-size {default_batch} (the run has 4)" in capsys.readouterr().err


def test_a_run_in_progress_is_named_not_called_finished(trained, shards, tmp_path, capsys):
    """A second `train` on a run another process is training: the message names that
    process (the folder's lock), not "already holds a training run; use --resume"."""
    from urbanseg.outputs import claim

    run = writable_copy(trained, tmp_path / "run")
    with claim(run, "train"):
        assert main(train_args(shards, run, "--epochs", "3", deterministic=False)) == 2
        assert "is in use by `urbanseg train` (PID" in capsys.readouterr().err
    assert main(train_args(shards, run, "--epochs", "3", deterministic=False)) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_merge_for_resume_takes_saved_values_and_allowed_overrides(trained, shards):
    given = TrainConfig(data=shards, run=trained, resume=True, workers=5, lr=0.01, batch_size=4)
    merged = merge_for_resume(given)
    assert merged.workers == 5 and merged.resume and merged.epochs == 3 and merged.model == "unet-original"


def test_init_with_other_classes_gets_a_new_head(trained, shards, tmp_path, capsys):
    from urbanseg.checkpoint import load_checkpoint
    from urbanseg.labels import get_label_set
    from urbanseg.models import create_model
    from urbanseg.training.train import load_init_weights

    source = load_checkpoint(trained / "best.pt")["model_state"]
    seven = get_label_set("categories7")
    model = create_model("unet-original", 7, base_channels=4)
    load_init_weights(model, trained / "best.pt", seven, new_head=False)
    for k, v in model.state_dict().items():
        if k.startswith(model.head_prefixes):
            assert v.shape[0] == 7 and source[k].shape[0] == 8
        else:
            assert torch.equal(v, source[k]), k
    # same count, other classes: an error unless --new-head
    renamed = tmp_path / "renamed.pt"
    ckpt = load_checkpoint(trained / "best.pt")
    ckpt["label_set"]["classes"] = [c.upper() for c in ckpt["label_set"]["classes"]]
    torch.save(ckpt, renamed)
    assert (
        main(
            train_args(
                shards,
                tmp_path / "run",
                "--init",
                str(renamed),
                "--model",
                "unet-original",
                "--iters",
                "1",
                deterministic=False,
            )
        )
        == 2
    )
    assert "same count, different classes. Pass --new-head" in capsys.readouterr().err
    eight = create_model("unet-original", 8, base_channels=4)
    fresh_head = {k: v.clone() for k, v in eight.state_dict().items() if k.startswith(eight.head_prefixes)}
    load_init_weights(eight, renamed, get_label_set("categories8"), new_head=True)
    for k, v in eight.state_dict().items():
        assert torch.equal(v, fresh_head[k] if k in fresh_head else source[k]), k


def test_init_end_to_end_on_a_seven_class_dataset(trained, small_synth_data, tmp_path, capsys):
    shards7 = make_shards(tmp_path, labels="categories7", raw=small_synth_data.raw)
    run = tmp_path / "ft"
    assert main(train_args(shards7, run, "--init", str(trained / "best.pt"), "--iters", "2", deterministic=False)) == 0
    assert "new 7-class head" in capsys.readouterr().err
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["model"]["kwargs"] == {"num_classes": 7, "base_channels": 4}
    assert ckpt["config"]["init"] == str(trained / "best.pt")


def test_resume_of_an_init_run_needs_no_init_file(trained, shards, tmp_path, monkeypatch):
    """last.pt holds the weights a resume continues from: the --init file may be gone, and
    its relative path (saved absolute) does not tie the run to the folder train ran in."""
    shutil.copy(trained / "best.pt", tmp_path / "init.pt")
    monkeypatch.chdir(tmp_path)
    args = train_args(Path("shards-link"), Path("run"), "--init", "init.pt", "--iters", "2", deterministic=False)
    (tmp_path / "shards-link").symlink_to(shards)
    assert main(args) == 0
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["init"] == str(tmp_path / "init.pt")
    (tmp_path / "init.pt").unlink()
    before = torch.load(tmp_path / "run/last.pt", weights_only=True)["model_state"]
    assert main(train_args(Path("shards-link"), Path("run"), "--resume", deterministic=False)) == 0
    after = torch.load(tmp_path / "run/last.pt", weights_only=True)["model_state"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # finished: continued from last.pt as it was


def test_non_finite_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(shards, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        train_args(
            shards, run, "--iters", "20", "--optimizer", "sgd", "--lr", "1e12", "--save-every", "1", deterministic=False
        )
    )
    err = capsys.readouterr().err
    assert code == 3, err
    assert "the training loss is nan" in err or "the training loss is inf" in err or "overflowed" in err
    assert "keeps the last good state" in err and "Traceback" not in err
    last = torch.load(run / "last.pt", weights_only=True)
    failed_at = int(err.split(" at step ")[1].split(";")[0])
    assert 1 <= last["step"] < failed_at
    assert all(torch.isfinite(v).all() for v in last["model_state"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize(
    "how,workers",
    [("ctrl-c", "0"), ("sigterm-to-group", "2")],  # the group: what timeout(1), Slurm and systemd send
)
def test_ctrl_c_saves_last_pt_and_exits_cleanly_then_resume_finishes(shards, tmp_path, how, workers):
    """Ctrl-C, or SIGTERM to the whole process group (the loader's workers too: they
    leave the stop to the trainer, which used to crash on their death and save nothing)."""
    run = tmp_path / "run"
    args = train_args(shards, run, "--iters", "60", "--val-every", "1000", "--workers", workers)
    proc = subprocess.Popen(
        [sys.executable, "-m", "urbanseg", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while len(read_metrics(run / "metrics.csv")) < 3:  # a few steps in
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    if how == "ctrl-c":
        proc.send_signal(signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert err.count("stopping after this step") == 1, err
    assert proc.returncode == 130, err
    assert "stopping after this step and saving last.pt" in err and "Traceback" not in err
    assert "training interrupted at step" in out and "--resume" in out
    assert "best.pt" not in out and not (run / "best.pt").exists()  # --val-every 1000: not validated yet
    step = torch.load(run / "last.pt", weights_only=True)["step"]
    assert 3 <= step < 60
    rows = read_metrics(run / "metrics.csv")
    assert int(rows[-1]["step"]) == step
    result = run_cli([*args, "--resume"])
    assert result.returncode == 0, result.stderr
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 60
    assert [int(r["step"]) for r in read_metrics(run / "metrics.csv") if r["split"] == "train"] == list(range(1, 61))


def test_trainer_state_dict_round_trips(shards, tmp_path):
    """load_state_dict(state_dict()) puts weights, optimizer, scheduler and scaler back
    exactly, after a step has changed them all."""
    import copy

    from urbanseg.training.distributed import DistInfo
    from urbanseg.training.loop import make_loader, train_step
    from urbanseg.training.train import resolve_config, setup
    from urbanseg.training.trainer import LoopState

    config = resolve_config(
        TrainConfig(
            data=shards,
            run=tmp_path / "run",
            model="unet-original",
            iters=4,
            model_args='{"base_channels": 4}',
            batch_size=4,
            workers=0,
        )
    )
    t = setup(config, DistInfo(), torch.device("cpu"))
    batch = next(iter(make_loader(t, "train", LoopState())))
    train_step(t, batch, False)
    saved = copy.deepcopy(t.state_dict())
    assert set(saved) == {"model", "optimizer", "scheduler", "scaler"} and saved["scheduler"]["last_epoch"] == 1
    train_step(t, batch, False)
    assert not torch.equal(t.state_dict()["model"]["net.head.weight"], saved["model"]["net.head.weight"])
    t.load_state_dict(saved)
    again = t.state_dict()
    assert again["scheduler"] == saved["scheduler"] and again["scaler"] == saved["scaler"]
    for k, v in saved["model"].items():
        assert torch.equal(again["model"][k], v), k
    for k, v in saved["optimizer"]["state"].items():
        assert all(torch.equal(again["optimizer"]["state"][k][n], x) for n, x in v.items()), k


def _factors(schedule, warmup, total=10):
    config = TrainConfig(data="d", run="r", lr=1.0, schedule=schedule, warmup=warmup, weight_decay=0.1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    opt, sched = build_optimizer(model, config, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return opt, lrs


def test_schedules_warm_up_then_decay_to_zero():
    opt, poly = _factors("poly", 0)
    assert poly == pytest.approx([(1 - s / 10) ** 0.9 for s in range(10)])
    _, cosine = _factors("cosine", 0)
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])
    _, warm = _factors("poly", 4)
    assert warm[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and warm[4] == 1.0 and warm[-1] < warm[5]
    # weight decay on conv weights only, not on biases and norm parameters
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.ndim for p in decay["params"]] == [4]
    assert no_decay["weight_decay"] == 0 and len(no_decay["params"]) == 3


def test_augment_settings():
    base = TrainConfig(data="d", run="r")
    assert augment_settings(base) == {"crop": None}
    assert augment_settings(TrainConfig(data="d", run="r", crop="32x16")) == {"crop": (32, 16)}
    assert augment_settings(TrainConfig(data="d", run="r", augment=False)) is False
    only_crop = augment_settings(TrainConfig(data="d", run="r", augment=False, crop="32x16"))
    assert only_crop["crop"] == (32, 16) and only_crop["scale"] == (1.0, 1.0) and only_crop["flip"] == 0


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.save({"rng": rng_state()}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_run_log_drops_rows_and_events_after_the_resumed_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, enabled=True)
    for step in range(1, 7):
        log.train(step, 0, float(step), 0.1, 10.0)
    log.close()
    time.sleep(1.1)  # a new event file name (its name holds the second)
    log = RunLog(tmp_path, enabled=True, resume_step=3)
    for step in range(4, 6):
        log.train(step, 0, 100.0 + step, 0.1, 10.0)
    log.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "1"), ("2", "2"), ("3", "3"), ("4", "104"), ("5", "105")]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1), (2, 2), (3, 3), (4, 104), (5, 105)]


def test_training_options_run_end_to_end(shards, tmp_path):
    """The less common flags together: bf16 autocast, channels-last, Lovasz + weighted OHEM
    cross-entropy, SGD with warm-up and cosine decay, clipping, random crops."""
    run = tmp_path / "run"
    assert (
        main(
            train_args(
                shards,
                run,
                "--iters",
                "3",
                "--amp",
                "bf16",
                "--channels-last",
                "--loss",
                "ce+lovasz",
                "--class-weights",
                "median",
                "--ohem",
                "--optimizer",
                "sgd",
                "--schedule",
                "cosine",
                "--warmup",
                "1",
                "--clip-grad",
                "1.0",
                "--crop",
                "32x16",
                "--patience",
                "1",
                "--val-every",
                "1",
                deterministic=False,
            )
        )
        == 0
    )
    rows = read_metrics(run / "metrics.csv")
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    # patience 1: stops at the first validation that is not better than the best
    last = torch.load(run / "last.pt", weights_only=True)
    ts = last["train_state"]
    assert ts["bad_validations"] <= 1 and (last["step"] == 3 or ts["bad_validations"] == 1)

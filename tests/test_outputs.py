"""Output folders (`urbanseg.outputs`) and write failures, for every command that writes:
a folder urbanseg did not write is left exactly as it was, one run at a time per folder
(with real processes and a real SIGKILL), a read-only folder and a full disk are exit 2
naming the path, worker processes die with their parent; plus the shared helpers
(write_if_changed, temporary names) and train's restart of a run without checkpoints."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers.mounts import fill, read_only, small_disk
from helpers.training import run_cli, saved_step, subprocess_env, train_args
from urbanseg import outputs, util
from urbanseg.cli import describe_os_error, main
from urbanseg.errors import UserError
from urbanseg.outputs import LOCK, MARKER

WRITING = ["synth", "prepare", "pack", "train", "evaluate", "predict", "predict-split", "export", "demo"]
FOLDERS = [c for c in WRITING if c != "export"]  # export writes one file: no folder, no lock


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """train() sets the thread count and deterministic mode for its process: undo it here."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def world(synth_data, trained_run, read_only_worlds, tmp_path_factory) -> dict[str, Path]:
    """What the commands read: raw scenes, prepared pairs, shards, a finished run (shared),
    a photo; all read-only."""
    root = tmp_path_factory.mktemp("world")
    run = trained_run
    image = root / "photo.png"
    Image.fromarray((torch.rand(24, 40, 3) * 255).to(torch.uint8).numpy()).save(image)
    read_only_worlds.protect("test_outputs world", root)
    return {
        "raw": synth_data.raw,
        "prepared": synth_data.prepared,
        "shards": synth_data.shards,
        "run": run,
        "ckpt": run / "best.pt",
        "image": image,
    }


def invocation(name: str, world: dict[str, Path], base: Path) -> tuple[list[str], Path]:
    """The command line of `name` writing under `base`, and the folder (or file) it writes."""
    out = base / "out"
    if name == "evaluate":  # writes RUN/eval/SPLIT: a copy of the run under `base`
        run = base / "run"
        shutil.copytree(world["run"], run)
        return ["evaluate", "--run", str(run)], run / "eval" / "val"
    args = {
        "synth": [
            "synth",
            "--out",
            out,
            "--train",
            "1",
            "--val",
            "0",
            "--test",
            "0",
            "--size",
            "64x32",
            "--workers",
            "1",
        ],
        "prepare": ["prepare", "--data", world["raw"], "--out", out, "--size", "32x16", "--workers", "1"],
        "pack": ["pack", "--prepared", world["prepared"], "--out", out, "--shards", "1"],
        "train": train_args(world["shards"], out, "--iters", "1", deterministic=False),
        # --engine torch: `auto` would cache an ONNX export beside the shared (read-only) checkpoint
        "predict": [
            "predict",
            "--checkpoint",
            world["ckpt"],
            "--input",
            world["image"],
            "--out",
            out,
            "--engine",
            "torch",
        ],
        "predict-split": [
            "predict",
            "--checkpoint",
            world["ckpt"],
            "--data",
            world["shards"],
            "--split",
            "val",
            "--num",
            "1",
            "--out",
            out,
            "--engine",
            "torch",
        ],
        "export": ["export", "--checkpoint", world["ckpt"], "--out", out / "model.onnx"],
        "demo": ["demo", "--quick", "--out", out],
    }[name]
    return [str(a) for a in args], out / "model.onnx" if name == "export" else out


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (and `root` itself): kind, bytes, mode and mtime."""
    entries = {".": (True, None, root.stat().st_mode, root.stat().st_mtime_ns)}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        entries[str(p.relative_to(root))] = (
            p.is_dir(),
            None if p.is_dir() else p.read_bytes(),
            st.st_mode,
            st.st_mtime_ns,
        )
    return entries


def foreign_folder(folder: Path) -> None:
    """A user's folder: photos with a file named like predict's output, their own
    metrics.csv/curves.png/config.yaml, and train/ and val/ folders (as leftImg8bit/ has)."""
    for split in ("train", "val"):
        (folder / split / "city").mkdir(parents=True)
        Image.new("RGB", (8, 4), "red").save(folder / split / "city" / f"{split}.png")
    Image.new("RGB", (8, 4), "blue").save(folder / "a.png")
    Image.new("RGB", (8, 4), "green").save(folder / "a_overlay.png")
    Image.new("RGB", (8, 4), "white").save(folder / "curves.png")
    (folder / "metrics.csv").write_text("epoch,accuracy\n1,0.5\n")
    (folder / "config.yaml").write_text("lr: 3\nnotes: my own experiment\n")
    (folder / "notes.txt").write_text("keep me")


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------- ownership


@pytest.mark.parametrize("name", WRITING)
def test_every_command_leaves_a_folder_it_did_not_write_untouched(name, world, tmp_path, capsys):
    args, target = invocation(name, world, tmp_path)
    folder = target.parent if name == "export" else target
    folder.mkdir(parents=True, exist_ok=True)
    foreign_folder(folder)
    if name == "export":
        target.write_bytes(b"my own model, not an urbanseg export")
    before = snapshot(folder)
    assert main(args) == 2
    err = _err(capsys)
    assert f"was not written by `urbanseg {name.split('-')[0]}`" in err and str(target) in err
    assert snapshot(folder) == before


def test_pack_replaces_only_split_folders_it_wrote(world, tmp_path, capsys):
    """A pack folder (marked) holding a user's train/ (no spec.json): refused, untouched;
    pack's own split folders are replaced on a rerun."""
    out = tmp_path / "shards"
    assert main(["pack", "--prepared", str(world["prepared"]), "--out", str(out), "--splits", "val"]) == 0
    (out / "train").mkdir()
    (out / "train" / "mine.txt").write_text("keep me")
    before = snapshot(out)
    assert main(["pack", "--prepared", str(world["prepared"]), "--out", str(out)]) == 2
    assert f"split folder {out / 'train'} is not empty and was not written by `urbanseg pack`" in _err(capsys)
    assert snapshot(out) == before
    assert (
        main(["pack", "--prepared", str(world["prepared"]), "--out", str(out), "--splits", "val", "--shards", "2"]) == 0
    )
    assert len(list((out / "val").glob("*.tfrecord"))) == 2


def test_a_failed_start_leaves_no_trace_of_the_folders_it_created(tmp_path):
    """A claim that fails before anything is written removes the folders it created (and
    only those); a folder that existed, or one something was written into, stays."""
    with pytest.raises(UserError), outputs.claim(tmp_path / "runs" / "new" / "eval", "evaluate"):
        raise UserError("bad input found after the claim")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(KeyboardInterrupt), outputs.claim(tmp_path / "old", "train"):
        raise KeyboardInterrupt
    assert (tmp_path / "old").is_dir()
    with pytest.raises(UserError), outputs.claim(tmp_path / "written", "train"):
        (tmp_path / "written" / "metrics.csv").write_text("step\n")
        raise UserError("failed after writing")
    assert (tmp_path / "written" / "metrics.csv").is_file() and outputs.read_marker(tmp_path / "written") == "train"


@pytest.mark.parametrize("command", sorted(outputs.LEGACY_PROOFS))
def test_ownership_rule(command, world, tmp_path):
    """New, empty (but for the lock), marked and legacy folders may be written; a marker of
    another command, a foreign folder, or look-alike files prove nothing."""
    outputs.check_owner(tmp_path / "new", command)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOCK).write_text("")
    outputs.check_owner(tmp_path / "empty", command)
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "results.txt").write_text("")
    outputs.write_marker(marked, command)
    outputs.check_owner(marked, command)
    other = "synth" if command != "synth" else "prepare"
    with pytest.raises(UserError, match=rf"holds the output of `urbanseg {command}`"):
        outputs.check_owner(marked, other)
    legacy = {
        "synth": world["raw"],
        "prepare": world["prepared"],
        "pack": world["shards"],
        "train": world["run"],
        "evaluate": None,
        "predict": None,
        "demo": None,
    }[command]
    if legacy is not None:  # made by this release: the marker is removed to show an older folder
        copy = shutil.copytree(legacy, tmp_path / "legacy", ignore=shutil.ignore_patterns(MARKER, LOCK))
        outputs.check_owner(copy, command)
    lookalike = tmp_path / "lookalike"
    lookalike.mkdir()
    for name in ("synth_config.yaml", "config.yaml", "metrics.json", "spec.json", ".urbanseg-prepare.json"):
        (lookalike / name).write_text("{}\n")
    with pytest.raises(UserError, match=rf"not written by `urbanseg {command}`"):
        outputs.check_owner(lookalike, command)


def test_legacy_evaluation_predict_and_demo_folders_are_recognised(world, tmp_path):
    run = shutil.copytree(world["run"], tmp_path / "run", ignore=shutil.ignore_patterns(MARKER, LOCK))
    evaluation = run / "eval" / "val"
    evaluation.mkdir(parents=True)
    (evaluation / "metrics.json").write_text(
        json.dumps({"format_version": 1, "protocol": "prepared", "confusion_matrix": []})
    )
    outputs.check_owner(evaluation, "evaluate")
    pictures = run / "predict" / "val"
    pictures.mkdir(parents=True)
    (pictures / "aachen_000000_000019.png").write_bytes(b"")
    outputs.check_owner(pictures, "predict")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / ".urbanseg-demo").write_text("made by `urbanseg demo`\n")
    outputs.check_owner(tmp_path / "demo", "demo")


def test_export_replaces_its_own_file(world, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    args = ["export", "--checkpoint", str(world["ckpt"]), "--out", str(target)]
    assert main(args) == 0
    from urbanseg.inference.export import is_urbanseg_onnx

    assert is_urbanseg_onnx(target) and not is_urbanseg_onnx(world["image"])
    assert main(args) == 0


# --------------------------------------------------------------------------- one run at a time

HOLD = """
import sys, time
from urbanseg.outputs import claim
with claim(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def holder(folder: Path, command: str):
    """Another process holding `folder` for `urbanseg <command>`; SIGKILLed at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), command], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("name", FOLDERS)
def test_every_command_refuses_a_folder_in_use_until_its_holder_is_killed(name, world, tmp_path, capsys):
    args, target = invocation(name, world, tmp_path)
    command = name.split("-")[0]
    with holder(target, command) as proc:
        before = snapshot(target)
        assert main(args) == 2
        err = _err(capsys)
        assert f"{target} is in use by `urbanseg {command}` (PID {proc.pid}) since " in err
        assert "wait for it to finish or choose another folder" in err
        assert snapshot(target) == before
    # SIGKILLed: the OS released the lock; the folder is free at once
    with outputs.claim(target, command):
        pass


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with outputs.claim(tmp_path / "out", "synth"):
        pass
    assert f"cannot lock {tmp_path / 'out' / LOCK} (No locks available)" in capsys.readouterr().err
    assert outputs.read_marker(tmp_path / "out") == "synth"


SLOW = """
import sys, time
import urbanseg.data.prepare as prepare
import urbanseg.synth.writer as writer
from urbanseg.cli import main

real_make_one, real_process_pair = writer._make_one, prepare.process_pair


def slow_make_one(job):
    time.sleep(0.5)
    return real_make_one(job)


def slow_process_pair(pair, conversion, redo=False):
    time.sleep(0.5)
    return real_process_pair(pair, conversion, redo=redo)


writer._make_one, prepare.process_pair = slow_make_one, slow_process_pair
sys.exit(main(sys.argv[1:]))
"""


def test_second_synth_exits_2_naming_the_first_and_runs_once_it_was_killed(tmp_path):
    out = tmp_path / "scenes"
    args = [
        "synth",
        "--out",
        str(out),
        "--train",
        "12",
        "--val",
        "0",
        "--test",
        "0",
        "--size",
        "64x32",
        "--workers",
        "1",
    ]
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env()
    )
    try:
        deadline = time.monotonic() + 60
        while _lock_pid(out) != first.pid:
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = run_cli(args)
        assert second.returncode == 2
        assert f"is in use by `urbanseg synth` (PID {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run_cli(args)  # no stale lock: the same command completes the folder
    assert third.returncode == 0, third.stderr
    assert len(list(out.glob("leftImg8bit/train/*/*.png"))) == 12


def _lock_pid(folder: Path) -> int | None:
    try:
        return json.loads((folder / LOCK).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find the worker processes")
@pytest.mark.parametrize("command", ["synth", "prepare"])
def test_workers_exit_when_the_parent_is_killed(command, world, tmp_path):
    args = {
        "synth": [
            "synth",
            "--out",
            str(tmp_path / "o"),
            "--train",
            "20",
            "--val",
            "0",
            "--test",
            "0",
            "--size",
            "64x32",
            "--workers",
            "2",
        ],
        "prepare": [
            "prepare",
            "--data",
            str(world["raw"]),
            "--out",
            str(tmp_path / "o"),
            "--size",
            "16x8",
            "--workers",
            "2",
        ],
    }[command]
    parent = subprocess.Popen(
        [sys.executable, "-c", SLOW, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env()
    )
    try:
        deadline = time.monotonic() + 60
        while len(workers := _children(parent.pid)) < 2:
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)  # the workers are busy with their first items
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 5
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"worker processes {left} outlived their parent"


# --------------------------------------------------------------------------- write failures


@pytest.mark.parametrize("name", WRITING)
def test_every_command_reports_a_read_only_folder(name, world, tmp_path, capsys):
    base = tmp_path / "ro"
    base.mkdir()
    args, _target = invocation(name, world, base)
    with read_only(base):
        before = snapshot(base)
        assert main(args) == 2
        err = _err(capsys)
        assert "Read-only file system (EROFS)" in err and str(base) in err
        assert ".tmp" not in err  # the file asked for is named, not a random temporary
        assert "batch/s" not in err  # evaluate: refused before the long work, not after it
        assert snapshot(base) == before


@pytest.mark.parametrize("name", [n for n in WRITING if n != "evaluate"])  # evaluate writes inside its --run
def test_every_command_reports_an_output_path_it_cannot_make(name, world, tmp_path, capsys):
    """--out under a file, or where the system makes no folders (/proc): exit 2 naming the
    path, no traceback, nothing written."""
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    args, _target = invocation(name, world, blocker)
    assert main(args) == 2
    assert f"{blocker} is a file, not a folder" in _err(capsys)
    assert blocker.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["a-file"]
    args, _target = invocation(name, world, Path(f"/proc/urbanseg-test-{os.getpid()}"))
    assert main(args) == 2
    assert "/proc/urbanseg-test-" in _err(capsys)


def test_full_disk_while_training_keeps_the_last_checkpoint(world, tmp_path):
    """The disk fills up after the first last.pt (256 KiB stay free: less than a last.pt
    of 1.5 MB, enough for curves.png): the next save fails inside torch.save, exit 2 naming
    last.pt and ENOSPC in words, and the first last.pt is intact (no temporary file left)."""
    run = tmp_path / "disk" / "run"
    script = f"""
import contextlib, os, sys
import urbanseg.checkpoint as checkpoint
real, calls = checkpoint.save_checkpoint, []

def save_then_fill_the_disk(path, payload):
    real(path, payload)
    calls.append(path)
    if len(calls) == 1:
        fd = os.open({str(tmp_path / "disk" / "filler")!r}, os.O_WRONLY | os.O_CREAT)
        for chunk in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(chunk))
        os.ftruncate(fd, os.fstat(fd).st_size - (256 << 10))

checkpoint.save_checkpoint = save_then_fill_the_disk
from urbanseg.cli import main
sys.exit(main(sys.argv[1:]))
"""
    with small_disk(tmp_path / "disk", "32m"):
        args = train_args(
            world["shards"], run, "--iters", "3", "--save-every", "1", "--val-every", "3", deterministic=False
        )
        result = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, env=subprocess_env(), timeout=300
        )
        assert result.returncode == 2, result.stderr
        assert f"{run / 'last.pt'}: No space left on device (ENOSPC)" in result.stderr
        assert "Traceback" not in result.stderr and "inline_container" not in result.stderr
        assert saved_step(run / "last.pt") == 1
        assert not list(run.glob(util.temporary_glob()))


def test_full_disk_in_worker_processes_keeps_every_file_complete(tmp_path, capsys):
    out = tmp_path / "disk" / "scenes"
    with small_disk(tmp_path / "disk", "512k"):
        args = [
            "synth",
            "--out",
            str(out),
            "--train",
            "40",
            "--val",
            "0",
            "--test",
            "0",
            "--size",
            "256x128",
            "--workers",
            "2",
        ]
        assert main(args) == 2
        err = _err(capsys)
        assert "No space left on device (ENOSPC)" in err and str(out) in err
        assert not list(out.rglob(util.temporary_glob()))
        pictures = list(out.rglob("*.png"))
        assert pictures and (out / "synth_config.yaml").is_file()
        for p in pictures:
            Image.open(p).load()  # every file written is complete


def test_full_disk_is_reported_before_evaluating(world, tmp_path, capsys):
    """Also when the evaluation folder and its lock file exist already (rewriting the lock
    needs no new space: the write probe finds the full disk)."""
    disk = tmp_path / "disk"
    with small_disk(disk, "8m"):
        run = shutil.copytree(world["run"], disk / "run")
        assert main(["evaluate", "--run", str(run), "--gallery", "0"]) == 0
        fill(disk)
        capsys.readouterr()
        assert main(["evaluate", "--run", str(run)]) == 2
        err = _err(capsys)
        assert "No space left on device (ENOSPC)" in err and str(run / "eval" / "val") in err
        assert "batch/s" not in err


def test_write_errors_are_described_with_the_path_and_the_reason():
    full = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "runs/a/last.pt"))
    assert full.startswith("runs/a/last.pt: No space left on device (ENOSPC); free some space")
    assert "Read-only file system (EROFS)" in describe_os_error(OSError(errno.EROFS, "x", "out"))
    assert "Disk quota exceeded (EDQUOT)" in describe_os_error(OSError(errno.EDQUOT, "x", "out"))
    assert describe_os_error(OSError(errno.EINVAL, "x", "out")) is None  # not the user's to fix: a traceback
    assert describe_os_error(OSError("no errno")) is None


def test_torch_save_on_a_full_disk_becomes_enospc_naming_the_checkpoint(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError ("enforce fail at
    inline_container.cc"); the OSError behind it is its context."""
    from helpers.checkpoints import make_checkpoint
    from urbanseg import checkpoint

    path = make_checkpoint(tmp_path / "last.pt")
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as caught:
        make_checkpoint(path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == before and not list(tmp_path.glob(util.temporary_glob()))
    assert checkpoint._errno_in(RuntimeError("a bug")) is None


# --------------------------------------------------------------------------- shared helpers


def test_write_if_changed_keeps_an_identical_file(tmp_path):
    path = tmp_path / "a" / "f.json"
    assert util.write_if_changed(path, "one\n")
    os.utime(path, ns=(10**9, 10**9))
    assert not util.write_if_changed(path, b"one\n")
    assert path.stat().st_mtime_ns == 10**9
    assert util.write_if_changed(path, "two\n") and path.read_text() == "two\n"


def test_temporary_glob_matches_atomic_path_names(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"previous")
    (tmp_path / ".hidden.pt").write_bytes(b"a user's file")
    with util.atomic_path(tmp_path / "last.pt") as tmp:
        tmp.write_bytes(b"new")
        assert list(tmp_path.glob(util.temporary_glob("last.pt"))) == [tmp]
        assert list(tmp_path.glob(util.temporary_glob())) == [tmp]
        assert not list(tmp_path.glob(util.temporary_glob("best.pt")))
    assert not list(tmp_path.glob(util.temporary_glob()))


def test_atomic_path_names_the_file_of_a_failed_write(tmp_path):
    with pytest.raises(OSError) as caught, util.atomic_path(tmp_path / "x.bin"):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name
    assert caught.value.filename == str(tmp_path / "x.bin")


# --------------------------------------------------------------------------- train


def test_a_run_without_checkpoints_starts_again(world, tmp_path, capsys):
    """A run that stopped before its first save (e.g. a corrupt shard): the same command
    starts it again instead of refusing it, with a fresh log."""
    run = tmp_path / "run"
    args = train_args(world["shards"], run, "--iters", "2", "--val-every", "2", deterministic=False)
    assert main(args) == 0
    (run / "last.pt").unlink()
    (run / "best.pt").unlink()
    (run / ".last.pt.k2j3x9.tmp.pt").write_bytes(b"left by a killed save")
    assert main(args) == 0
    rows = [line.split(",")[:3] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert rows == [["1", "0", "train"], ["2", "1", "train"], ["2", "1", "val"]]  # each row once
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    assert saved_step(run / "last.pt") == 2 and not list(run.glob(util.temporary_glob()))
    assert main(args) == 2  # with a checkpoint: only --resume continues it
    assert "already holds a training run; continue it with --resume" in _err(capsys)

"""The memory bounds checked before any work: synth and prepare refuse sizes whose estimate
exceeds the available memory, with the estimate, the machine's memory and a fix that fits
(train's bound: tests/test_train.py)."""

import pytest

from urbanseg import memory
from urbanseg.cli import main
from urbanseg.errors import UserError


def _suggested_size(err: str) -> tuple[int, int]:
    w, h = err.split("a smaller --size (about ")[1].split(" at most")[0].split("x")
    return int(w), int(h)


def test_synth_refuses_a_size_beyond_memory_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "synth"
    assert (
        main(["synth", "--out", str(out), "--size", "100000x50000", "--train", "3", "--val", "0", "--workers", "2"])
        == 2
    )
    err = capsys.readouterr().err
    per_scene = memory.SYNTH_BYTES_PER_PIXEL * 100000 * 50000
    assert (
        f"--size 100000x50000 with 2 worker(s) ({memory.gb(per_scene)} per scene) needs about "
        f"{memory.gb(2 * per_scene)} of memory, but this machine has " in err
    )
    assert f"({memory.gb(memory.total_bytes())} in all)" in err and "Traceback" not in err
    w, h = _suggested_size(err)
    assert w == pytest.approx(2 * h, abs=2) and 2 * memory.SYNTH_BYTES_PER_PIXEL * w * h <= memory.available_bytes()
    assert not out.exists()


def test_synth_counts_only_the_workers_it_can_use(tmp_path, capsys):
    # one scene: one worker whatever --workers says
    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path / "s"),
                "--size",
                "100000x50000",
                "--train",
                "1",
                "--val",
                "0",
                "--workers",
                "8",
            ]
        )
        == 2
    )
    assert "with 1 worker(s)" in capsys.readouterr().err


def test_prepare_refuses_an_output_size_beyond_memory(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["synth", "--out", str(raw), "--size", "128x64", "--train", "2", "--val", "1", "--workers", "1"]) == 0
    out = tmp_path / "prepared"
    assert main(["prepare", "--data", str(raw), "--out", str(out), "--size", "100000x50000", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    per_pair = memory.PREPARE_BYTES_PER_RAW_PIXEL * 128 * 64 + memory.PREPARE_BYTES_PER_OUT_PIXEL * 100000 * 50000
    assert (
        f"--size 100000x50000 from 128x64 images with 2 worker(s) ({memory.gb(per_pair)} per pair) "
        f"needs about {memory.gb(2 * per_pair)} of memory" in err
    )
    w, h = _suggested_size(err)
    assert 2 * memory.PREPARE_BYTES_PER_OUT_PIXEL * w * h <= memory.available_bytes()
    assert not out.exists()
    # a size that fits goes through
    assert main(["prepare", "--data", str(raw), "--out", str(out), "--size", "64x32", "--workers", "1"]) == 0


def test_fewer_workers_are_suggested_when_one_fits():
    per_worker = 50 * 2000 * 1000  # 100 MB; 8 workers, 350 MB: 3 workers fit, or 875000 pixels each
    fix = memory._scale_fix("--size", (2000, 1000), per_worker, 0, 50, 8, 350 * 10**6)
    with pytest.raises(
        UserError,
        match=r"needs about 800 MB of memory, but this machine has 350 MB available "
        r"\(.* GB in all\); use --workers 3 or a smaller --size \(about 1322x661 at "
        r"most with 8 worker\(s\)\)",
    ):
        memory.require(8 * per_worker, "--size 2000x1000", fix, have=350 * 10**6)
    with pytest.raises(UserError, match="free memory or use a machine with more"):
        memory.require(10**9, "x", memory._scale_fix("--size", (8, 8), 10**9, 10**9, 1, 1, 10), have=10)


def test_fitting_size_keeps_the_aspect_ratio():
    assert memory.fitting_size((2000, 1000), 500_000) == (1000, 500)
    assert memory.fitting_size((64, 32), 2 * 10**12) == (2000000, 1000000)  # larger: callers cap it
    assert memory.fitting_size((64, 32), -5) == (0, 0)


def test_available_memory_is_capped_by_the_container_limit(tmp_path):
    uncapped = memory.available_bytes(tmp_path / "no-cgroup")
    assert 0 < uncapped <= memory.total_bytes()
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("200000\n")
    assert memory.available_bytes(tmp_path) == min(800000, uncapped)
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.available_bytes(tmp_path) == pytest.approx(uncapped, rel=0.05)

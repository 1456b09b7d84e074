"""A tiny trained run with its raw data, prepared folder and shards, built once per test
module that asks for it (`tiny`): evaluate writes into it, so it is not a shared world.
Registered for every test module by `tests/conftest.py`."""

import pytest

from urbanseg.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Raw synthetic scenes (128x64) -> prepared (64x32) -> shards -> a run trained for 8 steps."""
    root = tmp_path_factory.mktemp("evaluate")
    raw, prepared, shards, run = root / "raw", root / "prepared", root / "shards", root / "runs" / "tiny"
    assert main(["synth", "--out", str(raw), "--train", "3", "--val", "5", "--size", "128x64", "--workers", "1"]) == 0
    assert main(["prepare", "--data", str(raw), "--out", str(prepared), "--size", "64x32", "--workers", "1"]) == 0
    assert main(["pack", "--prepared", str(prepared), "--out", str(shards), "--shards", "2"]) == 0
    assert (
        main(
            [
                "train",
                "--data",
                str(shards),
                "--run",
                str(run),
                "--model",
                "unet-original",
                "--model-args",
                '{"base_channels": 4}',
                "--iters",
                "8",
                "--batch-size",
                "2",
                "--lr",
                "0.03",
                "--workers",
                "0",
                "--val-every",
                "4",
                "--seed",
                "0",
                "--deterministic",
            ]
        )
        == 0
    )
    return {"raw": raw, "prepared": prepared, "shards": shards, "run": run}

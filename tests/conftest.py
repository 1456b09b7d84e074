"""Session fixtures: the expensive shared worlds, each built once per test session under the
session's temporary folder, and read-only for the tests.

A test that writes into a shared world fails at teardown with the files it changed; a test
that needs to change the data takes its own copy first (`helpers.worlds.writable_copy`).
Module fixtures that build on a world can protect what they build the same way
(`read_only_worlds.protect(name, folder)`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.training import train_args
from helpers.worlds import ReadOnlyWorlds, SynthData, build_raw_cityscapes, build_synth_data

# Fixtures that live with their helpers: tiny pretrained models (`helpers.pretrained`) and
# a tiny trained run evaluate may write into (`helpers.runs`).
pytest_plugins = ["helpers.pretrained", "helpers.runs"]


@pytest.fixture(scope="session")
def read_only_worlds() -> ReadOnlyWorlds:
    return ReadOnlyWorlds()


@pytest.fixture(autouse=True)
def shared_worlds_stay_unchanged(read_only_worlds: ReadOnlyWorlds):
    """After every test: fail naming each file it wrote into a shared world."""
    yield
    changed = read_only_worlds.changes()
    if changed:
        pytest.fail(
            "the test wrote into shared read-only fixture folders (take a copy first with "
            "helpers.worlds.writable_copy):\n  " + "\n  ".join(changed[:20]),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory, read_only_worlds: ReadOnlyWorlds) -> SynthData:
    """11 train + 5 val synthetic scenes, prepared and packed: what the training tests use
    (11 training images make a 2-process torchrun split uneven, 6 + 5, on purpose)."""
    data = build_synth_data(tmp_path_factory.mktemp("synth-data"), train=11, val=5)
    read_only_worlds.protect("synth_data", data.root)
    return data


@pytest.fixture(scope="session")
def small_synth_data(tmp_path_factory, read_only_worlds: ReadOnlyWorlds) -> SynthData:
    """4 train + 2 val synthetic scenes, prepared and packed: for tests that read every record."""
    data = build_synth_data(tmp_path_factory.mktemp("small-synth-data"), train=4, val=2)
    read_only_worlds.protect("small_synth_data", data.root)
    return data


@pytest.fixture(scope="session")
def raw_cityscapes(tmp_path_factory, read_only_worlds: ReadOnlyWorlds) -> Path:
    """Raw Cityscapes-layout scenes (`helpers.worlds.build_raw_cityscapes`)."""
    root = build_raw_cityscapes(tmp_path_factory.mktemp("raw-cityscapes"))
    read_only_worlds.protect("raw_cityscapes", root)
    return root


@pytest.fixture(scope="session")
def trained_run(synth_data, tmp_path_factory, read_only_worlds: ReadOnlyWorlds) -> Path:
    """A finished `urbanseg train` run on `synth_data`: the tiny U-Net, 3 epochs of 2 steps,
    validated every epoch (best.pt, last.pt, config.yaml, metrics.csv, curves, TensorBoard)."""
    import torch

    from urbanseg.cli import main

    run = tmp_path_factory.mktemp("trained-run") / "run"
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:  # train() sets both for its process
        assert main(train_args(synth_data.shards, run, "--epochs", "3", "--lr", "0.01", deterministic=False)) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    read_only_worlds.protect("trained_run", run)
    return run

import dataclasses
import subprocess
import sys
import time

import pytest

from urbanseg.cli import COMMANDS, main


def test_help_is_instant_and_lists_every_command():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "urbanseg", "--help"], capture_output=True, text=True, check=True)
    assert time.perf_counter() - start < 5  # generous: a cold interpreter on a loaded CI box
    for name in COMMANDS:
        assert name in out.stdout
    heavy = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, urbanseg.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'tensorflow', 'onnxruntime', 'cv2') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert heavy.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    cls = COMMANDS[name][0]
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{name} --{f.name} has no help"
        assert (f.name.upper() if f.metadata.get("positional") else "--" + f.name.replace("_", "-")) in text


def test_bad_value_exits_2_without_traceback(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--size", "big"]) == 2
    err = capsys.readouterr().err
    assert "--size 'big'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--input", "a.png", "--num", "5"], "--num: only with --split; drop it"),
        (["--input", "a.png", "--num", "5", "--data", "shards"], "--num and --data: only with --split; drop them"),
        (["--split", "val", "--data", "shards", "--outputs", "labels"], "side-by-side pictures"),
        (["--split", "val", "--data", "shards", "--cityscapes-ids"], "side-by-side pictures"),
        (["--input", "a.png", "--scales", "1,100"], "at most 4"),
    ],
)
def test_predict_flags_that_would_do_nothing_are_refused(args, needle, capsys):
    """A flag the chosen mode would ignore is an error, not a silent no-op (checked before
    anything is read: the checkpoint need not exist)."""
    assert main(["predict", "--checkpoint", "missing.pt", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err

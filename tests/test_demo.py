from urbanseg.cli import main
from urbanseg.outputs import MARKER, claim, read_marker


def test_demo_runs_every_stage_and_says_what_to_open(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--iters", "3", "--out", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    for stage in ("synth", "prepare", "pack", "train", "evaluate", "predict"):
        assert f"] {stage}:" in text
    run = out / "run"
    for path in (
        run / "best.pt",
        run / "curves.png",
        run / "eval" / "val" / "report.html",
        run / "eval" / "val" / "report.md",
        out / "shards" / "val" / "spec.json",
    ):
        assert path.is_file(), path
    assert len(list((run / "predict" / "val").glob("*.png"))) == 4
    assert "| average |" in text and str(run / "eval" / "val" / "report.html") in text
    assert f"urbanseg serve --run {run}" in text  # what to try next
    # A rerun reuses the scenes and trains anew instead of refusing the existing run; it
    # deletes only what urbanseg wrote there, and never while a training holds the run.
    (run / "my_notes.txt").write_text("mine")
    (run / "predict" / "mine").mkdir()
    (run / "predict" / "mine" / "a.txt").write_text("mine too")
    old_best = (run / "best.pt").stat().st_mtime_ns
    with claim(run, "train"):
        assert main(["demo", "--quick", "--iters", "2", "--out", str(out), "--workers", "1"]) == 2
        assert "in use by `urbanseg train`" in capsys.readouterr().err
    assert (run / "best.pt").stat().st_mtime_ns == old_best
    assert main(["demo", "--quick", "--iters", "2", "--out", str(out), "--workers", "1"]) == 0
    assert read_marker(out) == "demo" and read_marker(run) == "train"
    assert (run / "my_notes.txt").read_text() == "mine" and (run / "predict" / "mine" / "a.txt").is_file()
    assert (run / "best.pt").stat().st_mtime_ns != old_best


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not written by `urbanseg demo`" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"] and not (tmp_path / MARKER).exists()
    assert (tmp_path / "precious.txt").read_text() == "keep me"

from urbanseg.cli import main
from urbanseg.outputs import MARKER, read_marker


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
    # A rerun reuses the scenes and trains anew instead of refusing the existing run.
    assert main(["demo", "--quick", "--iters", "2", "--out", str(out), "--workers", "1"]) == 0
    assert read_marker(out) == "demo" and read_marker(run) == "train"


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not written by `urbanseg demo`" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"] and not (tmp_path / MARKER).exists()
    assert (tmp_path / "precious.txt").read_text() == "keep me"

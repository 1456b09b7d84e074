"""`urbanseg export --quantize int8`: the int8 model loads and predicts like any export,
agrees with the fp32 one, records its scores; the graph passes keep the function; flags
and output files are checked; nothing is left in the working directory."""

import json
import os

import numpy as np
import pytest

from helpers.checkpoints import SIZE, make_checkpoint
from helpers.training import make_shards
from urbanseg.cli import main
from urbanseg.inference.export import export_onnx, probe_picture
from urbanseg.inference.metadata import OnnxMetadata
from urbanseg.inference.predictor import OnnxPredictor
from urbanseg.inference.quantize import (
    confusion,
    int8_path,
    miou,
    pick_images,
    prepare_float,
)
from urbanseg.models import DEFAULT_MODEL, create_model
from urbanseg.rundir import RunDir
from urbanseg.schema import FormatError

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A default-model run on tiny synthetic shards, exported with --quantize int8 from a
    scratch working directory; returns (run folder, stdout, cwd listing before, after)."""
    root = tmp_path_factory.mktemp("int8")
    shards = make_shards(root)
    run = root / "run"
    make_checkpoint(run / "best.pt", name=DEFAULT_MODEL)
    (run / "config.yaml").write_text(f"data: {shards}\n")
    cwd = root / "cwd"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("x")
    before = sorted(os.listdir(cwd))
    old = os.getcwd()
    os.chdir(cwd)
    try:
        from contextlib import redirect_stdout
        from io import StringIO

        out = StringIO()
        with redirect_stdout(out):
            code = main(["export", "--run", str(run), "--quantize", "int8", "--num", "6"])
    finally:
        os.chdir(old)
    assert code == 0
    return run, out.getvalue(), before, sorted(os.listdir(cwd))


def test_nothing_is_left_in_the_working_directory(exported):
    _, _, before, after = exported
    assert after == before


def test_int8_model_loads_predicts_and_records_its_scores(exported):
    run, out, _, _ = exported
    path = run / "best.int8.onnx"
    assert path == int8_path(run / "best.onnx") and (run / "best.onnx").is_file()
    predictor = OnnxPredictor(path)
    assert isinstance(predictor, OnnxPredictor) and predictor.input_size == SIZE
    x = probe_picture(*SIZE)
    logits = predictor.logits(x)
    assert logits.shape == (1, predictor.label_set.num_classes, SIZE[1], SIZE[0]) and logits.dtype == np.float32
    # Integer kernels in the graph: it is quantized, not a copy of the fp32 model.
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    q = predictor.info["quantization"]
    assert q["dtype"] == "int8" and q["calibration_split"] == "train" and q["calibration_images"] == 6
    assert q["val_split"] == "val" and q["val_images"] == 5
    assert 0 <= q["miou_fp32"] <= 1 and 0 <= q["miou_int8"] <= 1
    assert f"fp32 {q['miou_fp32']:.4f} -> int8 {q['miou_int8']:.4f}" in out
    raw = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["urbanseg"])
    assert raw["format_version"] == 2
    fp32 = json.loads({p.key: p.value for p in onnx.load(str(run / "best.onnx")).metadata_props}["urbanseg"])
    assert fp32["format_version"] == 1 and "quantization" not in fp32


def test_int8_agrees_with_fp32_on_synthetic_scenes(exported):
    """Recomputed here on the val images, independently of the export's own figure."""
    from urbanseg.data.loader import ShardDataset

    run, _, _, _ = exported
    fp32, int8 = (
        ort.InferenceSession(str(run / n), providers=["CPUExecutionProvider"]) for n in ("best.onnx", "best.int8.onnx")
    )
    val = ShardDataset(RunDir(run).data, "val")
    same = total = 0
    classes = set()
    for i in range(len(val)):
        x = val[i]["image"].numpy()[None].astype(np.float32)
        a = fp32.run(None, {"image": x})[0].argmax(1)
        b = int8.run(None, {"image": x})[0].argmax(1)
        same, total = same + (a == b).sum(), total + a.size
        classes.update(np.unique(a).tolist())
    assert len(classes) >= 3  # several classes: the agreement means something
    stored = OnnxMetadata.parse(
        {p.key: p.value for p in onnx.load(str(run / "best.int8.onnx")).metadata_props}["urbanseg"], "x"
    ).quantization
    assert stored is not None and stored.agreement == pytest.approx(same / total)
    assert same / total >= 0.9


def test_predict_and_evaluate_paths_take_the_int8_model(exported, tmp_path):
    from PIL import Image

    run, _, _, _ = exported
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run / "best.int8.onnx"), "-i", str(image), "-o", str(out)]) == 0
    assert (out / "in_labels.png").is_file()


@pytest.mark.parametrize("name", [DEFAULT_MODEL, pytest.param("fpn-mobilenetv3", marks=pytest.mark.slow)])
def test_float_graph_passes_keep_the_function(name, tmp_path):
    """HardSwish split and depthwise channel padding (MobileNetV3's 72/120/184/200 channels
    -> multiples of 16; torchvision's squeeze-excite with GlobalAveragePool, timm's with
    ReduceMean) change no output of the float graph; the float nodes are the 16-channel
    layers from the input on (normalisation, stem and its HardSwish fused again, first
    block) and the full-resolution tail."""
    torch.manual_seed(0)
    model = create_model(name, 8).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, (64, 32), opset=18, dynamic=True, metadata={})
    changed = tmp_path / "p.onnx"
    float_nodes, padded = prepare_float(path, changed)
    assert padded >= 4
    proto = onnx.load(str(changed))
    ops = {n.name: n.op_type for n in proto.graph.node}
    # Normalisation, stem + HardSwish, the first block (depthwise, ReLU, pointwise, residual
    # add); then the full-resolution tail: the last Resize (and the crops of a padded model).
    first = ["BatchNormalization", "Conv", "HardSwish", "Conv", "Relu", "Conv", "Add"]
    tail = ["Resize"] if name == DEFAULT_MODEL else ["Pad", "Resize", "Slice", "Slice"]
    assert sorted(ops[n] for n in float_nodes) == sorted(first + tail)
    assert {n for n, op in ops.items() if op == "HardSwish"} <= set(float_nodes)
    groups = [
        a.i for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group" and a.i > 1
    ]
    assert groups and all(g % 16 == 0 for g in groups)
    x = probe_picture(96, 64)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got = ort.InferenceSession(str(changed), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_confusion_and_miou_match_the_evaluation_metrics():
    from urbanseg.evaluation.metrics import ConfusionMatrix

    rng = np.random.default_rng(0)
    label = rng.integers(0, 6, (3, 20, 30)).astype(np.uint8)
    label[:, :2] = 255
    label[label == 4] = 255  # a class absent from the truth
    pred = rng.integers(0, 5, label.shape).astype(np.int64)  # class 5 never predicted
    reference = ConfusionMatrix(6)
    reference.update(pred, label)
    counts = confusion(pred, label, 6, 255)
    assert np.array_equal(counts, reference.matrix)
    assert miou(counts) == pytest.approx(reference.compute()["miou"])
    assert miou(np.zeros((3, 3), np.int64)) is None


def test_pick_images_spreads_over_the_split():
    assert pick_images(5, 10).tolist() == [0, 1, 2, 3, 4]
    chosen = pick_images(100, 4)
    assert chosen.tolist() == [0, 33, 66, 99]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--calibrate", "train"], "--calibrate only applies with --quantize int8"),
        (["--num", "5"], "--num only applies with --quantize int8"),
        (["--data", "x"], "--data only applies with --quantize int8"),
        (["--quantize", "int8", "--num", "0"], "--num 0 must be >= 1"),
    ],
)
def test_flag_validation(extra, message, tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_bad_split_names_the_splits_and_writes_nothing(exported, tmp_path, capsys):
    run, _, _, _ = exported
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run), "-o", str(out), "--quantize", "int8", "--calibrate", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no split 'nope'" in err and "found: ['train', 'val']" in err
    assert not list(tmp_path.iterdir())


def test_without_shards_the_error_says_what_to_give(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    assert main(["export", "--checkpoint", str(ckpt), "--quantize", "int8"]) == 2
    assert "give --run runs/NAME or --data SHARDS" in capsys.readouterr().err


def test_a_foreign_int8_file_is_not_replaced(exported, tmp_path, capsys):
    run, _, _, _ = exported
    foreign = tmp_path / "m.int8.onnx"
    foreign.write_text("someone else's")
    assert main(["export", "--run", str(run), "-o", str(tmp_path / "m.onnx"), "--quantize", "int8"]) == 2
    assert "int8 model" in capsys.readouterr().err and foreign.read_text() == "someone else's"
    assert not (tmp_path / "m.onnx").exists()


def test_quantization_metadata_is_checked():
    meta = {
        "format_version": 2,
        "model": {"name": "x", "kwargs": {}},
        "label_set": None,
        "input_size": [64, 32],
    }
    good = {
        "dtype": "int8",
        "method": "m",
        "calibration_split": "train",
        "calibration_images": 3,
        "val_split": "val",
        "val_images": 2,
        "miou_fp32": 0.5,
        "miou_int8": 0.49,
        "agreement": 0.99,
    }
    from urbanseg.inference.metadata import Quantization
    from urbanseg.schema import Node

    q = Quantization.read(Node.root(good, file="f", fix="fix"))
    assert Quantization.read(Node.root(q.to_dict(), file="f", fix="fix")) == q
    with pytest.raises(FormatError, match="agreement"):
        Quantization.read(Node.root({**good, "agreement": 1.5}, file="f", fix="fix"))
    with pytest.raises(FormatError, match="format 3"):
        OnnxMetadata.parse(json.dumps({**meta, "format_version": 3}), "m.onnx")


def test_a_failed_quantization_is_a_clear_error_and_keeps_the_fp32_export(exported, tmp_path, capsys, monkeypatch):
    import urbanseg.inference.export as export_module

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(export_module, "quantize_onnx", broken)
    run, _, _, _ = exported
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run), "-o", str(out), "--quantize", "int8", "--num", "1"]) == 2
    err = capsys.readouterr().err
    assert "int8 quantization of" in err and "unsupported op" in err and "fp32 export is written" in err
    assert out.is_file() and not (tmp_path / "m.int8.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left

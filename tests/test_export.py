"""`urbanseg export`: ONNX graphs that agree with PyTorch, with their metadata."""

import json

import numpy as np
import pytest

from helpers.checkpoints import SIZE, diversify_head, make_checkpoint
from urbanseg.cli import main
from urbanseg.inference.export import export_onnx, probe_picture
from urbanseg.models import DEFAULT_MODEL, MODELS, create_model

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


# The default model and the original's U-Net always; every other family under `slow`.
FAMILIES = [n if n in (DEFAULT_MODEL, "unet-original") else pytest.param(n, marks=pytest.mark.slow) for n in MODELS]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_model_exports_with_dynamic_size_and_agrees(name, tmp_path):
    torch.manual_seed(0)
    kwargs = {"base_channels": 4} if name == "unet-original" else {}
    model = diversify_head(create_model(name, 8, **kwargs).eval())
    path = tmp_path / "m.onnx"
    export_onnx(model, path, (64, 32), opset=18, dynamic=True, metadata={"k": 1})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # The export size, a larger multiple of 32 and sizes that need padding to the stride.
    seen = set()
    for k, (w, h) in enumerate([(64, 32), (128, 96), (83, 45), (50, 70)]):
        x = np.concatenate([probe_picture(w, h, seed=k), probe_picture(w, h, seed=k + 10)])
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        got = session.run(None, {"image": x})[0]
        assert got.shape == ref.shape == (2, 8, h, w)
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.999
        seen.update(np.unique(ref.argmax(1)).tolist())
        assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert len(seen) >= 3  # several classes predicted: the agreement means something


def test_cli_export_metadata_and_fixed_size(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")
    assert main(["export", "--run", str(tmp_path / "run")]) == 0
    proto = onnx.load(str(tmp_path / "run" / "best.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["urbanseg"])
    saved = torch.load(ckpt, weights_only=True)
    assert meta["label_set"] == saved["label_set"] and meta["input_size"] == list(SIZE)
    assert meta["normalization"] == saved["normalization"] and meta["model"] == saved["model"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]

    fixed = tmp_path / "fixed.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--no-dynamic", "-o", str(fixed)]) == 0
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, SIZE[1], SIZE[0]]


def test_export_errors_name_the_file(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path)]) == 2
    assert f"{tmp_path}/best.pt does not exist" in capsys.readouterr().err
    bad = tmp_path / "x.pt"
    bad.write_text("nope")
    assert main(["export", "--checkpoint", str(bad)]) == 2
    assert "x.pt" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx"))

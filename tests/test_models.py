"""Models by name: shapes at odd sizes, normalisation and padding inside, encoder weights
online (simulated offline) and from a local file, `urbanseg models`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from urbanseg.cli import main
from urbanseg.errors import UserError
from urbanseg.models import (
    DEFAULT_MODEL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODELS,
    create_model,
    model_stats,
    save_encoder_weights,
)
from urbanseg.models.listing import load_figures

SMALL = {"unet-original": {"base_channels": 8}}  # the others are small already


def build(name, num_classes=5, **kwargs):
    torch.manual_seed(0)
    return create_model(name, num_classes, **{**SMALL.get(name, {}), **kwargs}).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_gives_logits_at_the_input_size(name):
    model = build(name)
    x = torch.randint(0, 256, (2, 3, 45, 70), dtype=torch.uint8).float()  # not a multiple of any stride
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (2, 5, 45, 70) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # The rebuild recipe is plain data and rebuilds the same architecture.
    args = json.loads(json.dumps(model.model_args))
    assert args["name"] == name and args["kwargs"]["num_classes"] == 5
    again = create_model(args["name"], **args["kwargs"])
    assert again.state_dict().keys() == model.state_dict().keys()
    # BatchNorm running statistics follow training at PyTorch's default pace everywhere
    # (torchvision's MobileNetV3 ships 0.01, too slow for short CPU trainings).
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} <= {0.1}
    # Every head prefix names tensors of the state dict whose first dim is the class count.
    heads = [k for k in model.state_dict() if k.startswith(model.head_prefixes)]
    assert heads and any(model.state_dict()[k].shape[0] == 5 for k in heads)


def test_normalisation_and_padding_happen_inside():
    """The wrapper must equal: normalise with ImageNet mean/std, zero-pad bottom/right to
    the stride, run the bare network, crop. Checked against that computed by hand."""
    model = build("unet-original")
    x = torch.rand(1, 3, 37, 50) * 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    padded = torch.nn.functional.pad((x - mean) / std, (0, 64 - 50, 0, 48 - 37))
    with torch.inference_mode():
        expected = model.net(padded)[..., :37, :50]
        assert torch.allclose(model(x), expected, atol=1e-5)
        # uint8 input is accepted as is (converted, not rescaled).
        assert torch.allclose(model(x.round().to(torch.uint8)), model(x.round()), atol=1e-5)


@pytest.mark.parametrize("name", ["unet-original", DEFAULT_MODEL, "fpn-mobilenetv3"])
def test_channels_last_gives_the_same_logits(name):
    model = build(name)
    x = torch.rand(2, 3, 64, 96) * 255
    with torch.inference_mode():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_bad_names_and_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="valid names: unet-original, .*lraspp-mobilenetv3"):
        create_model("unet-huge", 8)
    with pytest.raises(UserError, match="num_classes"):
        create_model("unet-original", 0)
    with pytest.raises(UserError, match="does not accept"):
        create_model("unet-original", 8, depth=3)
    with pytest.raises(UserError, match="no pretrained weights"):
        create_model("unet-original", 8, encoder_weights="imagenet")
    with pytest.raises(UserError, match="expected 'imagenet' or an existing weights file"):
        create_model(DEFAULT_MODEL, 8, encoder_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        build(DEFAULT_MODEL)(torch.zeros(1, 4, 32, 32))


@pytest.mark.parametrize("name", ["unet-resnet18", "fpn-mobilenetv3", "segformer-mit_b0", "lraspp-mobilenetv3"])
def test_local_encoder_weights_are_loaded(name, tmp_path):
    source = build(name)
    path = tmp_path / "enc.pth"
    save_encoder_weights(source, path)
    torch.manual_seed(1)  # a different random init: only the file can make them equal
    model = create_model(name, 3, encoder_weights=str(path))
    got, want = model.encoder.state_dict(), source.encoder.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert model.encoder_weights == str(path)


def test_encoder_weights_with_a_prefix_and_extra_keys_are_accepted(tmp_path):
    """A whole-model file (as torchvision publishes its ImageNet backbones: `features.`
    keys plus a classifier) loads into the LR-ASPP backbone."""
    source = build("lraspp-mobilenetv3")
    state = {"features." + k: v for k, v in source.encoder.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(10, 960)
    torch.save(state, tmp_path / "mobilenet_v3_large.pth")
    model = create_model("lraspp-mobilenetv3", 3, encoder_weights=str(tmp_path / "mobilenet_v3_large.pth"))
    assert all(torch.equal(v, source.encoder.state_dict()[k]) for k, v in model.encoder.state_dict().items())


def test_encoder_weights_of_another_model_are_refused(tmp_path):
    save_encoder_weights(build("unet-resnet18"), tmp_path / "resnet.pth")
    with pytest.raises(UserError, match=r"do not fit fpn-mobilenetv3: \d+ missing"):
        create_model("fpn-mobilenetv3", 3, encoder_weights=str(tmp_path / "resnet.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="encoder weights file .*junk.pth cannot be read .*give a plain state dict"):
        create_model("fpn-mobilenetv3", 3, encoder_weights=str(tmp_path / "junk.pth"))


OFFLINE_PROBE = textwrap.dedent("""
    import sys, time
    from urbanseg.errors import UserError
    from urbanseg.models import create_model
    create_model("unet-original", 3)  # imports torch and the model libraries before the clock starts
    for name in sys.argv[1:]:
        start = time.perf_counter()
        try:
            create_model(name, 3, encoder_weights="imagenet")
            result = "DOWNLOADED"
        except UserError as e:
            result = "USERERROR " + str(e).replace("\\n", " ")
        print(name, f"{time.perf_counter() - start:.2f}", result)
""")


@pytest.mark.slow
@pytest.mark.parametrize("hub", ["offline-flag", "unreachable"])
def test_imagenet_weights_offline_fail_fast_with_a_clear_message(hub, tmp_path):
    """No network: every HTTP(S) request goes to a proxy port nothing listens on (what
    torchvision's torch.hub download meets), and the Hugging Face hub (smp and timm
    weights) is either in offline mode or at an address that refuses connections, which
    without urbanseg's probe costs huggingface_hub ~25 s of retries per model. The caches
    are empty. Each family must end, within seconds, in a UserError that says how to
    pass a local file."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    env.pop("HF_HUB_OFFLINE", None)
    if hub == "offline-flag":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env[var] = "http://127.0.0.1:9"
    for var in ("no_proxy", "NO_PROXY"):
        env.pop(var, None)
    names = ["unet-resnet18", "fpn-mobilenetv3", "segformer-mit_b0", "lraspp-mobilenetv3"]
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_PROBE, *names], env=env, capture_output=True, text=True, timeout=300
    )
    results = [line.split(maxsplit=2) for line in out.stdout.splitlines()]
    lines = {r[0]: (float(r[1]), r[2]) for r in results if len(r) == 3 and r[2].startswith(("USERERROR", "DOWNL"))}
    assert sorted(lines) == sorted(names), out.stderr[-2000:]
    for name, (seconds, line) in lines.items():
        assert "USERERROR" in line, line
        assert f"could not get the ImageNet weights for '{name}'" in line
        assert f"--encoder-weights {name}-imagenet.pth" in line and "save_encoder_weights" in line
        assert seconds < 10, f"{name}: {seconds:.1f} s to fail offline (the bound is a few seconds)"


def test_imported_families_take_their_own_normalisation():
    """An imported model normalises with the mean/std it was trained with (kept in
    model_args, and as buffers in the state dict)."""
    mean, std = [100.0, 110.0, 120.0], [50.0, 60.0, 70.0]
    model = create_model(
        "smp",
        4,
        arch="Segformer",
        config={"encoder_name": "mit_b0", "decoder_segmentation_channels": 16},
        mean=mean,
        std=std,
    ).eval()
    assert model.mean.flatten().tolist() == mean and model.std.flatten().tolist() == std
    assert model.model_args["kwargs"]["mean"] == mean and "smp" not in MODELS
    x = torch.rand(1, 3, 64, 64) * 255
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        assert torch.allclose(model(x), model.net((x - m) / s), atol=1e-5)
    with pytest.raises(UserError, match="bring their own weights"):
        create_model("smp", 4, encoder_weights="imagenet", arch="Segformer", config={"encoder_name": "mit_b0"})
    with pytest.raises(UserError, match="not a segmentation-models-pytorch architecture"):
        create_model("smp", 4, arch="create_model", config={})


def test_model_stats_counts_parameters_and_flops():
    params, flops = model_stats("unet-original", (64, 32))
    model = create_model("unet-original", 8)
    assert params == sum(p.numel() for p in model.parameters())
    # The first 3x3 conv alone: 2 * 64 out * 3 in * 9 * 64 * 32 positions.
    assert flops > 2 * 64 * 3 * 9 * 64 * 32
    # FLOPs grow with the pixel count (x4 pixels -> x4 FLOPs for a fully convolutional net).
    assert model_stats("unet-original", (128, 64))[1] == 4 * flops


def test_models_command_lists_every_model(capsys):
    assert main(["models", "--size", "64x32"]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert f"| {name}" in out
    assert f"{DEFAULT_MODEL} (default)" in out
    assert "no latency figures for 64x32" in out
    assert main(["models", "--repeats", "0"]) == 2
    assert main(["models", "--only", "unet-huge"]) == 2
    assert "valid names: unet-original" in capsys.readouterr().err
    assert main(["models", "--only", DEFAULT_MODEL]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(f"| {DEFAULT_MODEL}"))
    assert row.split("|")[5].strip() == f"{load_figures()['models'][DEFAULT_MODEL]['512x256']['speedup']:.1f}"
    assert "measured 20" in out and "| unet-original" not in out


def test_shipped_figures_cover_every_model_and_meet_the_bound():
    figures = load_figures()
    assert figures is not None, "run benchmarks/bench_models.py to write src/urbanseg/model_figures.json"
    assert set(MODELS) <= set(figures["models"])
    for size in ("512x256", "2048x1024"):
        assert figures["models"]["unet-original"][size]["speedup"] == 1.0
    # The bound for the default model, as measured by the benchmark.
    assert figures["models"][DEFAULT_MODEL]["512x256"]["speedup"] >= 20


@pytest.mark.slow
def test_models_command_measures_live(capsys):
    """Live timing in worker processes, the baseline timed alongside (not shown)."""
    assert main(["models", "--size", "64x32", "--measure", "--repeats", "2", "--only", DEFAULT_MODEL]) == 0
    out = capsys.readouterr().out
    assert "latency measured now" in out and "| unet-original" not in out
    cells = next(line for line in out.splitlines() if line.startswith(f"| {DEFAULT_MODEL}")).split("|")
    assert float(cells[4]) > 0 and float(cells[5]) > 0

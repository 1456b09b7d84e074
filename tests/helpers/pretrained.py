"""Tiny pretrained models saved with their libraries' own `save_pretrained` (no network),
an offline Hugging Face home, and laying a folder out as the hub's cache holds a download.
Its fixtures are registered for every test module by `tests/conftest.py`."""

import json
import shutil

import numpy as np
import pytest
import torch

from urbanseg.cli import main
from urbanseg.labels import get_label_set

CITY = get_label_set("classes19").classes
IMAGENET_01 = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home in offline mode (what HF_HOME=... HF_HUB_OFFLINE=1 give a
    new process; huggingface_hub read those at import, so its constants are set here)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


@pytest.fixture(scope="module")
def smp_folder(tmp_path_factory):
    """An smp SegFormer (MiT-B0 encoder, small decoder, 19 classes) saved with smp's own
    save_pretrained, plus the albumentations eval config smp-hub ships (Resize 128x64,
    ImageNet Normalize with max_pixel_value 255)."""
    import segmentation_models_pytorch as smp

    folder = tmp_path_factory.mktemp("smp") / "segformer-tiny"
    torch.manual_seed(0)
    smp.Segformer(
        encoder_name="mit_b0", encoder_weights=None, decoder_segmentation_channels=32, classes=19
    ).save_pretrained(str(folder))
    steps = [
        {"__class_fullname__": "Resize", "height": 64, "width": 128, "p": 1.0},
        {
            "__class_fullname__": "Normalize",
            "mean": IMAGENET_01[0],
            "std": IMAGENET_01[1],
            "max_pixel_value": 255.0,
            "p": 1.0,
        },
    ]
    (folder / "albumentations_config_eval.json").write_text(
        json.dumps({"__version__": "1.4.0", "transform": {"__class_fullname__": "Compose", "transforms": steps}})
    )
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A transformers SegformerForSemanticSegmentation with a tiny SegformerConfig (Cityscapes
    class names) and its image processor, saved with their own save_pretrained."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "segformer-tiny"
    config = transformers.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 1],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=19,
        id2label=dict(enumerate(CITY)),
        label2id={n: i for i, n in enumerate(CITY)},
    )
    torch.manual_seed(0)
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(str(folder))
    transformers.SegformerImageProcessor(size={"height": 64, "width": 128}).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def smp_ckpt(smp_folder, tmp_path_factory):
    """`urbanseg import` of smp_folder (a local folder: no hub involved)."""
    out = tmp_path_factory.mktemp("smp-import") / "smp.pt"
    assert main(["import", str(smp_folder), "--out", str(out)]) == 0
    return out


def picture(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def cached_on_hub(home, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay `folder`'s files out as huggingface_hub's cache holds a download of `repo_id`."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit

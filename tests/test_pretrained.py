"""Pretrained models: the table, `urbanseg import` of smp and transformers models saved with
their own `save_pretrained` (tiny, randomly initialised: no network here), the converted
checkpoint against the library's own forward, the conversion cache, and the offline errors.

Every test runs with the hub in offline mode or unreachable and an empty, temporary
Hugging Face home: nothing is downloaded.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers.fake_hub import FakeHub
from helpers.pretrained import CITY, IMAGENET_01, cached_on_hub, picture
from urbanseg.checkpoint import load_checkpoint, model_from_checkpoint
from urbanseg.cli import main
from urbanseg.errors import UserError
from urbanseg.models import IMPORTED, MODELS
from urbanseg.models.convert import cache_path, parse_source, resolve_pretrained
from urbanseg.models.pretrained import (
    MMSEG_ZOO,
    PRETRAINED,
    find_pretrained,
    pretrained_table,
)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SMP_ID = "smp-hub/segformer-b0-512x1024-city-160k"
HF_ID = "hf:nvidia/segformer-b0-finetuned-cityscapes-1024-1024"
FAST = 3.0  # seconds an offline failure may take (huggingface_hub alone retries for ~25 s)


@pytest.fixture(scope="module")
def hf_ckpt(hf_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-import") / "hf.pt"
    assert main(["import", str(hf_folder), "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------- the table


def test_table_rows_are_complete_and_nvidia_rows_say_non_commercial():
    assert len(PRETRAINED) == 14
    smp_rows = [m for m in PRETRAINED.values() if m.library == "smp"]
    assert {m.source for m in smp_rows} >= {SMP_ID, "smp-hub/segformer-b0-1024x1024-city-160k"} | {
        f"smp-hub/segformer-b{i}-1024x1024-city-160k" for i in range(1, 6)
    }
    assert HF_ID in PRETRAINED
    published = {"B0": 76.54, "B1": 78.56, "B2": 81.08, "B3": 81.94, "B4": 81.89, "B5": 82.25}
    for m in PRETRAINED.values():
        assert m.source.startswith("hf:") == (m.library == "transformers")
        assert m.card == f"https://huggingface.co/{m.repo_id}"
        assert m.licence.url.startswith("https://") and m.licence.name
        assert m.licence.non_commercial and "non-commercial" in m.licence.summary  # NVIDIA's SegFormer weights
        assert m.protocol.mode in ("whole", "slide") and m.protocol.size == m.crop
        if m.protocol.mode == "slide":  # NVlabs' test_cfg: 1024 windows every 768 pixels
            assert m.protocol.stride == (768, 768) and m.crop == (1024, 1024)
            assert m.miou == published[m.architecture.split("-")[1]] and m.miou_source == MMSEG_ZOO
        else:
            assert m.protocol.stride is None and m.miou is None
        # fp32 weights: 4 bytes per parameter (the hub's file sizes for B0-B2 agree)
        assert abs(m.download_mb - 4 * m.params_m) / m.download_mb < 0.01
    assert find_pretrained(HF_ID[3:]) is PRETRAINED[HF_ID]


@pytest.mark.slow
def test_table_parameters_are_the_architectures():
    """Each row's parameter count is the one of the SegFormer it names (decoder width 256
    for B0/B1, 768 from B2 on, as in NVlabs' configs)."""
    import segmentation_models_pytorch as smp

    for m in PRETRAINED.values():
        if m.library != "smp":
            continue
        variant = m.architecture.split("-")[1].lower()
        net = smp.Segformer(
            encoder_name=f"mit_{variant}",
            encoder_weights=None,
            classes=19,
            decoder_segmentation_channels=256 if variant in ("b0", "b1") else 768,
        )
        assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == m.params_m, m.source


def test_models_pretrained_prints_the_table_and_the_licence(capsys):
    assert main(["models", "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(pretrained_table())
    for m in PRETRAINED.values():
        assert f"| `{m.source}` |" in out
    assert "NON-COMMERCIAL" in out and PRETRAINED[HF_ID].licence.url in out and MMSEG_ZOO in out


def test_docs_carry_the_table():
    assert pretrained_table() in (ROOT / "docs" / "pretrained.md").read_text()


def test_imported_families_are_not_trainable_names():
    assert not set(IMPORTED) & set(MODELS)


# ------------------------------------------------------------------- conversion, proven


def test_smp_model_imports_with_its_own_logits(smp_folder, smp_ckpt, hf_home):
    """The converted checkpoint gives smp's own forward on the normalised picture (smp's
    Segformer upsamples to the input size itself), loads weights_only and rebuilds."""
    import segmentation_models_pytorch as smp

    ckpt = torch.load(smp_ckpt, map_location="cpu", weights_only=True)
    assert ckpt["source"]["licence"] == "unknown"
    assert ckpt["label_set"]["name"] == "classes19" and ckpt["input_size"] == [128, 64]
    assert ckpt["normalization"]["mean"] == pytest.approx([255 * v for v in IMAGENET_01[0]])
    assert ckpt["inference"] == {"mode": "whole", "size": [128, 64]} and ckpt["metrics"] == {}
    assert ckpt["source"]["library"] == "smp" and ckpt["source"]["revision"].startswith("local-")
    assert ckpt["model"]["name"] == "smp" and ckpt["model"]["kwargs"]["arch"] == "Segformer"
    model = model_from_checkpoint(load_checkpoint(smp_ckpt))
    reference = smp.from_pretrained(str(smp_folder)).eval()
    x = torch.from_numpy(picture(64, 96)).permute(2, 0, 1)[None].float()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in IMAGENET_01)
    with torch.inference_mode():
        ours, theirs = model(x), reference((x - mean) / std)
    assert ours.shape == (1, 19, 64, 96)
    assert (ours - theirs).abs().max() <= 1e-5


def test_transformers_model_imports_with_its_own_logits(hf_folder, hf_ckpt, hf_home):
    """Against transformers' own pipeline: its image processor's rescale/normalise, the
    model's forward (1/4-resolution logits), bilinear upsampling with align_corners=False
    and its post_process_semantic_segmentation, at a size no stride divides."""
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    ckpt = torch.load(hf_ckpt, map_location="cpu", weights_only=True)
    assert ckpt["source"]["library"] == "transformers" and ckpt["model"]["name"] == "hf"
    assert ckpt["input_size"] == [128, 64] and ckpt["label_set"]["classes"] == list(CITY)
    model = model_from_checkpoint(hf_ckpt)
    reference = SegformerForSemanticSegmentation.from_pretrained(str(hf_folder)).eval()
    processor = SegformerImageProcessor.from_pretrained(str(hf_folder))
    image = picture(45, 70)
    pixels = processor(images=image, do_resize=False, return_tensors="pt").pixel_values
    with torch.inference_mode():
        outputs = reference(pixel_values=pixels)
        theirs = F.interpolate(outputs.logits, size=(45, 70), mode="bilinear", align_corners=False)
        ours = model(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    assert ours.shape == (1, 19, 45, 70)
    assert (ours - theirs).abs().max() <= 1e-5
    labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[(45, 70)])[0]
    assert torch.equal(ours.argmax(1)[0], labels)


@pytest.mark.parametrize("family", ["smp", "hf"])
def test_predict_and_export_take_the_imported_checkpoint(family, request, tmp_path, hf_home):
    ckpt = request.getfixturevalue(f"{family}_ckpt")
    Image.fromarray(picture(100, 200)).save(tmp_path / "street.png")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "--input",
                str(tmp_path / "street.png"),
                "--out",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    labels = np.array(Image.open(tmp_path / "pred" / "street_labels.png"))
    assert labels.shape == (100, 200) and labels.max() < 19
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "model.onnx")]) == 0
    assert (tmp_path / "model.onnx").stat().st_size > 0


@pytest.mark.parametrize("family", ["smp", "hf"])
def test_the_imported_architecture_takes_a_new_head(family, request):
    """What `train --init` does with another label set: the same architecture with 8
    classes loads every imported tensor but the classifier (urbanseg.checkpoint.load_pretrained)."""
    from urbanseg.checkpoint import load_pretrained
    from urbanseg.models import create_model

    ckpt = load_checkpoint(request.getfixturevalue(f"{family}_ckpt"))
    kwargs = {k: v for k, v in ckpt["model"]["kwargs"].items() if k != "num_classes"}
    model = create_model(ckpt["model"]["name"], 8, **kwargs)
    report = load_pretrained(model, ckpt)
    assert report.skipped and all(k.startswith(model.head_prefixes) for k in report.skipped)
    assert len(report.loaded) == len(ckpt["model_state"]) - len(report.skipped)
    assert torch.equal(model.mean, ckpt["model_state"]["mean"])


# -------------------------------------------------------------- the conversion cache


def test_a_folder_is_converted_once_and_again_when_it_changes(hf_folder, tmp_path, hf_home):
    folder = shutil.copytree(hf_folder, tmp_path / "copy")
    path = resolve_pretrained(str(folder))
    assert path == cache_path(parse_source(str(folder))) and path.is_relative_to(hf_home / "urbanseg")
    first = path.stat().st_mtime_ns
    assert resolve_pretrained(str(folder)) == path and path.stat().st_mtime_ns == first  # reused
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    revision = torch.load(path, weights_only=True, mmap=True)["source"]["revision"]
    resolve_pretrained(str(folder))
    assert torch.load(path, weights_only=True, mmap=True)["source"]["revision"] != revision


@pytest.mark.parametrize("source", [SMP_ID, HF_ID])
def test_offline_a_cached_hub_model_converts_with_the_tables_facts(source, request, hf_home):
    folder = request.getfixturevalue("hf_folder" if source.startswith("hf:") else "smp_folder")
    commit = cached_on_hub(hf_home, PRETRAINED[source].repo_id, folder)
    path = resolve_pretrained(source)
    ckpt = load_checkpoint(path)
    row = PRETRAINED[source]
    assert ckpt["source"]["revision"] == commit and ckpt["source"]["non_commercial"] is True
    assert ckpt["source"]["licence_url"] == row.licence.url and ckpt["input_size"] == list(row.crop)
    assert ckpt["inference"] == row.protocol.to_dict()
    assert ckpt["metrics"] == (
        {} if row.miou is None else {"miou": pytest.approx(row.miou / 100), "miou_source": MMSEG_ZOO}
    )
    stamp = path.stat().st_mtime_ns
    assert resolve_pretrained(source) == path and path.stat().st_mtime_ns == stamp


def test_a_folder_fetched_elsewhere_imports_as_its_hub_id(hf_folder, hf_home, capsys):
    """The offline recipe: `hf download ID --local-dir DIR` elsewhere, then
    `urbanseg import ID --folder DIR`; later commands find the conversion by the id."""
    assert main(["import", HF_ID, "--folder", str(hf_folder)]) == 0
    out = capsys.readouterr().out
    assert "NON-COMMERCIAL" in out and PRETRAINED[HF_ID].licence.url in out
    assert resolve_pretrained(HF_ID) == cache_path(parse_source(HF_ID))
    assert "using the conversion" in capsys.readouterr().out


# ------------------------------------------------------ the download, from a stand-in hub


@pytest.fixture
def fake_hub(smp_folder):
    hub = FakeHub({SMP_ID: ("a" * 40, smp_folder)})
    yield hub
    hub.close()


@pytest.mark.slow
def test_a_hub_model_downloads_once_and_converts_again_for_a_new_revision(fake_hub, tmp_path):
    """`urbanseg import ID` against a hub on 127.0.0.1 (HF_ENDPOINT): the first run
    downloads and converts into the cache, the second only asks the hub for its revision
    and reuses the conversion, a new revision on the hub is fetched and converted again."""
    env = {**os.environ, "HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    path = tmp_path / "hf" / "urbanseg" / ("smp--" + SMP_ID.replace("/", "--")) / "model.pt"

    def run():
        fake_hub.requests.clear()
        out = subprocess.run(
            [sys.executable, "-m", "urbanseg", "import", SMP_ID],
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    assert "NON-COMMERCIAL" in run()
    assert sorted(fake_hub.downloads()) == ["albumentations_config_eval.json", "config.json", "model.safetensors"]
    assert load_checkpoint(path)["source"]["revision"] == "a" * 40
    stamp = path.stat().st_mtime_ns
    run()
    assert fake_hub.downloads() == [] and path.stat().st_mtime_ns == stamp
    fake_hub.repos[SMP_ID] = ("b" * 40, fake_hub.repos[SMP_ID][1])  # same files: the hub's blobs are reused
    run()
    assert load_checkpoint(path)["source"]["revision"] == "b" * 40 and path.stat().st_mtime_ns != stamp


def test_a_missing_repository_is_a_clear_error(fake_hub, hf_home, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    with pytest.raises(UserError, match="no model smp-hub/segformer-b9-1024x1024-city-160k on the Hugging Face hub"):
        resolve_pretrained("smp-hub/segformer-b9-1024x1024-city-160k")


# ------------------------------------------------------------------------- offline, fast


@pytest.mark.parametrize("source", [SMP_ID, HF_ID])
def test_offline_with_nothing_cached_fails_fast_saying_how_to_fetch(source, hf_home, capsys):
    start = time.perf_counter()
    assert main(["import", source]) == 2
    assert time.perf_counter() - start < FAST
    err = " ".join(capsys.readouterr().err.split())
    repo = source.removeprefix("hf:")
    assert f"cannot get {repo}: HF_HUB_OFFLINE is set" in err and str(hf_home / "hub") in err
    assert f"hf download {repo} --local-dir {repo.split('/')[1]}" in err
    assert f"urbanseg import {source} --folder {repo.split('/')[1]}" in err


def test_an_unreachable_hub_fails_fast_without_the_offline_flag(hf_home, monkeypatch):
    """No HF_HUB_OFFLINE: the hub's address refuses connections (as a machine without
    network does). One short probe, then the same error, instead of ~25 s of retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"(?s)cannot get smp-hub/\S+: the hub did not answer .*hf download"):
        resolve_pretrained(SMP_ID)
    assert time.perf_counter() - start < FAST


# ------------------------------------------------------------------------- user errors


def test_bad_sources_and_options_are_user_errors(smp_folder, hf_folder, tmp_path, hf_home, capsys):
    for missing in ("no such thing", "./no/folder"):
        assert main(["import", missing]) == 2
        assert "not a folder, an smp hub id" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["import", str(hf_folder), "--out", str(tmp_path / "a.pt"), "--labels", "categories8"]) == 2
    assert "has 8 classes, the model 19" in capsys.readouterr().err
    assert main(["import", str(smp_folder), "--folder", str(smp_folder), "--out", str(tmp_path / "b.pt")]) == 2
    assert "--folder goes with a hub id" in capsys.readouterr().err
    assert main(["import", str(smp_folder), "--labels", "classes19"]) == 2  # would change the shared cache
    # --folder must hold the table row's model: it is labelled (and cached) with that row's facts
    import segmentation_models_pytorch as smp

    smp.Unet("resnet18", encoder_weights=None, classes=19).save_pretrained(str(tmp_path / "unet"))
    for source in (SMP_ID, "smp-hub/segformer-b1-1024x1024-city-160k"):  # another model, another variant
        folder = tmp_path / "unet" if source == SMP_ID else smp_folder
        assert main(["import", source, "--folder", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "not the SegFormer-B" in err and f"urbanseg import {folder}" in err
    assert not list(hf_home.rglob("model.pt"))
    (tmp_path / "taken.pt").write_bytes(b"a user's file")
    assert main(["import", str(smp_folder), "--out", str(tmp_path / "taken.pt")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "taken.pt").read_bytes() == b"a user's file"
    renamed = shutil.copytree(hf_folder, tmp_path / "renamed")
    config = json.loads((renamed / "config.json").read_text())
    config["id2label"]["1"] = "pavement"
    (renamed / "config.json").write_text(json.dumps(config))
    assert main(["import", str(renamed), "--out", str(tmp_path / "c.pt")]) == 2
    assert "class 1 is 'pavement', not 'sidewalk'" in capsys.readouterr().err

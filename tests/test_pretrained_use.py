"""Pretrained models wherever a checkpoint is taken (predict, evaluate, export, train --init),
their recorded inference protocol (tested at 2048x1024), scoring a classes19 model on
categories8/7 through the official table, and fine-tuning from them (a head started from
the projected one, --freeze-encoder).

The pretrained models are tiny, randomly initialised smp and transformers SegFormers saved
with their own save_pretrained (`test_pretrained`'s fixtures); a hub id is served from a
Hugging Face cache laid out by hand, offline. Nothing is downloaded.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import pretrained as tp
from helpers.training import make_shards, train_args
from urbanseg.checkpoint import load_checkpoint, model_from_checkpoint
from urbanseg.cli import main
from urbanseg.config import EvaluateConfig, PredictConfig
from urbanseg.errors import UserError
from urbanseg.inference.plan import Plan, label_maps
from urbanseg.inference.predictor import Predictor, TorchPredictor
from urbanseg.inference.protocol import segment_options
from urbanseg.inference.segment import segment
from urbanseg.labels import get_label_set
from urbanseg.models.convert import cache_path, parse_source, resolve_model_checkpoint
from urbanseg.models.pretrained import PRETRAINED
from urbanseg.projection import find_projection, require_projection

SLIDE_ID = "smp-hub/segformer-b0-1024x1024-city-160k"  # sliding window 1024x1024, stride 768; 76.54 mIoU
SLIDE = {"mode": "slide", "size": [1024, 1024], "stride": [768, 768]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The same synthetic scenes prepared as classes19, categories8 and categories7 shards (64x32)."""
    root = tmp_path_factory.mktemp("pretrained-shards")
    return {
        labels: make_shards(root, train=4, val=3, labels=labels)
        for labels in ("classes19", "categories8", "categories7")
    }


@pytest.fixture
def slide_model(hf_home, smp_folder):
    """SLIDE_ID from the (offline) Hugging Face cache: the tiny smp SegFormer with the table's facts."""
    tp.cached_on_hub(hf_home, PRETRAINED[SLIDE_ID].repo_id, smp_folder)
    return SLIDE_ID


# ------------------------------------------------------------ one place resolves sources


def test_checkpoint_arguments_resolve_in_one_place(smp_folder, hf_home, tmp_path):
    for text in (None, "best", "last", "runs/x/best.pt", "model.onnx", "owner/name.pth"):
        assert resolve_model_checkpoint(text) == text
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").write_bytes(b"")  # an existing file named like a hub id stays a path
    assert resolve_model_checkpoint(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    converted = resolve_model_checkpoint(str(smp_folder))
    assert converted == str(cache_path(parse_source(str(smp_folder)))) and Path(converted).is_file()
    with pytest.raises(UserError, match="cannot get nvidia/x: HF_HUB_OFFLINE is set"):
        resolve_model_checkpoint("hf:nvidia/x")


def test_configs_take_a_hub_id_and_evaluate_runs_without_a_run_folder():
    assert PredictConfig(input=["a.jpg"], checkpoint=SLIDE_ID).checkpoint == SLIDE_ID
    assert EvaluateConfig(checkpoint=SLIDE_ID, data=Path("shards")).run is None
    with pytest.raises(UserError, match="give --run runs/NAME, or --checkpoint"):
        EvaluateConfig(checkpoint="best", data=Path("shards"))


def test_predict_evaluate_export_take_a_hub_id_and_say_its_licence(slide_model, shards, tmp_path, capsys):
    Image.fromarray(tp.picture(60, 100)).save(tmp_path / "street.png")
    args = ["predict", "--checkpoint", slide_model, "--input", str(tmp_path / "street.png"), "-o", str(tmp_path / "p")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "NON-COMMERCIAL use only" in out and "76.54 Cityscapes val mIoU" in out
    assert "sliding window 1024x1024" in out and (tmp_path / "p" / "street_labels.png").is_file()

    report = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", slide_model, "--data", str(shards["classes19"]), "-o", str(report)]) == 0
    assert "NON-COMMERCIAL use only" in capsys.readouterr().out
    header = (report / "report.md").read_text()
    assert "NON-COMMERCIAL use only" in header and "76.54 Cityscapes val mIoU" in header
    assert json.loads((report / "metrics.json").read_text())["pretrained"]["pretrained"].startswith(SLIDE_ID)

    onnx = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", slide_model, "--out", str(onnx)]) == 0
    capsys.readouterr()
    assert (
        main(["predict", "--model", str(onnx), "--input", str(tmp_path / "street.png"), "-o", str(tmp_path / "q")]) == 0
    )
    out = capsys.readouterr().out
    assert "NON-COMMERCIAL use only" in out and "sliding window 1024x1024" in out  # the metadata carries both
    ours, theirs = (np.array(Image.open(tmp_path / d / "street_labels.png")) for d in ("p", "q"))
    assert (ours == theirs).mean() > 0.999


def test_a_local_folder_is_a_checkpoint_too(hf_folder, shards, tmp_path, hf_home, capsys):
    Image.fromarray(tp.picture(40, 80)).save(tmp_path / "s.png")
    assert (
        main(["predict", "--checkpoint", str(hf_folder), "--input", str(tmp_path / "s.png"), "-o", str(tmp_path / "p")])
        == 0
    )
    assert "licence: unknown: not in urbanseg's table" in capsys.readouterr().out


# ----------------------------------------------------------------- the recorded protocol


class Recorder(Predictor):
    """A predictor that records the windows it is given: the picture encodes each pixel's
    position (red = x // 8, green = y // 4), so a window's first pixel is its offset."""

    def __init__(self, inference):
        super().__init__(get_label_set("classes19"), (1024, 1024), Path("recorder"), {"inference": inference})
        self.calls = []

    def logits(self, batch):
        self.calls += [(int(b[0, 0, 0]) * 8, int(b[1, 0, 0]) * 4, b.shape[2], b.shape[1]) for b in batch]
        return np.zeros((len(batch), 19, *batch.shape[2:]), np.float32)


def street_2048():
    """A 2048x1024 picture whose pixels say where they are (see `Recorder`)."""
    x, y = np.meshgrid(np.arange(2048), np.arange(1024))
    return np.stack([x // 8, y // 4, np.zeros_like(x)], -1).astype(np.uint8)


def test_the_sliding_protocol_runs_its_windows_and_stride_at_2048x1024():
    """mmsegmentation's slide_inference with 1024 windows every 768 pixels over 2048x1024:
    x = 0, 768, 1024 (the last flush with the edge), y = 0; every window 1024x1024."""
    recorder = Recorder(SLIDE)
    options = segment_options(recorder.info, PredictConfig(input=["a"], checkpoint="a.pt"))
    assert options.mode == "tile" and options.tile_size == (1024, 1024) and options.overlap == 0.25
    segment(recorder, [street_2048()], **options.kwargs())
    assert recorder.calls == [(0, 0, 1024, 1024), (768, 0, 1024, 1024), (1024, 0, 1024, 1024)]
    recorder.calls.clear()  # the same windows through evaluate's path (the plan evaluate builds)
    plan = Plan.from_config(EvaluateConfig(checkpoint="a.pt", data=Path("s")), recorder.info)
    assert (plan.mode, plan.tile_size, plan.overlap) == ("tile", (1024, 1024), 0.25)
    label_maps(recorder, [street_2048()], plan)
    assert recorder.calls == [(0, 0, 1024, 1024), (768, 0, 1024, 1024), (1024, 0, 1024, 1024)]


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({}, ("tile", (1024, 1024))),
        ({"protocol": False}, ("resize", None)),
        ({"native": True}, ("native", None)),
        ({"tile": True, "tile_size": "512x512"}, ("tile", (512, 512))),
    ],
)
def test_the_users_flags_win_over_the_protocol(flags, expected):
    options = segment_options({"inference": SLIDE}, PredictConfig(input=["a"], checkpoint="a.pt", **flags))
    assert (options.mode, options.tile_size) == expected
    whole = segment_options(
        {"inference": {"mode": "whole", "size": [1024, 512]}}, PredictConfig(input=["a"], checkpoint="a.pt")
    )
    assert whole.mode == "resize" and "1024x512" in whole.why
    assert segment_options({}, EvaluateConfig(checkpoint="a.pt", data=Path("s")), "native").mode == "native"


@pytest.mark.slow
def test_predict_and_evaluate_give_the_same_pixels_at_2048x1024(slide_model, tmp_path):
    """The tiny model at full resolution: predict writes the recorded protocol's windows
    (`segment` with 1024x1024 windows, stride 768), and evaluate's plan for the same model
    is that protocol too; the whole-image protocol resizes."""
    path = Path(resolve_model_checkpoint(slide_model))
    image = tp.picture(1024, 2048, seed=3)
    Image.fromarray(image).save(tmp_path / "street.png")
    args = ["predict", "--checkpoint", slide_model, "--input", str(tmp_path / "street.png"), "-o", str(tmp_path / "p")]
    assert main([*args, "--engine", "torch"]) == 0
    predicted = np.array(Image.open(tmp_path / "p" / "street_labels.png"))
    predictor = TorchPredictor(path, "cpu")
    assert np.array_equal(predicted, segment(predictor, [image], mode="tile", tile_size=(1024, 1024), overlap=0.25)[0])
    plan = Plan.from_config(EvaluateConfig(checkpoint="a.pt", data=Path("s")), predictor.info)
    assert np.array_equal(predicted, label_maps(predictor, [image], plan)[0])
    whole = Plan.from_config(
        PredictConfig(input=["a"], checkpoint="a.pt"), {"inference": {"mode": "whole", "size": [1024, 1024]}}
    )
    assert whole.mode == "resize"


# ------------------------------------------------------------- scored on the original's table


def test_the_projection_is_the_official_table():
    """Every trainId -> its label's category, from cityscapesscripts' own table."""
    official = pytest.importorskip("cityscapesscripts.helpers.labels")
    c19, c8, c7 = (get_label_set(n) for n in ("classes19", "categories8", "categories7"))
    to8, to7 = find_projection(c19, c8), find_projection(c19, c7)
    assert to8 is not None and to7 is not None
    for train_id in range(19):
        label = official.trainId2label[train_id]
        assert c19.classes[train_id] == label.name
        assert c8.classes[to8.lut[train_id]] == label.category and to8.lut[train_id] == label.categoryId
        assert c7.classes[to7.lut[train_id]] == label.category
    assert to8.lut[255] == 255 and to8.members()[0] == []  # void: no member, never predicted
    for finer in (c8, c7):
        assert find_projection(finer, c19) is None
    assert find_projection(c8, c7) is None  # void has no categories7 class


def test_a_custom_label_map_says_what_would_be_needed(tmp_path):
    labelmap = tmp_path / "mine.json"
    labelmap.write_text(
        json.dumps({"road": {"id": 0, "colors": [[1, 2, 3]]}, "rest": {"id": 1, "colors": [[4, 5, 6]]}})
    )
    with pytest.raises(UserError) as e:
        require_projection(get_label_set("classes19"), get_label_set(str(labelmap)), "the model", "the data")
    text = str(e.value)
    assert "classes19" in text and "mine" in text and "custom label map" in text and "--labels classes19" in text


def test_a_classes19_model_scores_categories7_as_its_matrix_summed_by_category(smp_ckpt, shards, tmp_path, capsys):
    """Evaluate the 19-class model on classes19 and categories7 shards of the same scenes:
    the categories7 confusion matrix is the classes19 one summed over each category's classes."""
    matrices = {}
    for labels in ("classes19", "categories7"):
        out = tmp_path / labels
        args = ["evaluate", "--checkpoint", str(smp_ckpt), "--data", str(shards[labels]), "-o", str(out)]
        assert main(args) == 0
        matrices[labels] = np.array(json.loads((out / "metrics.json").read_text())["confusion_matrix"])
    assert "mapped to categories7 after the argmax" in (tmp_path / "categories7" / "report.md").read_text()
    lut = find_projection(get_label_set("classes19"), get_label_set("categories7")).lut[:19]
    onehot = np.eye(7, dtype=np.int64)[lut]  # (19, 7)
    assert matrices["classes19"].sum() > 0
    assert np.array_equal(onehot.T @ matrices["classes19"] @ onehot, matrices["categories7"])


def test_predict_writes_categories8_from_a_classes19_model(smp_ckpt, tmp_path, capsys):
    Image.fromarray(tp.picture(64, 128)).save(tmp_path / "s.png")
    for labels, out in ((None, "a"), ("categories8", "b")):
        args = ["predict", "--checkpoint", str(smp_ckpt), "--input", str(tmp_path / "s.png"), "-o", str(tmp_path / out)]
        assert main(args + (["--labels", labels] if labels else [])) == 0
    fine, coarse = (np.array(Image.open(tmp_path / d / "s_labels.png")) for d in "ab")
    lut = find_projection(get_label_set("classes19"), get_label_set("categories8")).lut
    assert np.array_equal(lut[fine], coarse) and 0 not in coarse
    assert "mapped to categories8 after the argmax" in capsys.readouterr().out
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(smp_ckpt),
                "--input",
                str(tmp_path / "s.png"),
                "-o",
                str(tmp_path / "c"),
                "--labels",
                "classes19",
            ]
        )
        == 0
    )


# ------------------------------------------------------------------------ fine-tuning


def test_the_new_head_starts_from_the_projected_one(smp_ckpt):
    """dominant rule (train --init's): each category's logit is that of its member the model
    predicts most on the sample images; mean rule: the mean of its members' + log(members);
    void far below every other class either way, never predicted at step 0."""
    from urbanseg.models import create_model
    from urbanseg.training.finetune import predicted_counts, project_head
    from urbanseg.training.train import load_init_weights

    ckpt = load_checkpoint(smp_ckpt)
    old = model_from_checkpoint(ckpt)
    kwargs = {k: v for k, v in ckpt["model"]["kwargs"].items() if k != "num_classes"}
    new = create_model("smp", 8, **kwargs).eval()
    sample = [torch.from_numpy(tp.picture(64, 128, seed=s)).permute(2, 0, 1) for s in range(3)]
    load_init_weights(new, smp_ckpt, get_label_set("categories8"), new_head=False, sample=sample)
    projection = find_projection(get_label_set("classes19"), get_label_set("categories8"))
    counts = np.zeros(19, np.int64)
    with torch.inference_mode():
        for image in sample:  # counted here independently of predicted_counts
            counts += np.bincount(old(image[None].float()).argmax(1).flatten().numpy(), minlength=19)
    assert np.array_equal(counts, predicted_counts(old, sample, 19))
    x = torch.from_numpy(tp.picture(64, 128, seed=9)).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        z19, z8 = old(x), new(x)
    for j, members in enumerate(projection.members()):
        if members:
            top = max(members, key=lambda k: (counts[k], -members.index(k)))
            assert torch.allclose(z8[:, j], z19[:, top], atol=1e-4), j
    assert (z8.argmax(1) != 0).all()  # void is never predicted at step 0, as by the projected model
    project_head(new, ckpt["model_state"], projection, rule="mean")
    with torch.inference_mode():
        z8 = new(x)
    for j, members in enumerate(projection.members()):
        if members:
            expected = z19[:, members].mean(1) + np.log(len(members))
            assert torch.allclose(z8[:, j], expected, atol=1e-4), j
    assert (z8.argmax(1) != 0).all()


def test_train_init_from_a_hub_id_with_a_frozen_encoder(slide_model, shards, tmp_path, capsys):
    """train --init SLIDE_ID on categories8 data: the converted checkpoint is what config.yaml
    records, the head starts from the projected one, and --freeze-encoder 2 keeps every
    encoder weight bit-exact for two steps (the decoder moves); a third step moves it."""
    converted = resolve_model_checkpoint(slide_model)
    start = load_checkpoint(converted)["model_state"]
    capsys.readouterr()
    for iters in (2, 3):
        run = tmp_path / f"run{iters}"
        extra = ["--init", slide_model, "--iters", str(iters), "--freeze-encoder", "2", "--lr", "0.01"]
        args = [a for a in train_args(shards["categories8"], run, *extra) if a not in tp_model_flags()]
        assert main(args) == 0
        err = capsys.readouterr().err
        assert "head started from the classes19 head" in err and "encoder frozen until step 2" in err
        ckpt = torch.load(run / "last.pt", weights_only=True)
        assert ckpt["config"]["init"] == converted
        encoder = [k for k in start if k.startswith("net.encoder.") and start[k].is_floating_point()]
        same = [torch.equal(ckpt["model_state"][k], start[k]) for k in encoder]
        decoder = [k for k in start if k.startswith("net.decoder.") and start[k].is_floating_point()]
        assert not all(torch.equal(ckpt["model_state"][k], start[k]) for k in decoder)
        assert all(same) if iters == 2 else not all(same) and "step 2: encoder unfrozen" in err


def tp_model_flags():
    """train_args' tiny-model flags, which --init replaces (it fixes the architecture)."""
    from helpers.training import TINY_MODEL

    return set(TINY_MODEL)

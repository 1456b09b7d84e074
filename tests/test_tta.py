"""Test-time augmentation (`urbanseg.inference.segment.TTA`, `--tta flip`, `--scales`):
the identity is the plain result, flips are undone, and the fused prediction equals a
straightforward reference (each view run alone, logits upsampled with torch's bilinear
interpolate, torch's softmax, averaged) in every resolution mode, with tiles and at another
output size; the flags' errors exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.predictors import PointwisePredictor, scene
from urbanseg.cli import main
from urbanseg.config import parse_scales
from urbanseg.errors import UserError
from urbanseg.imaging import resize_image
from urbanseg.inference.segment import TTA, mean_probabilities, segment, tile_starts

torch = pytest.importorskip("torch")
F = torch.nn.functional


class PositionalPredictor(PointwisePredictor):
    """Pointwise logits plus a ramp across the width (a different one per class) and an
    optional box blur: neither flip- nor scale-equivariant, so every view differs and an
    un-flip left out, or done twice, shows."""

    def logits(self, batch):
        out = super().logits(batch)
        w = batch.shape[3]
        ramp = np.linspace(-1.5, 1.5, w, dtype=np.float32)
        slopes = np.linspace(-1.0, 1.0, out.shape[1], dtype=np.float32)
        return (out + slopes[None, :, None, None] * ramp[None, None, None, :]).astype(np.float32)


def _slide_reference(predictor, image, window, overlap):
    """Mean window logits per pixel, window by window into full-size sums and counts."""
    h, w = image.shape[:2]
    tw, th = min(window[0], w), min(window[1], h)
    sums, counts = None, np.zeros((h, w), np.float32)
    for y in tile_starts(h, th, overlap):
        for x in tile_starts(w, tw, overlap):
            crop = image[y : y + th, x : x + tw]
            lg = predictor.logits(crop[None].transpose(0, 3, 1, 2).astype(np.float32))[0]
            sums = np.zeros((lg.shape[0], h, w), np.float32) if sums is None else sums
            sums[:, y : y + th, x : x + tw] += lg
            counts[y : y + th, x : x + tw] += 1
    return sums / counts


def reference_probabilities(predictor, image, mode, scales, flip, size, window=None, overlap=0.25):
    """(H, W, C) mean softmax over the views at output size (W, H), one view at a time."""
    h, w = image.shape[:2]
    base = predictor.input_size if mode == "resize" else (w, h)
    probs = []
    for s in scales:
        for f in (False, True) if flip else (False,):
            view = resize_image(image, (max(1, round(base[0] * s)), max(1, round(base[1] * s))))
            view = np.ascontiguousarray(view[:, ::-1]) if f else view
            if mode == "tile":
                logits = _slide_reference(predictor, view, window, overlap)
            else:
                logits = predictor.logits(view[None].transpose(0, 3, 1, 2).astype(np.float32))[0]
            logits = np.ascontiguousarray(logits[:, :, ::-1]) if f else logits
            up = F.interpolate(torch.from_numpy(logits)[None], size=(size[1], size[0]), mode="bilinear")
            probs.append(torch.softmax(up[0].double(), dim=0))
    return torch.stack(probs).mean(0).permute(1, 2, 0).numpy()


def assert_labels_match(labels, probs):
    """Equal to the reference's argmax wherever its top two classes are not within rounding."""
    top2 = np.sort(probs, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-5
    assert labels.shape == probs.shape[:2] and clear.mean() > 0.95
    assert (labels[clear] == probs.argmax(-1)[clear]).all()


@pytest.mark.parametrize("mode", ["resize", "native", "tile"])
def test_identity_tta_is_exactly_the_plain_result(mode):
    p = PositionalPredictor(blur=2)
    images = [scene(45, 61), scene(45, 61, 1), scene(30, 20, 2)]
    kwargs = {"mode": mode, "tile_size": (24, 16), "batch_size": 2}
    plain = segment(p, images, **kwargs)
    calls = list(p.calls)
    p.calls.clear()
    same = segment(p, images, tta=TTA(scales=(1.0,), flip=False), **kwargs)
    assert all((a == b).all() for a, b in zip(plain, same)) and p.calls == calls


@pytest.mark.parametrize("mode", ["resize", "native", "tile"])
def test_flip_on_a_flip_equivariant_model_gives_the_plain_result(mode):
    """A pointwise model's logits of a mirrored image are the mirrored logits, bit for
    bit: the flipped view, flipped back, is the identity view and the fused argmax is
    the plain one (a missing or doubled un-flip would mirror half the evidence)."""
    p = PointwisePredictor()
    image = scene(37, 53)
    kwargs = {"mode": mode, "tile_size": (20, 16), "overlap": 0.5}
    (plain,) = segment(p, [image], **kwargs)
    (flipped,) = segment(p, [image], tta=TTA(flip=True), **kwargs)
    assert (flipped == plain).all()
    assert len(p.calls) == 3 * len(p.calls[: len(p.calls) // 3])  # the flip ran: twice the plain calls


@pytest.mark.parametrize(
    "mode,scales,flip",
    [
        ("resize", (1.0,), True),
        ("resize", (0.5, 1.0, 1.5), True),
        ("native", (0.75, 1.0, 1.25), False),
        ("native", (0.6, 1.3), True),
    ],
)
def test_fused_labels_equal_the_reference(mode, scales, flip):
    p = PositionalPredictor(blur=1)
    images = [scene(45, 61), scene(45, 61, 1), scene(33, 40, 2)]
    labels = segment(p, images, mode=mode, tta=TTA(scales, flip), batch_size=2)
    for image, lab in zip(images, labels):
        probs = reference_probabilities(p, image, mode, scales, flip, (image.shape[1], image.shape[0]))
        assert_labels_match(lab, probs)


@pytest.mark.parametrize(
    "scales,flip,window,overlap", [((0.5, 1.0, 1.5), True, (24, 16), 0.25), ((0.8, 1.2), False, (16, 16), 0.5)]
)
def test_scales_with_tiles_run_a_sliding_window_inside_each_view(scales, flip, window, overlap):
    """mmseg's slide + aug test: each rescaled (and flipped) image gets its own sliding
    window pass of fixed-size windows; the mean window logits are fused like any view."""
    p = PositionalPredictor(blur=2)
    image = scene(50, 70)
    (labels,) = segment(p, [image], mode="tile", tile_size=window, overlap=overlap, tta=TTA(scales, flip))
    probs = reference_probabilities(p, image, "tile", scales, flip, (70, 50), window=window, overlap=overlap)
    assert_labels_match(labels, probs)
    assert {c[2:] for c in p.calls} <= {(window[1], window[0]), (25, 35)} | {
        (min(window[1], round(50 * s)), min(window[0], round(70 * s))) for s in scales
    }


def test_mean_probabilities_equal_the_reference():
    rng = np.random.default_rng(3)
    views = [rng.normal(size=(5, h, w)).astype(np.float32) * 4 for h, w in ((8, 16), (12, 24), (16, 32), (30, 40))]
    got = mean_probabilities(views, (40, 30))
    ref = torch.stack(
        [F.interpolate(torch.from_numpy(v)[None], size=(30, 40), mode="bilinear")[0].softmax(0) for v in views]
    ).mean(0)
    assert np.abs(got - ref.permute(1, 2, 0).numpy()).max() < 1e-5  # float32 upsampling, as in test_inference
    assert np.abs(mean_probabilities(views, (40, 30), (7, 19)) - got[7:19]).max() < 1e-7
    assert np.allclose(got.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["resize", "native", "tile"])
def test_output_size_other_than_the_image(mode):
    """`sizes`: the logits of every view go to that size (e.g. a raw ground truth's)."""
    p = PositionalPredictor(blur=1)
    image = scene(30, 40)
    (labels,) = segment(p, [image], mode=mode, tile_size=(16, 16), tta=TTA((0.5, 1.0), True), sizes=[(80, 60)])
    probs = reference_probabilities(p, image, mode, (0.5, 1.0), True, (80, 60), window=(16, 16))
    assert_labels_match(labels, probs)


def test_resize_mode_runs_each_scale_at_the_scaled_input_size_batched():
    p = PointwisePredictor()  # input size 32x16
    segment(p, [scene(50, 70), scene(50, 70, 1), scene(9, 13)], mode="resize", tta=TTA((0.5, 1.5), True))
    assert p.calls == [(3, 3, 8, 16), (3, 3, 8, 16), (3, 3, 24, 48), (3, 3, 24, 48)]


def test_fixed_size_model_refuses_scales_except_in_tiles():
    p = PointwisePredictor(fixed_size=(32, 16))
    image = scene(20, 50)
    assert segment(p, [image], mode="resize", tta=TTA(flip=True))[0].shape == (20, 50)
    with pytest.raises(UserError, match="--scales 0.5,1.*--tile"):
        segment(p, [image], mode="resize", tta=TTA((0.5, 1.0)))
    assert segment(p, [image], mode="tile", tta=TTA((0.5, 1.0), True))[0].shape == (20, 50)


def test_parse_scales_and_tta_views():
    assert parse_scales("0.75,1,1.25") == (0.75, 1.0, 1.25) and parse_scales(" 2 ") == (2.0,)
    assert TTA.from_flags("flip", "0.5,1").views() == [(0.5, False), (0.5, True), (1.0, False), (1.0, True)]
    assert TTA.from_flags("none", "1").plain and not TTA.from_flags("flip", "1").plain
    assert TTA((0.75, 1.0, 1.25), True).describe() == "scales 0.75, 1, 1.25 x flip (6 views)"
    assert parse_scales("4") == (4.0,)
    for bad, why in [("0,1", "> 0"), ("1,-2", "> 0"), ("nan", "> 0"), ("inf", "> 0"), ("a,1", "list of numbers")]:
        with pytest.raises(UserError, match=why):
            parse_scales(bad)
    for huge in ("4.01", "1e9"):  # a view of 1e18 pixels ended in an OpenCV traceback, 100 in the OOM killer
        with pytest.raises(UserError, match="at most 4"):
            parse_scales(huge)
    with pytest.raises(UserError, match="repeats"):
        parse_scales("1,1.0")
    with pytest.raises(UserError, match="distinct numbers > 0"):
        TTA(())


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize(
    "flags,message", [(["--scales", "0,1"], "--scales '0,1'"), (["--scales", "x"], "--scales 'x'")]
)
def test_bad_tta_flags_exit_2(tmp_path, capsys, command, flags, message):
    target = ["-i", "a.png", "--checkpoint", "x.pt"] if command == "predict" else ["--run", str(tmp_path)]
    assert main([command, *target, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_tta_choice_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "-i", "a.png", "--checkpoint", "x.pt", "--tta", "rotate"])
    assert e.value.code == 2 and "invalid choice: 'rotate'" in capsys.readouterr().err


def test_predict_with_tta_writes_the_fused_labels(tmp_path):
    """`urbanseg predict --tta flip --scales ...` on a real checkpoint: the labels equal
    the reference fusion of the model's views."""
    from PIL import Image

    from helpers.checkpoints import make_checkpoint
    from urbanseg.inference.predictor import TorchPredictor

    ckpt = make_checkpoint(tmp_path / "best.pt")
    image = scene(40, 70)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(ckpt), "-i", str(tmp_path / "a.png"), "-o", str(out), "--outputs", "labels"]
    tta = ["--tta", "flip", "--scales", "0.75,1.25", "--native", "--device", "cpu", "--engine", "torch"]
    assert main([*args, *tta]) == 0
    labels = np.asarray(Image.open(out / "a_labels.png"))
    predictor = TorchPredictor(Path(ckpt), "cpu")
    assert_labels_match(labels, reference_probabilities(predictor, image, "native", (0.75, 1.25), True, (70, 40)))


@pytest.mark.parametrize("full_res", [False, True])
def test_evaluate_with_tta_scores_the_fused_predictions(tmp_path, full_res):
    """`urbanseg evaluate --tta flip --scales ...`: the confusion matrix is that of the
    reference fusion, at the prepared size, or with --full-res of the raw picture's views at
    the raw ground truth's size, as `predict` segments the raw picture (a view of the shard's
    image, itself the raw one resized, is another picture at every scale but 1)."""
    import json

    from helpers.checkpoints import make_checkpoint
    from helpers.training import make_shards
    from urbanseg.data.loader import ShardDataset
    from urbanseg.inference.predictor import TorchPredictor
    from urbanseg.labels import get_label_set

    shards = make_shards(tmp_path, train=1, val=3)
    ckpt = make_checkpoint(tmp_path / "best.pt")
    run = tmp_path / "run"
    run.mkdir()
    args = ["evaluate", "--run", str(run), "--checkpoint", str(ckpt), "--data", str(shards), "--gallery", "1"]
    tta = ["--tta", "flip", "--scales", "0.75,1", "--device", "cpu", "--engine", "torch"]
    assert main([*args, *tta, *(["--full-res"] if full_res else [])]) == 0
    doc = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert doc["tta"] == {"flip": True, "scales": [0.75, 1.0]}
    assert doc["views_from"] == ("raw images" if full_res else "shard images")
    assert "test-time augmentation: scales 0.75, 1 x flip (4 views)" in (run / "eval" / "val" / "report.md").read_text()
    predictor, c = TorchPredictor(ckpt, "cpu"), get_label_set("categories8").num_classes
    expected, unclear = np.zeros((c, c), np.int64), 0
    for item in ShardDataset(shards, "val"):
        image, gt = item["image"].permute(1, 2, 0).numpy(), item["label"].numpy()
        if full_res:
            (path,) = (tmp_path / "raw" / "gtFine" / "val").glob(f"*/{item['name']}_gtFine_labelIds.png")
            from PIL import Image

            gt = get_label_set("categories8").labels_from_ids(np.asarray(Image.open(path)))
            (raw_image,) = (tmp_path / "raw" / "leftImg8bit" / "val").glob(f"*/{item['name']}_leftImg8bit.png")
            image = np.asarray(Image.open(raw_image).convert("RGB"))
        # evaluate segments as predict does: resized to the model's input size (its default mode)
        probs = reference_probabilities(predictor, image, "resize", (0.75, 1.0), True, (gt.shape[1], gt.shape[0]))
        top2 = np.sort(probs, axis=-1)[..., -2:]
        unclear += int(((top2[..., 1] - top2[..., 0]) <= 1e-5).sum())
        valid = gt != 255
        np.add.at(expected, (gt[valid].astype(int), probs.argmax(-1)[valid]), 1)
    got = np.array(doc["confusion_matrix"])
    assert got.sum() == expected.sum() and np.abs(got - expected).sum() <= 2 * unclear

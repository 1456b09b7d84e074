import numpy as np
import pytest
import torch

from helpers.records import PALETTE, encode_label_as_image, label_image
from urbanseg.data.transforms import Augment, TrainTransform, eval_transform, jitter, shift_hue, window
from urbanseg.errors import UserError

NO_COLOUR = dict(brightness=0, contrast=0, saturation=0, hue=0)


def pair(seed=0, width=48, height=24, block=4):
    label = label_image(np.random.default_rng(seed), width, height, block)
    image = torch.from_numpy(encode_label_as_image(label)).permute(2, 0, 1).contiguous()
    return image, torch.from_numpy(label)


def colour_error(image: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    """(H, W) int: max channel difference between each pixel and its class's palette colour
    (ignore pixels expect the black of padding and of ignore blocks)."""
    table = np.zeros((256, 3), np.int16)
    table[:8] = PALETTE
    return np.abs(image.permute(1, 2, 0).numpy().astype(np.int16) - table[label.numpy()]).max(-1)


def colour_mismatch(image: torch.Tensor, label: torch.Tensor, tol: int = 8) -> np.ndarray:
    return colour_error(image, label) > tol


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("crop", [None, (32, 16), (64, 40)])
def test_alignment_is_exact_without_scaling(crop):
    # per-pixel random classes: any misalignment of one pixel shows
    t = TrainTransform(scale=(1.0, 1.0), crop=crop, **NO_COLOUR)
    for seed in range(20):
        image, label = pair(seed, block=1)
        out_image, out_label = t(image, label, gen(seed))
        assert tuple(out_label.shape) == (crop or (48, 24))[::-1] and out_image.shape[1:] == out_label.shape
        assert not colour_mismatch(out_image, out_label, tol=0).any()


def test_alignment_under_random_scale_and_values_stay_in_set():
    t = TrainTransform(crop=(40, 20), **NO_COLOUR)
    for seed in range(16):
        image, label = pair(seed, block=8)
        out_image, out_label = t(image, label, gen(seed))
        assert out_image.dtype == torch.uint8 and out_label.dtype == torch.uint8
        assert set(np.unique(out_label).tolist()) <= set(np.unique(label).tolist()) | {255}
        bad = colour_mismatch(out_image, out_label)
        # bilinear blends at class borders only: where the label is constant in a 3x3
        # neighbourhood the colour must match (the window's own edge may border unseen pixels)
        lab, h, w = out_label.numpy(), *bad.shape
        same = np.zeros(bad.shape, bool)
        same[1:-1, 1:-1] = True
        for dy in range(3):
            for dx in range(3):
                same[1:-1, 1:-1] &= lab[dy : dy + h - 2, dx : dx + w - 2] == lab[1:-1, 1:-1]
        assert same.mean() > 0.3 and not bad[same].any()
        # and the label is where the image is: shifting it by one pixel matches worse
        for dy, dx in [(-1, 0), (1, 0), (0, -1), (0, 1)]:
            shifted = torch.from_numpy(np.roll(out_label.numpy(), (dy, dx), axis=(0, 1)))
            worse = colour_error(out_image, shifted)[1:-1, 1:-1].sum()
            assert worse > colour_error(out_image, out_label)[1:-1, 1:-1].sum()


def test_padding_uses_fill_for_image_and_ignore_for_label():
    t = TrainTransform(scale=(0.5, 0.5), crop=(48, 24), fill=(7, 8, 9), **NO_COLOUR)
    image, label = pair(1)
    out_image, out_label = t(image, label, gen(0))
    padded = (out_image.permute(1, 2, 0).numpy() == [7, 8, 9]).all(-1)
    assert padded.sum() == 48 * 24 - 24 * 12  # the half-size image fills a quarter of the window
    assert (out_label.numpy()[padded] == 255).all()


def test_flip_flips_both():
    image, label = pair(2)
    t = TrainTransform(scale=(1.0, 1.0), flip=1.0, **NO_COLOUR)
    out_image, out_label = t(image, label, gen(0))
    assert torch.equal(out_image, image.flip(-1)) and torch.equal(out_label, label.flip(-1))
    never = TrainTransform(scale=(1.0, 1.0), flip=0.0, **NO_COLOUR)
    assert torch.equal(never(image, label, gen(0))[1], label)


def test_flip_rate_and_determinism():
    image, label = pair(3)
    flipper = TrainTransform(scale=(1.0, 1.0), **NO_COLOUR)
    flips = [torch.equal(flipper(image, label, gen(s))[1], label.flip(-1)) for s in range(200)]
    assert 0.35 < np.mean(flips) < 0.65
    t = TrainTransform()
    a, b = t(image, label, gen(5)), t(image, label, gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = t(image, label, gen(6))
    assert not torch.equal(a[0], c[0])


def test_photometric_jitter_touches_image_only():
    image, label = pair(4)
    t = TrainTransform(scale=(1.0, 1.0), flip=0.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2)
    out_image, out_label = t(image, label, gen(1))
    assert torch.equal(out_label, label) and not torch.equal(out_image, image)


def test_jitter_identity_and_hue_rotation():
    image, _ = pair(5)
    assert torch.equal(jitter(image), image)
    twice = shift_hue(shift_hue(image, 0.5), 0.5)  # a full turn, up to 8-bit HSV rounding
    assert (twice.int() - image.int()).abs().max() <= 8
    grey = torch.full((3, 4, 4), 128, dtype=torch.uint8)
    assert torch.equal(shift_hue(grey, 0.3), grey)  # no saturation, no hue to rotate
    red = torch.zeros((3, 2, 2), dtype=torch.uint8)
    red[0] = 255
    green = shift_hue(red, 1 / 3)
    assert green[1].min() >= 250 and green[0].max() <= 8 and green[2].max() <= 8


def test_window_pads_outside():
    x = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    out = window(x, -1, 2, 3, 3, 255)
    assert out.tolist() == [[255, 255, 255], [2, 3, 255], [6, 7, 255]]


def test_eval_transform_is_identity():
    image, label = pair(6)
    out_image, out_label = eval_transform(image, label, gen(0))
    assert out_image is image and out_label is label


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale=(2.0, 1.0)), "scale"),
        (dict(flip=1.5), "flip"),
        (dict(brightness=1.0), "brightness"),
        (dict(hue=0.7), "hue"),
        (dict(crop="0x5"), "crop"),
        (dict(fill=(0, 0, 300)), "fill"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(UserError, match=message):
        Augment(**kwargs)


def test_crop_accepts_wxh_string():
    assert Augment(crop="64x32").crop == (64, 32)

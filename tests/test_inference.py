"""urbanseg.inference (engines, segmenting) and urbanseg.imaging on stand-in models: image
decoding, resizing, tiling, batching."""

import cv2
import numpy as np
import pytest
from PIL import Image

from helpers.predictors import PointwisePredictor, scene
from urbanseg.errors import UserError
from urbanseg.imaging import read_image, to_rgb8
from urbanseg.inference.segment import segment, segment_tiled, tile_starts, upsample_argmax, upsample_logits


def test_to_rgb8_converts_every_layout():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert (to_rgb8(grey) == grey[..., None]).all() and to_rgb8(grey).shape == (3, 4, 3)
    rgba = np.dstack([np.full((2, 2), v, np.uint8) for v in (10, 20, 30, 0)])
    assert to_rgb8(rgba)[0, 0].tolist() == [10, 20, 30]  # alpha dropped, colour kept
    sixteen = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    assert (to_rgb8(sixteen)[..., 0] == np.arange(256).reshape(16, 16)).all()
    assert to_rgb8(np.array([[0.0, 0.5, 1.0]], np.float32))[0, :, 0].tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="unsupported"):
        to_rgb8(np.zeros((2, 2, 3), np.int64))


@pytest.mark.parametrize("kind", ["rgba.png", "grey.png", "rgb16.png", "grey16.tif", "rgb.jpg", "pal.gif"])
def test_read_image_any_format(tmp_path, kind):
    rgb = scene(24, 40)
    path = tmp_path / kind
    if kind == "rgba.png":
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "RGBA").save(path)
        expected = rgb
    elif kind == "grey.png":
        Image.fromarray(rgb[..., 0]).save(path)
        expected = np.repeat(rgb[..., :1], 3, 2)
    elif kind == "rgb16.png":
        cv2.imwrite(str(path), rgb[..., ::-1].astype(np.uint16) * 257)
        expected = rgb
    elif kind == "grey16.tif":
        cv2.imwrite(str(path), rgb[..., 1].astype(np.uint16) * 257)
        expected = np.repeat(rgb[..., 1:2], 3, 2)
    elif kind == "rgb.jpg":
        Image.fromarray(rgb).save(path, quality=95)
        expected = None  # lossy: compare with Pillow's decoder (a different JPEG library build)
    else:  # palette GIF: OpenCV cannot decode it, Pillow can
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
        expected = np.asarray(Image.open(path).convert("RGB"))
    got = read_image(path)
    assert got.shape == (24, 40, 3) and got.dtype == np.uint8
    if expected is None:
        pil = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert np.abs(got.astype(int) - pil).max() <= 2
    else:
        assert (got == expected).all()


@pytest.mark.parametrize("kind", ["jpg", "png", "webp"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_read_image_turns_a_photo_upright(tmp_path, kind, orientation):
    """A camera's EXIF orientation is applied, as viewers, labelme and `prepare` (for
    training photos) do: `predict` and `serve` see the picture the user sees."""
    from PIL import ImageOps

    rgb = scene(24, 40)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo.{kind}"
    Image.fromarray(rgb).save(
        path,
        exif=exif.tobytes(),
        **({"quality": 95} if kind == "jpg" else {"lossless": True} if kind == "webp" else {}),
    )
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")).astype(int)
    got = read_image(path)
    assert got.shape == upright.shape and got.shape[:2] == ((24, 40) if orientation == 3 else (40, 24))
    assert np.abs(got.astype(int) - upright).max() <= 2


def test_read_image_names_a_corrupt_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(bad)


@pytest.mark.parametrize(
    "shape,size",
    [
        ((5, 7, 9), (31, 20)),
        ((3, 16, 32), (64, 32)),
        ((4, 20, 30), (13, 9)),
        ((2, 8, 8), (8, 40)),
        ((1, 6, 4), (30, 6)),
    ],
)
def test_upsample_logits_matches_torch_bilinear(shape, size):
    torch = pytest.importorskip("torch")
    logits = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(logits)[None], size=(size[1], size[0]), mode="bilinear", align_corners=False
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert upsample_logits(logits, size).shape == ref.shape
    assert np.abs(upsample_logits(logits, size) - ref).max() < 1e-5
    assert np.abs(upsample_logits(logits, size, (3, 5)) - ref[3:5]).max() < 1e-5
    banded = upsample_argmax(logits, size, band=4)  # bands of 4 rows give the whole-image argmax
    assert (banded == ref.argmax(-1)).mean() > 0.999


def test_resize_mode_outputs_at_input_resolution_and_batches():
    p = PointwisePredictor()
    images = [scene(50, 70), scene(50, 70, 1), scene(9, 13), scene(200, 100)]
    labels = segment(p, images, mode="resize", batch_size=3)
    assert [lab.shape for lab in labels] == [im.shape[:2] for im in images]
    assert p.calls == [(3, 3, 16, 32), (1, 3, 16, 32)]  # resized to the input size, batched


def test_native_mode_batches_runs_of_equal_size_and_is_pointwise_exact():
    p = PointwisePredictor()
    images = [scene(20, 30), scene(20, 30, 1), scene(25, 30)]
    labels = segment(p, images, mode="native", batch_size=4)
    assert p.calls == [(2, 3, 20, 30), (1, 3, 25, 30)]
    for im, lab in zip(images, labels, strict=False):
        direct = np.einsum("kc,hwc->hwk", p.weights, im / 255.0).argmax(-1)
        assert (lab == direct).all()


def test_tile_starts_cover_the_length():
    assert tile_starts(10, 20, 0.5) == [0]
    assert tile_starts(100, 40, 0.25) == [0, 30, 60]
    assert tile_starts(100, 40, 0.0) == [0, 40, 60]
    for length, window, overlap in [(517, 64, 0.3), (64, 64, 0.5), (1000, 7, 0.9)]:
        starts = tile_starts(length, window, overlap)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + window] = True
        assert covered.all() and starts[-1] + window == length and starts == sorted(set(starts))


@pytest.mark.parametrize("window,overlap", [((16, 8), 0.25), ((32, 32), 0.5), ((7, 5), 0.0), ((64, 64), 0.3)])
def test_tiling_equals_untiled_for_a_pointwise_model(window, overlap):
    p = PointwisePredictor()
    image = scene(45, 61)
    (native,) = segment(p, [image], mode="native")
    assert (segment_tiled(p, image, window, overlap=overlap, batch_size=3) == native).all()


def test_tiling_equals_untiled_when_the_window_covers_the_image():
    p = PointwisePredictor(blur=3)  # a real receptive field: only a covering window is exact
    image = scene(30, 40)
    (native,) = segment(p, [image], mode="native")
    assert (segment(p, [image], mode="tile", tile_size=(40, 30))[0] == native).all()
    assert (segment(p, [image], mode="tile", tile_size=(100, 100))[0] == native).all()
    tiled = segment(p, [image], mode="tile", tile_size=(16, 16), overlap=0.5)[0]
    assert tiled.shape == native.shape and (tiled == native).mean() > 0.8  # close, not equal: edges differ


def test_tiling_averages_overlapping_logits():
    """Two windows over a 1x3 strip overlapping in the middle pixel: its logits are the
    mean of both windows' logits, which this stand-in makes differ per window."""

    class WindowDependent(PointwisePredictor):
        def logits(self, batch):
            out = np.zeros((len(batch), 8, *batch.shape[2:]), np.float32)
            for i, crop in enumerate(batch):  # class 1 if the window starts with red, else class 2
                out[i, 1 if crop[0, 0, 0] > 128 else 2] = 1.0 if crop[0, 0, 0] > 128 else 0.6
                out[i, 3] = 0.7
            return out

    image = np.zeros((1, 3, 3), np.uint8)
    image[0, 0, 0] = 255
    labels = segment_tiled(WindowDependent(), image, (2, 1), overlap=0.5)
    # pixel 0: only window A (class 1, 1.0 vs 0.7); pixel 2: only window B (class 3, 0.7 > 0.6);
    # pixel 1: mean of A and B = class1 0.5, class2 0.3, class3 0.7 -> class 3.
    assert labels.tolist() == [[1, 3, 3]]


def test_fixed_size_model_pads_tiles_and_refuses_native():
    p = PointwisePredictor(fixed_size=(32, 16))
    image = scene(20, 50)
    (native,) = segment(PointwisePredictor(), [image], mode="native")
    assert (segment(p, [image], mode="tile")[0] == native).all()  # padded windows, cropped back
    assert segment(p, [image], mode="resize")[0].shape == (20, 50)
    with pytest.raises(UserError, match="fixed 32x16"):
        segment(p, [image], mode="native")

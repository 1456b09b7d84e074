"""The loader's fast paths give exactly what the plain ones give: kornia-rs and OpenCV decode
every PNG to the same pixels, the HWC -> CHW split equals a permute, the one-buffer collate
holds the items' values, labels cross the DataLoader as uint8 (docs/benchmarks.md#loader)."""

import os
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

from helpers.records import pack_dir
from urbanseg.data import pixels
from urbanseg.data.loader import ShardDataset, build_loader, collate
from urbanseg.data.pixels import decode_png, to_pixels, to_planes


def png_bytes(array: np.ndarray, filters: list[int]) -> bytes:
    """An 8-bit greyscale (H, W) or RGB (H, W, 3) PNG whose row y uses filter type
    filters[y % len(filters)] (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth; PNG spec 9.2), so
    a decoder must undo each kind. Filtering reads raw neighbours only: vectorised here."""
    h, w = array.shape[:2]
    bpp = 1 if array.ndim == 2 else 3
    raw = array.reshape(h, w * bpp).astype(np.int16)
    left = np.pad(raw, ((0, 0), (bpp, 0)))[:, :-bpp]
    up = np.pad(raw, ((1, 0), (0, 0)))[:-1]
    up_left = np.pad(up, ((0, 0), (bpp, 0)))[:, :-bpp]
    p = left + up - up_left
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    predictions = [np.zeros_like(raw), left, up, (left + up) // 2, paeth]
    rows = b"".join(
        bytes([f]) + ((raw[y] - predictions[f][y]) % 256).astype(np.uint8).tobytes()
        for y, f in ((y, filters[y % len(filters)]) for y in range(h))
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if bpp == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


@pytest.fixture(params=["kornia-rs", "opencv"])
def decoder(request, monkeypatch):
    """Run the test with each decoder: kornia-rs (skipped when not installed) and OpenCV."""
    if request.param == "kornia-rs":
        pytest.importorskip("kornia_rs")
        assert pixels.PNG_DECODER == "kornia-rs"
    else:
        monkeypatch.setattr(pixels, "_kornia_io", None)
    return request.param


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth gradients (predictable rows) plus noise (every byte value)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    noisy = rng.integers(0, 256, (h, w, 3))
    return np.where(rng.random((h, w, 1)) < 0.3, noisy, smooth).astype(np.uint8)


@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [0, 1, 2, 3, 4]])
def test_every_png_filter_type_decodes_exactly(decoder, filters):
    image = scene(37, 53)
    label = (image[..., 0] // 32).astype(np.uint8)
    label[5:9, 10:30] = 255
    got = decode_png(png_bytes(image, filters), (37, 53), grey=False)
    assert got is not None and got.dtype == np.uint8 and np.array_equal(got, image)
    got = decode_png(png_bytes(label, filters), (37, 53), grey=True)
    assert got is not None and got.shape == (37, 53) and np.array_equal(got, label)


def test_other_png_kinds_sizes_and_garbage_decode_as_opencv_does(decoder):
    image = scene(16, 24, seed=1)
    bgra = np.dstack([image[..., ::-1], np.full((16, 24), 200, np.uint8)])
    rgba_png = cv2.imencode(".png", bgra)[1].tobytes()
    assert np.array_equal(decode_png(rgba_png, (16, 24), grey=False), image)  # alpha dropped
    grey_png = cv2.imencode(".png", image[..., 0])[1].tobytes()
    assert np.array_equal(decode_png(grey_png, (16, 24), grey=False), np.repeat(image[..., :1], 3, -1))
    # another size than expected: its own pixels (the dataset then names the mismatch)
    assert np.array_equal(decode_png(png_bytes(image, [4]), (8, 24), grey=False), image)
    deep = cv2.imencode(".png", image[..., 0].astype(np.uint16) * 257)[1].tobytes()
    assert decode_png(deep, (16, 24), grey=True).dtype == np.uint16  # the dataset rejects it
    good = png_bytes(image, [4])
    assert decode_png(b"not a png", (16, 24), grey=False) is None
    assert decode_png(good[: len(good) // 2], (16, 24), grey=False) is None


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pack_dir(tmp_path_factory.mktemp("data"), {"train": 9}, shards=2)[1]


def test_batches_do_not_depend_on_the_decoder(shards, monkeypatch):
    pytest.importorskip("kornia_rs")

    def epoch():
        ld = build_loader(shards, "train", batch_size=4, train=True, workers=0, seed=2, augment={"crop": (24, 12)})
        return [(b["id"].tolist(), b["image"].clone(), b["label"].clone()) for b in ld]

    fast = epoch()
    monkeypatch.setattr(pixels, "_kornia_io", None)
    plain = epoch()
    assert len(fast) == len(plain) == 3
    for (ia, xa, ya), (ib, xb, yb) in zip(fast, plain):
        assert ia == ib and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_layout_changes_equal_permutes():
    image = scene(20, 31, seed=3)
    planes = to_planes(image)
    assert planes.is_contiguous() and torch.equal(planes, torch.from_numpy(image).permute(2, 0, 1))
    back = to_pixels(planes)
    assert back.flags.c_contiguous and np.array_equal(back, image)


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_packs_uint8_batches_into_one_buffer(shards, workers):
    ds = ShardDataset(shards, "train")
    batches = list(build_loader(shards, "train", batch_size=4, train=False, workers=workers))
    assert [b["id"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    for b in batches:
        assert b["image"].dtype == b["label"].dtype == torch.uint8 and b["id"].dtype == torch.int64
        storage = b["image"].untyped_storage().data_ptr()
        assert b["label"].untyped_storage().data_ptr() == b["id"].untyped_storage().data_ptr() == storage
        assert b["image"].is_shared() == (workers > 0)  # made in shared memory by a worker
        for k, i in enumerate(b["id"].tolist()):
            item = ds[i]
            assert torch.equal(b["image"][k], item["image"]) and torch.equal(b["label"][k], item["label"])
            assert b["name"][k] == item["name"]
    # an odd batch and an odd size: the ids stay aligned at the start of the buffer
    items = [
        {"image": torch.full((3, 3, 5), i, dtype=torch.uint8), "label": torch.full((3, 5), 9 - i, dtype=torch.uint8)}
        | {"name": f"n{i}", "id": 10 + i}
        for i in range(3)
    ]
    b = collate(items)
    assert b["id"].tolist() == [10, 11, 12] and b["name"] == ["n0", "n1", "n2"]
    assert b["image"][:, 0, 0, 0].tolist() == [0, 1, 2] and b["label"][:, 2, 4].tolist() == [9, 8, 7]


@pytest.mark.parametrize("factor", [0.0, 0.3, 0.75, 0.97, 1.03, 1.25, 1.99])
def test_jitter_matches_torchvision_within_rounding(factor):
    """Each colour op against torchvision's functional op, which truncates where OpenCV
    rounds (and floors the luma): within 2 levels, less than 1 level on average."""
    import torchvision.transforms.v2.functional as F

    from urbanseg.data.transforms import jitter

    image = torch.from_numpy(scene(64, 96, seed=4)).permute(2, 0, 1).contiguous()
    cases = [
        (jitter(image, brightness=factor), F.adjust_brightness(image, factor)),
        (jitter(image, contrast=factor), F.adjust_contrast(image, factor)),
        (jitter(image, saturation=factor), F.adjust_saturation(image, factor)),
    ]
    for ours, reference in cases:
        diff = ours.int() - reference.int()
        assert ours.dtype == torch.uint8 and ours.shape == image.shape
        assert diff.abs().max() <= 2 and diff.float().mean().abs() <= 1


LEAKED_LOADER = """
import os, subprocess, sys, time
from urbanseg.data.loader import build_loader
loader = build_loader(sys.argv[1], "train", batch_size=4, train=True, workers=2)
it = iter(loader)
next(it)
pids = [w.pid for w in it._workers]
print(" ".join(map(str, pids)), flush=True)
if sys.argv[2] == "group-sigterm":  # as timeout/Slurm/systemd: every process of the job
    subprocess.run(["kill", "-TERM", *map(str, pids)], check=True)  # sent by another process
    time.sleep(0.5)
    assert all(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in pids), "a worker died of another's SIGTERM"
# exits with the iterator (and its workers) still alive: multiprocessing ends them at exit
"""


@pytest.mark.parametrize("how", ["plain", "group-sigterm"])
def test_workers_outlive_a_foreign_sigterm_and_end_with_their_trainer(shards, tmp_path, how):
    """Workers ignore SIGTERM from others (the trainer stops them after its step) but not
    their trainer's: a loader still running at exit must not hang the process."""
    import subprocess
    import sys

    from helpers.training import subprocess_env

    script = tmp_path / "leak.py"
    script.write_text(LEAKED_LOADER)
    result = subprocess.run(
        [sys.executable, str(script), str(shards), how],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr
    for pid in map(int, result.stdout.split()):
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its trainer"

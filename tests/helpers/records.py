"""Tiny prepared folders and shards made without `urbanseg prepare` (fast, any size), and
a TFRecord corrupter: the fixtures of the codec, loader and transform tests."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from urbanseg.config import PackConfig
from urbanseg.data.pack import pack
from urbanseg.labels import get_label_set

# Prepared fixtures in `urbanseg prepare`'s layout: the image's colour encodes the label
# (PALETTE[label], black where ignored) so tests can check image/label alignment.
PALETTE = np.array([[40 * k % 256, 255 - 30 * k, (90 * k) % 256] for k in range(8)], np.uint8)


def label_image(rng: np.random.Generator, width: int, height: int, block: int = 4) -> np.ndarray:
    """(H, W) uint8 blocky random classes 0..7 with a few 255 (ignore) blocks."""
    small = rng.integers(0, 8, (height // block + 1, width // block + 1)).astype(np.uint8)
    small[rng.random(small.shape) < 0.05] = 255
    return np.kron(small, np.ones((block, block), np.uint8))[:height, :width]


def encode_label_as_image(label: np.ndarray) -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    table[:8] = PALETTE
    return table[label]


def make_prepared(root: Path, splits: dict[str, int], size: tuple[int, int] = (32, 16), seed: int = 0) -> Path:
    """A tiny prepared folder: cities "aachen"/"bonn", stems in Cityscapes style."""
    rng = np.random.default_rng(seed)
    width, height = size
    manifest = {
        "format_version": 1,
        "label_set": get_label_set("categories8").to_dict(),
        "size": [width, height],
        "data": str(root / "raw"),
        "splits": {},
    }
    for split, count in splits.items():
        stems, counts = [], np.zeros(256, np.int64)
        for i in range(count):
            city = ("aachen", "bonn")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            label = label_image(rng, width, height)
            for kind, array in (("images", encode_label_as_image(label)[..., ::-1]), ("labels", label)):
                path = root / kind / split / city / f"{stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), array)
            stems.append(stem)
            counts += np.bincount(label.ravel(), minlength=256)
        manifest["splits"][split] = {"count": count, "stems": stems[::-1], "pixel_counts": counts[:8].tolist()}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def pack_dir(tmp_path: Path, splits=None, shards: int = 2, **kw) -> tuple[Path, Path]:
    prepared = make_prepared(tmp_path / "prepared", splits or {"train": 5, "val": 3}, **kw)
    out = tmp_path / "shards"
    pack(PackConfig(prepared=prepared, out=out, shards=shards))
    return prepared, out


def corrupt(path: Path, how: str, record_offset: int) -> None:
    blob = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(blob[: record_offset + 30])
        return
    pos = {
        "length": record_offset + 1,
        "length_crc": record_offset + 9,
        "data": record_offset + 40,
        "data_crc": record_offset + int.from_bytes(blob[record_offset : record_offset + 8], "little") + 13,
    }[how]
    blob[pos] ^= 0x10
    path.write_bytes(bytes(blob))

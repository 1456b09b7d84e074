"""Tiny raw Cityscapes-layout datasets for tests, annotated the way Cityscapes is.

Each scene is a list of labelled polygons (``_gtFine_polygons.json``) rendered into
``_gtFine_labelIds.png`` and ``_gtFine_color.png`` by the official cityscapesScripts
(``json2labelImg.createLabelImage``: drawn in order, colour images RGBA, license plates
not drawn), plus a textured ``_leftImg8bit.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from urbanseg.labels import NAME_TO_LABEL

# Labels the random polygons use: every category, the shared colours (pole/polegroup,
# the black void labels, car/license plate) and the group suffix Cityscapes uses.
SCENE_LABELS = (
    "building",
    "wall",
    "fence",
    "vegetation",
    "terrain",
    "pole",
    "polegroup",
    "traffic sign",
    "traffic light",
    "person",
    "rider",
    "car",
    "cargroup",
    "truck",
    "bicycle",
    "dynamic",
    "ground",
    "parking",
    "static",
    "license plate",
    "ego vehicle",
    "rectification border",
)
VOID_LABELS = ("unlabeled", "ego vehicle", "rectification border", "out of roi")


def _polygon(rng: np.random.Generator, w: int, h: int) -> list[list[int]]:
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    n = int(rng.integers(3, 7))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(0.05, 0.35) * min(w, h) * rng.uniform(0.5, 1.5, n)
    return [[int(cx + r * np.cos(a)), int(cy + r * np.sin(a))] for a, r in zip(angles, radius)]


def scene_objects(rng: np.random.Generator, w: int, h: int, void_only: bool = False) -> list[dict]:
    """Polygons in drawing order: sky, road and sidewalk bands, then random objects."""
    if void_only:  # like the Cityscapes test split: nothing but void
        return [{"label": str(rng.choice(VOID_LABELS)), "polygon": _polygon(rng, w, h)} for _ in range(3)]
    horizon = int(h * rng.uniform(0.3, 0.5))
    objects = [
        {"label": "sky", "polygon": [[0, 0], [w - 1, 0], [w - 1, horizon], [0, horizon]]},
        {"label": "road", "polygon": [[0, horizon], [w - 1, horizon], [w - 1, h - 1], [0, h - 1]]},
        {"label": "sidewalk", "polygon": [[0, horizon], [w // 4, horizon], [0, h - 1]]},
    ]
    objects += [{"label": str(rng.choice(SCENE_LABELS)), "polygon": _polygon(rng, w, h)} for _ in range(12)]
    return objects


def render(objects: list[dict], w: int, h: int, encoding: str) -> Image.Image:
    """The official renderer: encoding "ids" -> mode L label ids, "color" -> RGBA colours."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    annotation = Annotation()
    annotation.fromJsonText(json.dumps({"imgWidth": w, "imgHeight": h, "objects": objects}))
    return createLabelImage(annotation, encoding)


def image_for(ids: np.ndarray, rng: np.random.Generator, noise: float = 12.0) -> np.ndarray:
    """(H, W) label ids -> (H, W, 3) uint8 RGB: label colours, a gradient and noise."""
    palette = np.zeros((256, 3), np.float32)
    for label in NAME_TO_LABEL.values():
        palette[label.id & 0xFF] = label.color
    h, w = ids.shape
    shade = np.linspace(0.7, 1.1, w, dtype=np.float32)[None, :, None]
    noisy = palette[ids] * shade + rng.normal(0, noise, (h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write_raw_cityscapes(
    root: Path,
    splits: dict[str, int] | None = None,
    size: tuple[int, int] = (64, 32),
    seed: int = 0,
    cities: tuple[str, ...] = ("aachen", "bremen"),
    noise: float = 12.0,
) -> list[Path]:
    """Write scenes in Cityscapes layout under `root`; returns the image paths.

    `splits` maps split -> number of scenes (default train 3, val 2); the "test" split
    is void only, like the real one. Scenes go round-robin over `cities`; `noise` is the
    image noise's standard deviation (2 gives PNGs of ~2.8 MB at 2048x1024; Cityscapes' are ~2.2 MB)."""
    splits = {"train": 3, "val": 2} if splits is None else splits
    rng = np.random.default_rng(seed)
    w, h = size
    images = []
    for split, count in splits.items():
        for k in range(count):
            city = cities[k % len(cities)]
            stem = f"{city}_{k:06d}_000019"
            objects = scene_objects(rng, w, h, void_only=split == "test")
            gt = root / "gtFine" / split / city
            gt.mkdir(parents=True, exist_ok=True)
            (gt / f"{stem}_gtFine_polygons.json").write_text(
                json.dumps({"imgHeight": h, "imgWidth": w, "objects": objects})
            )
            ids = render(objects, w, h, "ids")
            ids.save(gt / f"{stem}_gtFine_labelIds.png")
            render(objects, w, h, "color").save(gt / f"{stem}_gtFine_color.png")
            image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_for(np.asarray(ids), rng, noise)).save(image)
            images.append(image)
    return images

"""`urbanseg synth`: a synthetic Cityscapes, written in the exact Cityscapes layout.

    <out>/leftImg8bit/<split>/<city>/<city>_<seq:06d>_000019_leftImg8bit.png    RGB photo
    <out>/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png     uint8 label ids
    <out>/gtFine/<split>/<city>/<stem>_gtFine_color.png        RGBA official label colours
    <out>/gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png  16-bit: id*1000+k or plain id
    <out>/gtFine/<split>/<city>/<stem>_gtFine_polygons.json    imgHeight, imgWidth, objects
    <out>/synth_config.yaml                                    the flags that made it

or, with ``--layout pairs``, paired folders (what `prepare --images --masks` reads by default):

    <out>/images/<split>/<city>/<stem>.png                     RGB photo
    <out>/masks/<split>/<city>/<stem>.png                      uint8 categories8 class indices

or, with ``--layout labelme``, the photos with labelme's JSON beside them (the polygons,
named with Cityscapes labels, in drawing order):

    <out>/images/<split>/<city>/<stem>.png, <stem>.json

Scene i of a split is drawn from its own random stream seeded by (seed, split, i), so
the bytes do not depend on --workers and a larger --train extends a smaller run. The
label images are the JSON polygons rasterised in order as cityscapesscripts'
json2labelImg / json2instanceImg do (license plates, id -1, are listed but not drawn).
"""

from __future__ import annotations

import fnmatch
import io
import json
import zlib
from pathlib import Path

import numpy as np

from urbanseg import outputs
from urbanseg.config import SynthConfig, parse_size
from urbanseg.config import save as save_config
from urbanseg.errors import UserError
from urbanseg.imaging import draw_polygons
from urbanseg.labels import CATEGORIES, LABELS, categories8, polygon_values
from urbanseg.memory import check_synth as check_synth_memory
from urbanseg.synth.layout import compose
from urbanseg.synth.render import clip_polygon, render
from urbanseg.util import default_workers, progress_map, temporary_glob, write_if_changed

SPLITS = ("train", "val", "test")
# Fake city names: a few per split, so the folder structure looks like Cityscapes'.
CITIES = {"train": ("synthburg", "pixelstadt", "rasterdam"), "val": ("valhausen", "meshingen"), "test": ("testfurt",)}
FRAME = 19  # Cityscapes annotates the 20th frame of each 30-frame snippet
MAX_ATTEMPTS = 8  # a scene missing one of the 8 categories (e.g. all people occluded) is redrawn
CONFIG_NAME = "synth_config.yaml"
LAYOUT_FOLDERS = {"cityscapes": ("leftImg8bit", "gtFine"), "pairs": ("images", "masks"), "labelme": ("images",)}
LABELME_VERSION = "5.4.1"  # the labelme release whose JSON fields these files carry


def stem(split: str, index: int) -> tuple[str, str]:
    """(city, stem) of scene `index` of `split`, e.g. ("synthburg", "synthburg_000000_000019")."""
    cities = CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_{FRAME:06d}"


def scene_paths(out: Path, split: str, index: int, layout: str = "cityscapes") -> dict[str, Path]:
    """The files of scene `index` of `split` in `layout`, by kind (the photo is "image")."""
    city, name = stem(split, index)
    if layout == "pairs":
        return {
            "image": out / "images" / split / city / f"{name}.png",
            "mask": out / "masks" / split / city / f"{name}.png",
        }
    if layout == "labelme":
        folder = out / "images" / split / city
        return {"image": folder / f"{name}.png", "labelme": folder / f"{name}.json"}
    gt = out / "gtFine" / split / city / f"{name}_gtFine_"
    return {
        "image": out / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png",
        "labelIds": Path(f"{gt}labelIds.png"),
        "color": Path(f"{gt}color.png"),
        "instanceIds": Path(f"{gt}instanceIds.png"),
        "polygons": Path(f"{gt}polygons.json"),
    }


def generate(seed: int, split: str, index: int, width: int, height: int) -> dict:
    """One scene: {"image": (H, W, 3) uint8, "labelIds": (H, W) uint8, "instanceIds": (H, W)
    uint16, "color": (H, W, 4) uint8, "polygons": dict (the JSON), "categories": (8,) int64
    pixel counts}. Deterministic in its arguments."""
    for attempt in range(MAX_ATTEMPTS):
        key = [seed % 2**63, zlib.crc32(split.encode()), index, attempt]
        rng = np.random.default_rng(np.random.SeedSequence(key))
        scene = compose(rng, width, height)
        shapes, polys = [], []
        for shape in scene.shapes:
            poly = clip_polygon(shape.polygon, width, height)
            if poly is not None:
                shapes.append(shape)
                polys.append(poly)
        ids, instances = polygon_values([s.label or "" for s in shapes])
        drawn = [k for k, i in enumerate(ids) if i >= 0]
        label_ids = draw_polygons((width, height), [polys[k] for k in drawn], [ids[k] for k in drawn], "L")
        cat_of_id = np.zeros(256, np.int64)
        for label in LABELS:
            cat_of_id[label.id & 0xFF] = label.categoryId
        categories = np.bincount(cat_of_id[label_ids].ravel(), minlength=len(CATEGORIES))
        if (categories > 0).all():
            break
    instance_ids = draw_polygons((width, height), [polys[k] for k in drawn], [instances[k] for k in drawn], "I")
    palette = np.zeros((256, 4), np.uint8)
    palette[:, 3] = 255
    for label in LABELS:
        if label.id >= 0:
            palette[label.id, :3] = label.color
    objects = [{"label": s.label, "polygon": p.tolist()} for s, p in zip(shapes, polys, strict=True)]
    return {
        "image": render(scene, shapes, polys, rng),
        "labelIds": label_ids,
        "instanceIds": instance_ids.astype(np.uint16),
        "color": palette[label_ids],
        "polygons": {"imgHeight": height, "imgWidth": width, "objects": objects},
        "categories": categories,
    }


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def labelme_json(polygons: dict, image_name: str) -> dict:
    """A scene's polygons (`generate`'s "polygons") as labelme's JSON for the photo
    `image_name` beside it: one polygon shape per object, in drawing order."""
    shapes = [
        {
            "label": obj["label"],
            "points": obj["polygon"],
            "group_id": None,
            "description": "",
            "shape_type": "polygon",
            "flags": {},
            "mask": None,
        }
        for obj in polygons["objects"]
    ]
    return {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": shapes,
        "imagePath": image_name,
        "imageData": None,
        "imageHeight": polygons["imgHeight"],
        "imageWidth": polygons["imgWidth"],
    }


def _json(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def _make_one(job: tuple) -> np.ndarray:
    """Generate and write scene `index` of `split`; job = (out, seed, split, index, width,
    height[, layout]) (layout "cityscapes" when left out). Returns the scene's (8,) category
    pixel counts. The photo is written first and the annotations after it, each file atomically."""
    out, seed, split, index, width, height, *rest = job
    layout = rest[0] if rest else "cityscapes"
    scene = generate(seed, split, index, width, height)
    paths = scene_paths(out, split, index, layout)
    write_if_changed(paths["image"], _png(scene["image"]))
    if layout == "pairs":
        write_if_changed(paths["mask"], _png(categories8().labels_from_ids(scene["labelIds"])))
    elif layout == "labelme":
        write_if_changed(paths["labelme"], _json(labelme_json(scene["polygons"], paths["image"].name)))
    else:
        for key in ("labelIds", "color", "instanceIds"):
            write_if_changed(paths[key], _png(scene[key]))
        write_if_changed(paths["polygons"], _json(scene["polygons"]))
    return scene["categories"]


def _scene_files(config: SynthConfig) -> list[Path]:
    out = Path(config.out)
    return [p for d in LAYOUT_FOLDERS[config.layout] for p in (out / d).rglob("*") if p.is_file()]


def _is_leftover(path: Path) -> bool:
    """A temporary file of `atomic_path`'s, left by a killed run (removed by the next one)."""
    return fnmatch.fnmatchcase(path.name, temporary_glob())


def _check_output(config: SynthConfig, planned: set[Path]) -> None:
    """Refuse to mix into a synth folder (`outputs.claim` checked it is one) holding
    something else: it must have been made with the same --seed and --size (then it is
    completed or extended) and hold no scene files beyond the planned ones. Reads only."""
    import yaml

    out = Path(config.out)
    saved = out / CONFIG_NAME
    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {saved}: {e}; delete the folder or choose another --out") from None
    layout = old.get("layout", "cityscapes")  # (synth_config.yaml files from before --layout)
    if (old.get("seed"), old.get("size"), layout) != (config.seed, config.size, config.layout):
        raise UserError(
            f"--out {out} holds a synthetic dataset made with --seed {old.get('seed')} --size "
            f"{old.get('size')} --layout {layout}, not --seed {config.seed} --size {config.size} --layout "
            f"{config.layout}; rerun with those flags to complete or extend it, or choose a new folder"
        )
    existing = {p for p in _scene_files(config) if not _is_leftover(p)}
    extra = sorted(existing - planned)
    if extra:
        raise UserError(
            f"--out {out} holds {len(extra)} scene file(s) this run would not write (e.g. {extra[0]}), "
            "from a run with more scenes; give the same --train/--val/--test as before, or a new folder"
        )


def synthesize(config: SynthConfig) -> int:
    """Write the dataset described by `config` (see the module docstring)."""
    check_synth_memory(config)
    width, height = parse_size(config.size)
    out = Path(config.out)
    counts = {"train": config.train, "val": config.val, "test": config.test}
    jobs = [
        (out, config.seed, split, i, width, height, config.layout) for split in SPLITS for i in range(counts[split])
    ]
    planned = {p for job in jobs for p in scene_paths(out, job[2], job[3], config.layout).values()}
    with outputs.claim(out, "synth", check=lambda: _check_output(config, planned)):
        save_config(config, out / CONFIG_NAME)  # first: an interrupted run can be resumed by rerunning it
        for leftover in filter(_is_leftover, _scene_files(config)):
            leftover.unlink()
        workers = config.workers or default_workers()
        results = progress_map(_make_one, jobs, workers=workers, desc=f"synth {width}x{height}")
    print(f"wrote {len(jobs)} scenes to {out}")
    for split in SPLITS:
        rows = [r for r, job in zip(results, jobs, strict=True) if job[2] == split]
        if rows:
            total = np.sum(rows, axis=0)
            shares = ", ".join(f"{c} {100 * n / total.sum():.1f}%" for c, n in zip(CATEGORIES, total, strict=True))
            print(f"  {split}: {len(rows)} scene(s); pixel shares: {shares}")
    return 0

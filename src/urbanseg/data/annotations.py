"""Reading raw annotations into class indices of a label set, one reader per kind
(`urbanseg prepare --source`):

- ``labelIds``  single-channel PNG of Cityscapes label ids (Cityscapes, KITTI semantics);
- ``trainIds``  single-channel PNG of Cityscapes training ids, 255 ignored (BDD100K);
- ``indices``   single-channel PNG of the label set's own class indices, 255 ignored;
- ``color``     RGB(A) PNG of label colours;
- ``polygons``  Cityscapes ``*_gtFine_polygons.json``: {"imgWidth", "imgHeight", "objects":
  [{"label", "polygon": [[x, y], ...], "deleted"?}]};
- ``labelme``   labelme's JSON: {"imageWidth", "imageHeight", "flags", "shapes": [{"label",
  "points", "shape_type", "flags"}]}.

Polygon files are drawn in their order with `urbanseg.imaging.draw_shapes` (PIL, fill only:
json2labelImg's pixels), names mapped by `LabelSet.class_of_name`, the uncovered pixels
`LabelSet.background_class()`. What a file holds but urbanseg does not draw (labelme flags
that are set, labelme lines and points, which have no area) comes back as notes to report.
Every problem is a `BadFile` whose message names the file and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from urbanseg.imaging import Shape, draw_shapes
from urbanseg.labels import LabelSet, cityscapes_label, label_ids_from_train_ids, polygon_values
from urbanseg.schema import FormatError, Node

PNG_SOURCES = ("labelIds", "trainIds", "indices", "color")
JSON_SOURCES = ("polygons", "labelme")
# Kinds that give Cityscapes label ids (the official scores) to a Cityscapes label set, and
# those that also give instance ids (the official iIoU).
ID_SOURCES = ("labelIds", "trainIds", "polygons")
INSTANCE_SOURCES = ("polygons",)
_SINGLE_CHANNEL = ("labelIds", "trainIds", "indices")
# labelme shapes without an area: nothing to fill, so they are skipped and reported.
_LABELME_SKIPPED = ("line", "linestrip", "point", "points")
_FIX_VALUES = {
    "labelIds": "is it a Cityscapes *_labelIds.png (not trainIds or instanceIds)? masks of training ids are read "
    "with --source trainIds, the label set's class indices with --source indices",
    "trainIds": "are these Cityscapes training ids (0-18, 255 ignore)? masks of label ids are read with "
    "--source labelIds, the label set's class indices with --source indices",
    "indices": "masks of Cityscapes label ids are read with --source labelIds, training ids with --source "
    "trainIds; or choose the label set they index with --labels",
    "color": "add them to your labelmap.json, or re-export the annotation without anti-aliasing/JPEG blending",
}


class BadFile(ValueError):
    """A raw file that cannot be prepared; the message names it and the fix."""


@dataclass(frozen=True)
class Drawing:
    """A polygon annotation file, parsed: its image size (W, H), the shapes to fill in
    order as (kind, points, label name), and notes on what it holds but is not drawn."""

    size: tuple[int, int]
    shapes: tuple[tuple[Shape, tuple[tuple[float, float], ...], str], ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Truth:
    """A raw annotation at its own size, as `evaluate --full-res` scores against it:
    (H, W) uint8 class indices, and where the annotation allows, (H, W) uint8 Cityscapes
    label ids and (H, W) int32 instance ids (None where it does not)."""

    classes: np.ndarray
    ids: np.ndarray | None = None
    instances: np.ndarray | None = None


# --------------------------------------------------------------------------- images


def _decode_error(path: Path) -> str:
    """Why a file could not be decoded, in PIL's words (OpenCV only returns None)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "OpenCV cannot decode it"


def read_bgr(path: Path, *, photo: bool = True) -> np.ndarray:
    """A raw image file -> (H, W, 3) uint8 BGR (grey, palette and RGBA are converted). A
    photo is turned as its EXIF orientation says (as viewers, labelme and `predict` show
    it); an annotation (`photo=False`) is used as stored, like single-channel ones."""
    import cv2

    flags = cv2.IMREAD_COLOR if photo else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imread(str(path), flags)  # as fast as PIL (bench_prepare.py), any PNG mode
    if bgr is None:
        raise BadFile(f"{path}: unreadable ({_decode_error(path)}); re-extract or re-download it")
    return bgr


def _mode_problem(path: Path, mode: str, source: str) -> str | None:
    if source in _SINGLE_CHANNEL and mode not in ("L", "P"):
        what = "label-id" if source == "labelIds" else "mask"
        return (
            f"{path}: mode {mode} is not an 8-bit single-channel {what} image; for RGB colour "
            "annotations use --source color"
        )
    return None


def _read_single_channel(path: Path, source: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            problem = _mode_problem(path, im.mode, source)
            if problem:
                raise BadFile(problem)
            return np.asarray(im)
    except OSError as e:
        raise BadFile(f"{path}: unreadable ({type(e).__name__}: {e}); re-extract or re-download it") from None


# --------------------------------------------------------------------------- polygon files


def _points(node: Node, count: int | None = None) -> tuple[tuple[float, float], ...]:
    items = node.items(length=count)
    if not items:
        raise node.error("a list of [x, y] points")
    return tuple((p.items(length=2)[0].number(), p.items(length=2)[1].number()) for p in items)


def _cityscapes_polygons(doc: Node) -> Drawing:
    """json2labelImg's reading: objects in order, "deleted" ones skipped."""
    size = (doc["imgWidth"].integer(min=1), doc["imgHeight"].integer(min=1))
    shapes = []
    for obj in doc["objects"].items():
        if obj["deleted"].present and obj["deleted"].value:
            continue
        shapes.append(("polygon", _points(obj["polygon"]), obj["label"].text()))
    return Drawing(size, tuple(shapes))  # type: ignore[arg-type]


def _labelme_shape(node: Node, notes: list[str], where: str) -> tuple[Shape, Any] | None:
    """One labelme shape -> (kind, points) to fill, or None (skipped, with a note)."""
    kind = node["shape_type"].maybe(Node.text) or "polygon"  # labelme writes null for polygons
    flags = node["flags"].optional()
    set_flags = sorted(k for k, v in flags.obj().items() if v) if flags else []
    if set_flags:
        notes.append(f"{where}: flags {set_flags} set on a {node['label'].value!r} shape (flags are not drawn)")
    if kind in _LABELME_SKIPPED:
        notes.append(f"{where}: a {kind} shape {node['label'].value!r} has no area and is not drawn")
        return None
    if kind == "polygon":
        return "polygon", _points(node["points"])
    if kind == "rectangle":
        return "rectangle", _points(node["points"], 2)
    if kind == "circle":  # centre and a point on the circle (labelme's shape_to_mask)
        (cx, cy), (px, py) = _points(node["points"], 2)
        r = float(np.hypot(cx - px, cy - py))
        return "ellipse", ((cx - r, cy - r), (cx + r, cy + r))
    raise node["shape_type"].invalid(
        f"is {kind!r}, which urbanseg cannot draw (it fills polygon, rectangle and circle shapes; it skips "
        f"{', '.join(_LABELME_SKIPPED)}): redraw the shape as a polygon in labelme"
    )


def _labelme(doc: Node) -> Drawing:
    size = (doc["imageWidth"].integer(min=1), doc["imageHeight"].integer(min=1))
    notes: list[str] = []
    flags = doc["flags"].optional()
    set_flags = sorted(k for k, v in flags.obj().items() if v) if flags else []
    if set_flags:
        notes.append(f"{doc.file}: image flags {set_flags} set (flags are not drawn)")
    shapes = []
    for i, node in enumerate(doc["shapes"].items()):
        shape = _labelme_shape(node, notes, f"{doc.file} shapes[{i}]")
        if shape is not None:
            shapes.append((*shape, node["label"].text()))
    return Drawing(size, tuple(shapes), tuple(notes))


def read_drawing(path: Path, source: str) -> Drawing:
    """A `polygons` or `labelme` JSON file, every value checked; BadFile naming the field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadFile(f"{path}: unreadable ({type(e).__name__}: {e}); re-extract or re-export it") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadFile(f"{path}: not JSON ({e}); re-export the annotation") from None
    fix = "re-export the annotation" + (" from labelme" if source == "labelme" else "")
    doc = Node.root(value, file=path, fix=fix)
    try:
        return _labelme(doc) if source == "labelme" else _cityscapes_polygons(doc)
    except FormatError as e:
        raise BadFile(str(e)) from None


def _class_values(drawing: Drawing, label_set: LabelSet, path: Path) -> tuple[list, list[int]]:
    """The shapes to draw and their class indices; BadFile naming the unknown labels."""
    shapes, values, unknown = [], [], set()
    for kind, points, name in drawing.shapes:
        try:
            value = label_set.class_of_name(name)
        except KeyError:
            unknown.add(name)
            continue
        if value is not None:
            shapes.append((kind, points))
            values.append(value)
    if unknown:
        names = ", ".join(label_set.classes)
        cityscapes = " or Cityscapes label names" if label_set.from_cityscapes else ""
        raise BadFile(
            f"{path}: labels with no class in label set {label_set.name!r}: {sorted(unknown)[:10]}; "
            f"name shapes after its classes ({names}){cityscapes}, or add the labels to your labelmap.json"
        )
    return shapes, values


def rasterise(drawing: Drawing, label_set: LabelSet, path: Path) -> np.ndarray:
    """A parsed polygon file -> (H, W) uint8 class indices of `label_set`."""
    shapes, values = _class_values(drawing, label_set, path)
    try:
        return draw_shapes(drawing.size, shapes, values, "L", label_set.background_class())
    except (ValueError, TypeError) as e:  # what PIL says of a shape it cannot draw
        raise BadFile(f"{path}: a shape cannot be drawn ({e}); fix it in the annotation tool") from None


def check_drawing(path: Path, source: str, label_set: LabelSet) -> Drawing:
    """Parse a polygon file and check its labels (no pixels drawn): what prepare does
    before writing anything. BadFile for any problem."""
    drawing = read_drawing(path, source)
    _class_values(drawing, label_set, path)
    return drawing


# --------------------------------------------------------------------------- any source


def read_labels(path: Path, source: str, label_set: LabelSet) -> np.ndarray:
    """A raw annotation -> (H, W) uint8 class indices of `label_set` (255 ignore).

    Every pixel is mapped (and so checked) at full size: an unknown value or colour is an
    error wherever it is. The mapping is a per-pixel lookup, so mapping before the
    nearest-neighbour resize gives the same result as mapping after it."""
    if source in JSON_SOURCES:
        return rasterise(read_drawing(path, source), label_set, path)
    try:
        if source == "color":
            return label_set.labels_from_colors(read_bgr(path, photo=False), bgr=True)
        values = _read_single_channel(path, source)
        if source == "labelIds":
            return label_set.labels_from_ids(values)
        if source == "trainIds":
            return label_set.labels_from_train_ids(values)
        return label_set.labels_from_indices(values)
    except BadFile:
        raise
    except ValueError as e:
        raise BadFile(f"{path}: {e}; {_FIX_VALUES[source]}") from None


_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def _orientation(im: Any) -> int | None:
    """An opened image's EXIF orientation tag, from its header. A PNG's eXIf chunk after
    the pixels is not looked for: Pillow would decode the whole image to find it."""
    if im.format == "PNG" and "exif" not in im.info:
        return None
    return im.getexif().get(0x0112)


def _open_size(path: Path, *, photo: bool = False) -> tuple[tuple[int, int], str, bool]:
    """(size (W, H), mode, turned) from an image header; a photo's size is as its EXIF
    orientation turns it (`read_bgr`), `turned` when that swaps width and height. BadFile
    if it cannot be opened."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            turned = photo and _orientation(im) in _TRANSPOSED
            return (im.size[::-1] if turned else im.size), im.mode, turned
    except OSError as e:  # UnidentifiedImageError is an OSError
        raise BadFile(f"{path}: unreadable ({type(e).__name__}: {e}); re-extract or re-download it") from None


def header_problem(image: Path, label: Path, source: str, label_set: LabelSet) -> tuple[str | None, tuple[str, ...]]:
    """Cheap check of a pair before anything is written: both files open, sizes and modes
    fit; a polygon file is parsed and its labels checked. Returns (the problem or None,
    notes to report)."""
    notes: tuple[str, ...] = ()
    try:
        image_size, _, turned = _open_size(image, photo=True)
        if source in JSON_SOURCES:
            drawing = check_drawing(label, source, label_set)
            label_size, notes = drawing.size, drawing.notes
        else:
            label_size, mode, _ = _open_size(label)
            problem = _mode_problem(label, mode, source)
            if problem:
                return problem, ()
    except BadFile as e:
        return str(e), ()
    if image_size != label_size:
        says = " says" if source in JSON_SOURCES else ""
        upright = " (turned upright as its EXIF orientation says)" if turned else ""
        return (
            f"{image} is {image_size[0]}x{image_size[1]}{upright} "
            f"but {label}{says} is {label_size[0]}x{label_size[1]}; an image and its annotation must have the same size"
        ), notes
    return None, notes


def read_truth(path: Path, source: str, label_set: LabelSet) -> Truth:
    """A raw annotation for `evaluate --full-res`. For a Cityscapes label set, the kinds
    of `ID_SOURCES` also give label ids: labelIds as stored, trainIds through
    `label_ids_from_train_ids`, polygons drawn with their labels' ids; polygons give
    instance ids too (json2instanceImg's numbering). BadFile for any problem."""
    classes = read_labels(path, source, label_set)
    if not label_set.from_cityscapes or source not in ID_SOURCES:
        return Truth(classes)
    if source == "labelIds":
        return Truth(classes, _read_single_channel(path, source))
    if source == "trainIds":
        return Truth(classes, label_ids_from_train_ids(_read_single_channel(path, source)))
    drawing = read_drawing(path, source)
    names = [name for _, _, name in drawing.shapes]
    unknown = sorted({n for n in names if cityscapes_label(n) is None})
    if unknown:
        raise BadFile(
            f"{path}: labels {unknown[:10]} are no Cityscapes labels; the official scores need Cityscapes "
            "label names in the polygons"
        )
    ids, instances = polygon_values(names)
    drawn = [k for k, i in enumerate(ids) if i >= 0]
    shapes = [drawing.shapes[k][:2] for k in drawn]
    label_ids = draw_shapes(drawing.size, shapes, [ids[k] for k in drawn], "L")
    return Truth(classes, label_ids, draw_shapes(drawing.size, shapes, [instances[k] for k in drawn], "I"))

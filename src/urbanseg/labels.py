"""The Cityscapes label table and the label sets urbanseg trains on.

A *label set* maps the annotation (Cityscapes label ids, or RGB colours) to class
indices 0..N-1, with 255 meaning "ignore" (left out of the loss and the metrics).
Built-in sets:

- ``categories8`` (default): the original project's 8 categories with void as class 0;
  every label id maps to a class (license plate to vehicle), nothing is ignored.
- ``categories7``: the official 7 categories; void and the labels the official
  evaluation ignores (ignoreInEval) map to 255, as in ``evalPixelLevelSemanticLabeling``.
- ``classes19``: the official 19 training classes (trainIds).

Custom sets come from a JSON file shaped like the original project's ``labelmap.json``:
``{"class name": {"id": 0, "colors": [[r, g, b], ...]}, ...}``.

Annotations a set reads (`urbanseg.data.annotations`): Cityscapes label ids (built-in sets),
Cityscapes training ids (built-in sets; 255 is ignored), the set's own class indices
(0..N-1, 255 ignore), colours, and polygon label names (`LabelSet.class_of_name`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from urbanseg.errors import UserError
from urbanseg.schema import Node

IGNORE = 255
# Sentinel in the colour lookup table for a colour no class claims.
_UNKNOWN = 254


class Label(NamedTuple):
    """One row of the official Cityscapes label table (cityscapesscripts/helpers/labels.py)."""

    name: str
    id: int
    trainId: int
    category: str
    categoryId: int
    hasInstances: bool
    ignoreInEval: bool
    color: tuple[int, int, int]


# fmt: off
LABELS: tuple[Label, ...] = (
    #      name                    id  trainId  category        catId hasInst ignoreInEval color
    Label("unlabeled",             0,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("ego vehicle",           1,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("rectification border",  2,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("out of roi",            3,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("static",                4,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("dynamic",               5,  255, "void",          0, False, True,  (111, 74, 0)),
    Label("ground",                6,  255, "void",          0, False, True,  (81, 0, 81)),
    Label("road",                  7,    0, "flat",          1, False, False, (128, 64, 128)),
    Label("sidewalk",              8,    1, "flat",          1, False, False, (244, 35, 232)),
    Label("parking",               9,  255, "flat",          1, False, True,  (250, 170, 160)),
    Label("rail track",           10,  255, "flat",          1, False, True,  (230, 150, 140)),
    Label("building",             11,    2, "construction",  2, False, False, (70, 70, 70)),
    Label("wall",                 12,    3, "construction",  2, False, False, (102, 102, 156)),
    Label("fence",                13,    4, "construction",  2, False, False, (190, 153, 153)),
    Label("guard rail",           14,  255, "construction",  2, False, True,  (180, 165, 180)),
    Label("bridge",               15,  255, "construction",  2, False, True,  (150, 100, 100)),
    Label("tunnel",               16,  255, "construction",  2, False, True,  (150, 120, 90)),
    Label("pole",                 17,    5, "object",        3, False, False, (153, 153, 153)),
    Label("polegroup",            18,  255, "object",        3, False, True,  (153, 153, 153)),
    Label("traffic light",        19,    6, "object",        3, False, False, (250, 170, 30)),
    Label("traffic sign",         20,    7, "object",        3, False, False, (220, 220, 0)),
    Label("vegetation",           21,    8, "nature",        4, False, False, (107, 142, 35)),
    Label("terrain",              22,    9, "nature",        4, False, False, (152, 251, 152)),
    Label("sky",                  23,   10, "sky",           5, False, False, (70, 130, 180)),
    Label("person",               24,   11, "human",         6, True,  False, (220, 20, 60)),
    Label("rider",                25,   12, "human",         6, True,  False, (255, 0, 0)),
    Label("car",                  26,   13, "vehicle",       7, True,  False, (0, 0, 142)),
    Label("truck",                27,   14, "vehicle",       7, True,  False, (0, 0, 70)),
    Label("bus",                  28,   15, "vehicle",       7, True,  False, (0, 60, 100)),
    Label("caravan",              29,  255, "vehicle",       7, True,  True,  (0, 0, 90)),
    Label("trailer",              30,  255, "vehicle",       7, True,  True,  (0, 0, 110)),
    Label("train",                31,   16, "vehicle",       7, True,  False, (0, 80, 100)),
    Label("motorcycle",           32,   17, "vehicle",       7, True,  False, (0, 0, 230)),
    Label("bicycle",              33,   18, "vehicle",       7, True,  False, (119, 11, 32)),
    Label("license plate",        -1,   -1, "vehicle",       7, False, True,  (0, 0, 142)),
)
# fmt: on

NAME_TO_LABEL = {label.name: label for label in LABELS}
ID_TO_LABEL = {label.id: label for label in LABELS}
CATEGORIES = ("void", "flat", "construction", "object", "nature", "sky", "human", "vehicle")
# Display colour of a category: the colour of its most common label.
_CATEGORY_COLORS = {
    "void": (0, 0, 0),
    "flat": (128, 64, 128),
    "construction": (70, 70, 70),
    "object": (220, 220, 0),
    "nature": (107, 142, 35),
    "sky": (70, 130, 180),
    "human": (220, 20, 60),
    "vehicle": (0, 0, 142),
}


def _rgb(values: Sequence[Any]) -> tuple[int, int, int]:
    """Three colour components as an (r, g, b) tuple of ints."""
    r, g, b = (int(v) for v in values)
    return r, g, b


def _uint8_id(label_id: int) -> int:
    """License plate's id -1 is stored as 255 in a uint8 label-id image."""
    return label_id & 0xFF


# Names polygon annotations give the pixels no shape covers, first match wins: labelme's
# background label, then common names for it (see `LabelSet.background_class`).
BACKGROUND_NAMES = ("_background_", "background", "unlabeled")


def cityscapes_label(name: str) -> Label | None:
    """The Cityscapes label a polygon's name stands for, as json2labelImg reads it: a name
    that is not a label but ends in "group" is that label ("cargroup" -> car). None if unknown."""
    if name not in NAME_TO_LABEL and name.endswith("group"):
        name = name[: -len("group")]
    return NAME_TO_LABEL.get(name)


def polygon_values(names: Sequence[str]) -> tuple[list[int], list[int]]:
    """Label id and instance id per Cityscapes polygon name, in drawing order, as
    json2labelImg and json2instanceImg compute them: "cargroup" -> car without an instance;
    the k-th polygon of a label with instances -> id * 1000 + k; license plate -> id -1
    (not drawn). KeyError for a name that is no Cityscapes label."""
    counts: dict[str, int] = {}
    ids, instances = [], []
    for name in names:
        label = cityscapes_label(name)
        if label is None:
            raise KeyError(name)
        group = name not in NAME_TO_LABEL
        ids.append(label.id)
        instance = label.id
        if label.hasInstances and not group:
            instance = label.id * 1000 + counts.get(label.name, 0)
            counts[label.name] = counts.get(label.name, 0) + 1
        instances.append(instance)
    return ids, instances


def label_ids_from_train_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) uint8 Cityscapes training ids -> (H, W) uint8 label ids for the official
    scores: trainId t -> the one label with that trainId, 255 -> 0 (unlabeled). Every label
    whose trainId is 255 is ignoreInEval, so the official class and category IoU computed
    from these ids equal those from the original ids. ValueError naming unknown values."""
    out = np.take(_TRAIN_TO_ID, np.asarray(train_ids, dtype=np.uint8))
    if (out == _UNKNOWN).any():
        bad = sorted(set(np.unique(np.asarray(train_ids)[out == _UNKNOWN]).tolist()))
        raise ValueError(f"unknown Cityscapes training ids {bad[:10]} (known: 0-18, and 255 for ignore)")
    return out


@dataclass(frozen=True)
class LabelSet:
    """Classes, display palette and the lookups from annotations to class indices.

    ``id_to_class`` has 256 entries (label id -> class index, 255 ignore, 254 unknown id)
    and is None for a colour-only custom set. ``color_to_class`` lists (rgb, class) pairs
    used when labels are read from colour annotations.
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    id_to_class: tuple[int, ...] | None
    color_to_class: tuple[tuple[tuple[int, int, int], int], ...]
    ignore_index: int = IGNORE

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def from_cityscapes(self) -> bool:
        """True for the built-in sets (derived from Cityscapes label ids)."""
        return self.id_to_class is not None

    def id_lut(self) -> np.ndarray:
        if self.id_to_class is None:
            raise UserError(
                f"label set {self.name!r} defines colours only, not Cityscapes label ids; use --source color"
            )
        return _id_lut(self.id_to_class)

    def color_lut(self) -> np.ndarray:
        return _color_lut(self.color_to_class)

    def labels_from_ids(self, ids: np.ndarray) -> np.ndarray:
        """(H, W) uint8 Cityscapes label ids -> (H, W) uint8 class indices (255 ignore).

        Raises ValueError naming the unknown ids if any id is not in the table."""
        import cv2

        ids = np.ascontiguousarray(ids, dtype=np.uint8)
        out = cv2.LUT(ids, self.id_lut())  # ~4x faster than numpy's gather for a 256-entry table
        if (out == _UNKNOWN).any():
            bad = sorted(set(np.unique(ids[out == _UNKNOWN]).tolist()))
            raise ValueError(f"unknown Cityscapes label ids {bad[:10]} (known: 0-33, and 255 for license plate)")
        return out

    def labels_from_colors(self, image: np.ndarray, *, bgr: bool = False) -> np.ndarray:
        """(H, W, 3 or 4) uint8 colour annotation (RGB, or BGR as OpenCV reads it when
        `bgr`) -> (H, W) uint8 class indices.

        Raises ValueError naming the unknown colours (as RGB) if any colour has no class."""
        import cv2

        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        # BGRA bytes read as a little-endian uint32 are 0xAARRGGBB: one mask gives the
        # 0xRRGGBB index into the colour table, ~15x faster than shifting int32 channels.
        code = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA if bgr else cv2.COLOR_RGB2BGRA).view("<u4")[..., 0]
        np.bitwise_and(code, 0xFFFFFF, out=code)
        out = np.take(self.color_lut(), code)
        if (out == _UNKNOWN).any():
            bad = np.unique(code[out == _UNKNOWN])[:10]
            colours = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in bad.tolist()]
            raise ValueError(f"colours with no class in label set {self.name!r}: {colours}")
        return out

    def cityscapes_ids(self) -> np.ndarray:
        """(256,) uint8 lookup: class index -> Cityscapes label id, for a set derived from
        the official table (what the official evaluation and the test server read).

        classes19: trainId -> id; categories8/7: the first label of the category in table
        order that the official evaluation scores (flat -> road 7, construction ->
        building 11, ..., vehicle -> car 26; void -> unlabeled 0). Indices without a class
        (255, out of range) map to 0, an unscored id: a miss, never a false positive. Use
        as ``lut[pred]`` on an (H, W) class-index prediction."""
        if self.id_to_class is None:
            raise UserError(
                f"label set {self.name!r} is defined by colours only; Cityscapes label ids (official scores, "
                "--cityscapes-ids) need a set derived from them: categories8, categories7 or classes19"
            )
        lut = np.zeros(256, np.uint8)
        for k in range(self.num_classes):
            ids = [label.id for label in LABELS if label.id >= 0 and self.id_to_class[label.id] == k]
            scored = [i for i in ids if not ID_TO_LABEL[i].ignoreInEval]
            lut[k] = (scored or ids or [0])[0]
        return lut

    def labels_from_train_ids(self, train_ids: np.ndarray) -> np.ndarray:
        """(H, W) uint8 Cityscapes training ids (0..18, 255 ignore; what BDD100K's semantic
        masks and createTrainIdLabelImgs hold) -> (H, W) uint8 class indices: trainId t
        takes the class of its label; 255 is ignored in every set (it stands for many
        labels: void, parking, guard rail, ...). ValueError naming any value outside these."""
        import cv2

        if self.id_to_class is None:
            raise UserError(
                f"label set {self.name!r} defines colours only, not Cityscapes training ids; use --source color"
            )
        ids = np.ascontiguousarray(train_ids, dtype=np.uint8)
        out = cv2.LUT(ids, _train_lut(self.id_to_class, self.ignore_index))
        if (out == _UNKNOWN).any():
            bad = sorted(set(np.unique(ids[out == _UNKNOWN]).tolist()))
            raise ValueError(f"unknown Cityscapes training ids {bad[:10]} (known: 0-18, and 255 for ignore)")
        return out

    def labels_from_indices(self, indices: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class indices of this set (0..N-1, the ignore index) -> the same
        array, checked. ValueError naming the values that are neither."""
        out = np.ascontiguousarray(indices, dtype=np.uint8)
        counts = np.bincount(out.ravel(), minlength=256)
        counts[: self.num_classes] = 0
        counts[self.ignore_index] = 0
        if counts.any():
            bad = np.flatnonzero(counts)[:10].tolist()
            raise ValueError(
                f"values {bad} are not class indices of label set {self.name!r} "
                f"(0..{self.num_classes - 1}, {self.ignore_index} ignore)"
            )
        return out

    def class_of_name(self, name: str) -> int | None:
        """The class index a polygon labelled `name` is drawn with: the class of that name
        in this set; for a set derived from Cityscapes also any Cityscapes label name
        (json2labelImg's reading: "cargroup" is car), through its label id; a background
        name (`BACKGROUND_NAMES`) -> `background_class()`. None for a Cityscapes label that
        is never drawn (license plate, id -1, as json2labelImg skips it). KeyError if unknown."""
        if name in self.classes:
            return self.classes.index(name)
        label = cityscapes_label(name) if self.id_to_class is not None else None
        if label is not None and self.id_to_class is not None:
            return None if label.id < 0 else self.id_to_class[label.id]
        if name in BACKGROUND_NAMES:
            return self.background_class()
        raise KeyError(name)

    def background_class(self) -> int:
        """The class of the pixels no polygon covers: the class named like a background
        (`BACKGROUND_NAMES`, in that order), else for a Cityscapes set that of "unlabeled"
        (id 0, json2labelImg's background), else the ignore index."""
        for name in BACKGROUND_NAMES:
            if name in self.classes:
                return self.classes.index(name)
        return self.ignore_index if self.id_to_class is None else self.id_to_class[0]

    def colorize(self, labels: np.ndarray, ignore_color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
        """(H, W) class indices -> (H, W, 3) uint8 RGB using the palette."""
        table = np.zeros((256, 3), np.uint8)
        table[:] = ignore_color
        table[: self.num_classes] = np.asarray(self.palette, np.uint8)
        return table[labels]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "palette": [list(c) for c in self.palette],
            "id_to_class": None if self.id_to_class is None else list(self.id_to_class),
            "color_to_class": [[list(c), k] for c, k in self.color_to_class],
            "ignore_index": self.ignore_index,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelSet:
        """The inverse of `to_dict`; a malformed dict -> FormatError naming the field."""
        return cls.read(Node.root(d, file="label set", fix="rebuild it with LabelSet.to_dict()"))

    @classmethod
    def read(cls, node: Node) -> LabelSet:
        """A label set stored in a file (`to_dict()`'s shape, at `node`), every value checked:
        1..254 classes, a palette colour per class, class indices below the class count
        or the ignore index (which is no class index). FormatError names the field."""
        classes = tuple(node["classes"].texts())
        if not 0 < len(classes) < _UNKNOWN:
            raise node["classes"].error(f"a list of 1 to {_UNKNOWN - 1} class names")
        n = len(classes)
        ignore = node["ignore_index"].integer(min=n, max=255) if node["ignore_index"].present else IGNORE

        def index(item: Node, *extra: int) -> int:
            k = item.integer(min=0, max=255)
            if k >= n and k != ignore and k not in extra:
                raise item.error(f"a class index below {n} or the ignore index {ignore}")
            return k

        ids = node["id_to_class"].optional()
        return cls(
            name=node["name"].text(),
            classes=classes,
            palette=tuple(_rgb(c.ints(length=3, min=0, max=255)) for c in node["palette"].items(length=n)),
            id_to_class=None if ids is None else tuple(index(k, _UNKNOWN) for k in ids.items(length=256)),
            color_to_class=tuple(
                (_rgb(pair.items(length=2)[0].ints(length=3, min=0, max=255)), index(pair.items(length=2)[1]))
                for pair in node["color_to_class"].items()
            ),
            ignore_index=ignore,
        )


@functools.lru_cache(maxsize=8)
def _id_lut(id_to_class: tuple[int, ...]) -> np.ndarray:
    return np.asarray(id_to_class, dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def _train_lut(id_to_class: tuple[int, ...], ignore: int) -> np.ndarray:
    """(256,) uint8: Cityscapes training id -> class index (255 -> ignore, others unknown)."""
    lut = np.full(256, _UNKNOWN, np.uint8)
    for label in LABELS:
        if 0 <= label.trainId < 255:
            lut[label.trainId] = id_to_class[label.id]
    lut[255] = ignore
    return lut


def _train_to_id() -> np.ndarray:
    lut = np.full(256, _UNKNOWN, np.uint8)
    for label in LABELS:
        if 0 <= label.trainId < 255:
            lut[label.trainId] = label.id
    lut[255] = 0
    return lut


_TRAIN_TO_ID = _train_to_id()


@functools.lru_cache(maxsize=4)
def _color_lut(color_to_class: tuple[tuple[tuple[int, int, int], int], ...]) -> np.ndarray:
    # A 16 MiB table indexed by 0xRRGGBB: one fancy-index converts a whole image.
    lut = np.full(1 << 24, _UNKNOWN, dtype=np.uint8)
    for (r, g, b), k in color_to_class:
        lut[(r << 16) | (g << 8) | b] = k
    return lut


def _from_table(name: str, classes: tuple[str, ...], palette, class_of) -> LabelSet:
    """A label set derived from the official table; `class_of(label)` gives its class."""
    id_to_class = [_UNKNOWN] * 256
    for label in LABELS:
        id_to_class[_uint8_id(label.id)] = class_of(label)
    # A colour shared by several labels (pole and polegroup, the five black void labels,
    # car and license plate) takes the class of the first label in table order with an
    # id >= 0: pole for (153, 153, 153), car for (0, 0, 142).
    color_to_class: dict[tuple[int, int, int], int] = {}
    for label in LABELS:
        if label.id >= 0:
            color_to_class.setdefault(label.color, class_of(label))
    return LabelSet(name, classes, tuple(palette), tuple(id_to_class), tuple(color_to_class.items()))


def categories8() -> LabelSet:
    return _from_table("categories8", CATEGORIES, [_CATEGORY_COLORS[c] for c in CATEGORIES], lambda lab: lab.categoryId)


def categories7() -> LabelSet:
    names = CATEGORIES[1:]
    return _from_table(
        "categories7",
        names,
        [_CATEGORY_COLORS[c] for c in names],
        lambda lab: IGNORE if lab.ignoreInEval else lab.categoryId - 1,
    )


def classes19() -> LabelSet:
    train = sorted((lab for lab in LABELS if 0 <= lab.trainId < 255), key=lambda lab: lab.trainId)
    return _from_table(
        "classes19",
        tuple(lab.name for lab in train),
        [lab.color for lab in train],
        lambda lab: IGNORE if lab.trainId < 0 else lab.trainId,
    )


BUILTIN_LABEL_SETS = {"categories8": categories8, "categories7": categories7, "classes19": classes19}
DEFAULT_LABEL_SET = "categories8"


def load_label_map(path: Path) -> LabelSet:
    """A colour-only label set from a JSON file in the original's labelmap.json shape."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # -sig: Notepad's byte-order mark
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read label map {path}: {e}") from None
    try:
        entries = sorted(((_whole(v["id"], name), name, v["colors"]) for name, v in raw.items()), key=lambda e: e[0])
        ids = [e[0] for e in entries]
        if ids != list(range(len(ids))) or not 0 < len(ids) < _UNKNOWN:
            raise ValueError(f"class ids must be 0..N-1 with N < {_UNKNOWN}, got {ids}")
        color_to_class: dict[tuple[int, int, int], int] = {}
        for k, name, colors in entries:
            if not colors:
                raise ValueError(f"class {name!r} has no colours")
            for c in colors:
                rgb = tuple(_whole(v, name) for v in c)
                if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                    raise ValueError(f"class {name!r}: {list(c)} is not an [r, g, b] colour")
                if rgb in color_to_class and color_to_class[rgb] != k:
                    raise ValueError(f"colour {list(rgb)} is given to two classes")
                color_to_class[rgb] = k
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(
            f'label map {path} is not shaped like {{"class name": {{"id": 0, "colors": [[r, g, b], ...]}}, ...}}: {e}'
        ) from None
    return LabelSet(
        name=Path(path).stem,
        classes=tuple(e[1] for e in entries),
        palette=tuple(_rgb(e[2][0]) for e in entries),
        id_to_class=None,
        color_to_class=tuple(color_to_class.items()),
    )


def _whole(value: Any, name: str) -> int:
    """An id or colour component of a label map: a whole number (int() would truncate 1.9
    and take true as 1, so a colour the user never wrote could be matched or clash)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"class {name!r}: {value!r} is not a whole number")
    return value


def get_label_set(name_or_path: str | Path) -> LabelSet:
    """A built-in label set by name, or a custom one from a labelmap.json path."""
    key = str(name_or_path)
    if key in BUILTIN_LABEL_SETS:
        return BUILTIN_LABEL_SETS[key]()
    if key.endswith(".json") or Path(key).is_file():
        return load_label_map(Path(key))
    raise UserError(
        f"unknown label set {key!r}; use one of {', '.join(BUILTIN_LABEL_SETS)} or the path to a labelmap.json"
    )

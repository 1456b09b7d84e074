import json

import numpy as np
import pytest

from urbanseg import labels as L
from urbanseg.errors import UserError


def test_table_equals_cityscapesscripts():
    official = pytest.importorskip("cityscapesscripts.helpers.labels")
    ours = [tuple(label) for label in L.LABELS]
    theirs = [tuple(label) for label in official.labels]
    assert ours == theirs


def test_categories8_maps_every_id_and_license_plate_to_vehicle():
    ls = L.get_label_set("categories8")
    assert ls.classes[0] == "void" and ls.num_classes == 8
    for label in L.LABELS:
        assert ls.id_to_class[label.id & 0xFF] == label.categoryId
    assert ls.id_to_class[255] == ls.classes.index("vehicle")
    assert L.IGNORE not in ls.id_to_class


def test_categories7_ignores_like_official_eval():
    ls = L.get_label_set("categories7")
    assert ls.classes == L.CATEGORIES[1:]
    for label in L.LABELS:
        expect = 255 if label.ignoreInEval else label.categoryId - 1
        assert ls.id_to_class[label.id & 0xFF] == expect


def test_classes19_is_trainids():
    ls = L.get_label_set("classes19")
    assert ls.num_classes == 19 and ls.classes[0] == "road" and ls.classes[-1] == "bicycle"
    for label in L.LABELS:
        assert ls.id_to_class[label.id & 0xFF] == (255 if label.trainId < 0 else label.trainId)
    assert [tuple(c) for c in ls.palette] == [
        l.color for l in sorted((l for l in L.LABELS if 0 <= l.trainId < 255), key=lambda l: l.trainId)
    ]


@pytest.mark.parametrize("name", ["categories8", "categories7", "classes19"])
def test_colour_path_equals_id_path(name):
    """Colour images drawn with the official colours give the id path's classes, except
    where two labels share a colour (polegroup reads as pole)."""
    ls = L.get_label_set(name)
    ids = np.array([[l.id for l in L.LABELS if l.id >= 0]], dtype=np.uint8)
    colors = np.array([[L.ID_TO_LABEL[i].color for i in ids[0]]], dtype=np.uint8)
    from_ids, from_colors = ls.labels_from_ids(ids), ls.labels_from_colors(colors)
    differ = {L.ID_TO_LABEL[i].name for i in ids[0][from_ids[0] != from_colors[0]]}
    assert differ <= {"polegroup"}
    if name == "categories8":
        assert differ == set()


def test_unknown_ids_and_colours_are_named():
    ls = L.get_label_set("categories8")
    with pytest.raises(ValueError, match=r"\[40\]"):
        ls.labels_from_ids(np.array([[7, 40]], np.uint8))
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        ls.labels_from_colors(np.array([[[1, 2, 3]]], np.uint8))


def test_custom_label_map(tmp_path):
    path = tmp_path / "labelmap.json"
    path.write_text(
        json.dumps(
            {"road": {"id": 1, "colors": [[128, 64, 128]]}, "other": {"id": 0, "colors": [[0, 0, 0], [70, 70, 70]]}}
        )
    )
    ls = L.get_label_set(path)
    assert ls.classes == ("other", "road") and not ls.from_cityscapes
    rgb = np.array([[[128, 64, 128], [70, 70, 70], [0, 0, 0]]], np.uint8)
    assert ls.labels_from_colors(rgb).tolist() == [[1, 0, 0]]
    with pytest.raises(UserError, match="--source color"):
        ls.labels_from_ids(np.zeros((1, 1), np.uint8))
    assert L.LabelSet.from_dict(json.loads(json.dumps(ls.to_dict()))) == ls


def test_bad_label_maps(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"a": {"id": 0, "colors": [[1, 2, 3]]}, "b": {"id": 2, "colors": [[4, 5, 6]]}}))
    with pytest.raises(UserError, match="0..N-1"):
        L.get_label_set(path)
    with pytest.raises(UserError, match="unknown label set"):
        L.get_label_set("categories9")
    # fractions and booleans are no ids or colour values (int() truncated 1.9 to 1, took true as 1)
    for bad in ({"a": {"id": 0, "colors": [[1.9, 2, 3]]}}, {"a": {"id": True, "colors": [[1, 2, 3]]}}):
        path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match="is not a whole number"):
            L.get_label_set(path)
    # a byte-order mark (Windows Notepad's UTF-8) is read
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": {"id": 0, "colors": [[1, 2, 3]]}}).encode())
    assert L.get_label_set(path).classes == ("a",)


def test_round_trip_and_colorize():
    ls = L.get_label_set("classes19")
    assert L.LabelSet.from_dict(json.loads(json.dumps(ls.to_dict()))) == ls
    rgb = ls.colorize(np.array([[0, 255]], np.uint8))
    assert rgb.tolist() == [[[128, 64, 128], [0, 0, 0]]]


@pytest.mark.parametrize("name", ["categories8", "categories7", "classes19"])
def test_lookups_equal_a_plain_table_reference(name):
    """The OpenCV fast paths (LUT, BGRA-as-uint32) against a per-entry dict lookup."""
    ls, rng = L.get_label_set(name), np.random.default_rng(0)
    known = np.array([l.id & 0xFF for l in L.LABELS], np.uint8)
    ids = rng.choice(known, (33, 47)).astype(np.uint8)
    by_id = dict(enumerate(ls.id_to_class))
    assert ls.labels_from_ids(ids).tolist() == [[by_id[i] for i in row] for row in ids.tolist()]
    by_colour = dict(ls.color_to_class)
    rgb = np.array(list(by_colour), np.uint8)[rng.integers(0, len(by_colour), (33, 47))]
    expect = [[by_colour[tuple(c)] for c in row] for row in rgb.tolist()]
    assert ls.labels_from_colors(rgb).tolist() == expect
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    assert ls.labels_from_colors(bgr, bgr=True).tolist() == expect
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert ls.labels_from_colors(rgba).tolist() == expect
    ids[5, 5], bgr[7, 7] = 99, (3, 2, 1)
    with pytest.raises(ValueError, match=r"\[99\]"):
        ls.labels_from_ids(ids)
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        ls.labels_from_colors(bgr, bgr=True)

"""The annotation readers of `urbanseg.data.annotations`, each against a reference:
polygons (Cityscapes JSON and labelme) against cityscapesscripts' own rasteriser
(json2labelImg.createLabelImage) on the synthetic scenes' and the fixture's polygons,
trainIds against createLabelImage's "trainIds" encoding and the official table, and the
official scores from trainIds against those from the original label ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.cityscapes import render, scene_objects
from urbanseg.data.annotations import BadFile, header_problem, read_drawing, read_labels, read_truth
from urbanseg.labels import LABELS, get_label_set, label_ids_from_train_ids, polygon_values
from urbanseg.synth import generate
from urbanseg.synth.writer import labelme_json

SETS = ["categories8", "categories7", "classes19"]
W, H = 96, 48


def official_lut(name: str) -> np.ndarray:
    """Label id -> class from cityscapesscripts' own table (the reference, not ours)."""
    official = pytest.importorskip("cityscapesscripts.helpers.labels")
    lut = np.full(256, 254, np.uint8)
    for label in official.labels:
        if name == "categories8":
            lut[label.id & 0xFF] = label.categoryId
        elif name == "categories7":
            lut[label.id & 0xFF] = 255 if label.ignoreInEval else label.categoryId - 1
        else:
            lut[label.id & 0xFF] = 255 if label.trainId in (-1, 255) else label.trainId
    return lut


def scenes() -> list[dict]:
    """Polygon files {"imgWidth", "imgHeight", "objects"}: two synthetic street scenes
    (clipped integer polygons, license plates, groups) and two of the fixture's random
    polygons (any order, overlaps, void labels), one of them with float coordinates."""
    out = [generate(3, "train", i, W, H)["polygons"] for i in range(2)]
    rng = np.random.default_rng(5)
    for k in range(2):
        objects = scene_objects(rng, W, H)
        if k:
            for obj in objects:
                obj["polygon"] = [[x + 0.37, y - 0.61] for x, y in obj["polygon"]]
        out.append({"imgWidth": W, "imgHeight": H, "objects": objects})
    return out


def write(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value))
    return path


@pytest.mark.parametrize("name", SETS)
def test_polygons_and_labelme_equal_cityscapesscripts(tmp_path, name):
    ls, lut = get_label_set(name), official_lut(name)
    for k, scene in enumerate(scenes()):
        expected = lut[np.asarray(render(scene["objects"], W, H, "ids"))]
        polygons = write(tmp_path / f"{k}_gtFine_polygons.json", scene)
        labelme = write(tmp_path / f"{k}.json", labelme_json(scene, f"{k}.png"))
        np.testing.assert_array_equal(read_labels(polygons, "polygons", ls), expected)
        np.testing.assert_array_equal(read_labels(labelme, "labelme", ls), expected)


def test_deleted_objects_are_skipped_like_json2labelImg(tmp_path):
    scene = scenes()[2]
    scene["objects"][-1]["deleted"] = 1
    scene["objects"][-3]["deleted"] = 1
    expected = official_lut("categories8")[np.asarray(render(scene["objects"], W, H, "ids"))]
    got = read_labels(write(tmp_path / "a.json", scene), "polygons", get_label_set("categories8"))
    np.testing.assert_array_equal(got, expected)


def test_truth_ids_and_instances_equal_the_synthetic_scene(tmp_path):
    """read_truth of a scene's polygons gives its labelIds and instanceIds as synth wrote them
    (synth_test checks those against json2labelImg/json2instanceImg)."""
    scene = generate(3, "val", 1, W, H)
    path = write(tmp_path / "s.json", scene["polygons"])
    truth = read_truth(path, "polygons", get_label_set("classes19"))
    np.testing.assert_array_equal(truth.ids, scene["labelIds"])
    np.testing.assert_array_equal(truth.instances, scene["instanceIds"])
    labelme = read_truth(
        write(tmp_path / "l.json", labelme_json(scene["polygons"], "l.png")), "labelme", get_label_set("classes19")
    )
    assert labelme.ids is None and labelme.instances is None  # labelme: no official scores


def test_labelme_rectangles_circles_and_background(tmp_path):
    """A rectangle fills its box with both corners, in any corner order; a circle
    (centre, point on it) fills the pixels within its radius (1 px of tolerance at the
    edge); labelme's "_background_" and uncovered pixels are the set's background."""
    doc = {
        "imageWidth": 40,
        "imageHeight": 30,
        "flags": {},
        "shapes": [
            {"label": "road", "points": [[30, 25], [5, 3]], "shape_type": "rectangle"},
            {"label": "car", "points": [[20, 15], [20, 23]], "shape_type": "circle"},
            {"label": "_background_", "points": [[0, 0], [2, 0], [2, 2], [0, 2]], "shape_type": "polygon"},
        ],
    }
    ls = get_label_set("categories8")
    got = read_labels(write(tmp_path / "r.json", doc), "labelme", ls)
    y, x = np.mgrid[:30, :40]
    box = (x >= 5) & (x <= 30) & (y >= 3) & (y <= 25)
    r = np.hypot(x - 20, y - 15)
    assert (got[r <= 7] == 7).all() and (got[(r > 9) & box] == 1).all()
    assert (got[~box & (r > 9)] == 0).all()  # void: categories8's class of "unlabeled"
    assert (got[:3, :3] == 0).all()
    ls19 = get_label_set("classes19")
    assert (read_labels(tmp_path / "r.json", "labelme", ls19)[~box & (r > 9)] == 255).all()


def test_labelme_flags_and_shapes_without_area_are_reported(tmp_path):
    doc = {
        "imageWidth": 20,
        "imageHeight": 10,
        "flags": {"night": True, "rain": False},
        "shapes": [
            {"label": "road", "points": [[0, 5], [19, 5], [19, 9], [0, 9]], "shape_type": None, "flags": {}},
            {"label": "pole", "points": [[3, 0], [3, 9]], "shape_type": "line", "flags": {"occluded": True}},
            {"label": "person", "points": [[8, 2]], "shape_type": "point"},
        ],
    }
    path = write(tmp_path / "f.json", doc)
    Image.new("RGB", (20, 10)).save(tmp_path / "f.png")
    problem, notes = header_problem(tmp_path / "f.png", path, "labelme", get_label_set("categories8"))
    assert problem is None and len(notes) == 4
    text = "\n".join(notes)
    assert "image flags ['night'] set" in text and "flags ['occluded'] set on a 'pole' shape" in text
    assert "a line shape 'pole' has no area" in text and "a point shape 'person' has no area" in text
    got = read_labels(path, "labelme", get_label_set("categories8"))
    assert (got[5:] == 1).all() and (got[:5] == 0).all()  # the line and the point are not drawn


@pytest.mark.parametrize(
    "change, needle",
    [
        (
            lambda d: d["shapes"][0].update(shape_type="mask"),
            "`shapes[0].shape_type` is 'mask', which urbanseg cannot draw",
        ),
        (lambda d: d["shapes"][0].update(label="lorry"), "labels with no class in label set 'categories8': ['lorry']"),
        (lambda d: d["shapes"][0].update(points=[[1, "x"]]), '`shapes[0].points[0][1]` is "x" (a string)'),
        (lambda d: d["shapes"][0].update(shape_type="rectangle"), "`shapes[0].points` is"),
        (lambda d: d.pop("imageWidth"), "`imageWidth` is missing"),
    ],
)
def test_bad_labelme_files_are_named(tmp_path, change, needle):
    doc = {
        "imageWidth": 20,
        "imageHeight": 10,
        "shapes": [{"label": "road", "points": [[0, 5], [19, 5], [19, 9]], "shape_type": "polygon"}],
    }
    change(doc)
    path = write(tmp_path / "bad.json", doc)
    with pytest.raises(BadFile, match=None) as e:
        read_labels(path, "labelme", get_label_set("categories8"))
    assert str(e.value).startswith(str(path)) and needle in str(e.value), str(e.value)


def test_cityscapes_polygons_with_unknown_labels_and_bad_json(tmp_path):
    scene = scenes()[0]
    scene["objects"][2]["label"] = "lamp post"
    with pytest.raises(BadFile, match=r"labels with no class in label set 'classes19': \['lamp post'\]"):
        read_labels(write(tmp_path / "a.json", scene), "polygons", get_label_set("classes19"))
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(BadFile, match="b.json: not JSON"):
        read_drawing(tmp_path / "b.json", "polygons")


@pytest.mark.parametrize("name", SETS)
def test_train_ids_equal_the_official_train_id_image(tmp_path, name):
    """createLabelImage's "trainIds" encoding (what createTrainIdLabelImgs writes; BDD100K
    masks are the same 19 ids) read with --source trainIds equals the label-id path,
    except that trainId 255 is ignored in every set."""
    ls, lut = get_label_set(name), official_lut(name)
    for k, scene in enumerate(scenes()):
        ids = np.asarray(render(scene["objects"], W, H, "ids"))
        train = render(scene["objects"], W, H, "trainIds")
        train.save(tmp_path / f"{k}.png")
        got = read_labels(tmp_path / f"{k}.png", "trainIds", ls)
        expected = np.where(np.asarray(train) == 255, 255, lut[ids])
        np.testing.assert_array_equal(got, expected)


def test_official_scores_from_train_ids_equal_those_from_label_ids():
    """Why BDD100K masks keep the official class and category scores: every label with
    trainId 255 is ignoreInEval, so mapping 255 to 'unlabeled' changes no official IoU."""
    from urbanseg.evaluation.official import OfficialEvaluator

    ls, rng = get_label_set("classes19"), np.random.default_rng(0)
    a, b = OfficialEvaluator(ls), OfficialEvaluator(ls)
    for scene in scenes():
        ids = np.asarray(render(scene["objects"], W, H, "ids"))
        train = np.asarray(render(scene["objects"], W, H, "trainIds"))
        truth = ls.labels_from_ids(ids) % 19  # a prediction right about half the time
        pred = np.where(rng.random(ids.shape) < 0.5, truth, rng.integers(0, 19, ids.shape)).astype(np.uint8)
        a.update_classes(pred, ids, ids.astype(np.int32))
        b.update_classes(pred, label_ids_from_train_ids(train), label_ids_from_train_ids(train).astype(np.int32))
    ra, rb = a.compute(), b.compute()
    assert ra["mean_class_iou"] is not None and ra["mean_category_iou"] is not None
    for key in ("class_iou", "mean_class_iou", "category_iou", "mean_category_iou"):
        assert ra[key] == rb[key], key


def test_indices_are_checked_and_name_the_fix(tmp_path):
    ls = get_label_set("categories8")
    mask = np.zeros((4, 6), np.uint8)
    mask[0, :3] = (7, 255, 3)
    Image.fromarray(mask).save(tmp_path / "ok.png")
    np.testing.assert_array_equal(read_labels(tmp_path / "ok.png", "indices", ls), mask)
    mask[1, 1], mask[2, 2] = 26, 11
    Image.fromarray(mask).save(tmp_path / "bad.png")
    with pytest.raises(BadFile) as e:
        read_labels(tmp_path / "bad.png", "indices", ls)
    assert "values [11, 26] are not class indices of label set 'categories8' (0..7, 255 ignore)" in str(e.value)
    assert "--source labelIds" in str(e.value)
    Image.fromarray(np.dstack([mask] * 3)).save(tmp_path / "rgb.png")
    assert (
        "mode RGB is not an 8-bit single-channel mask image"
        in header_problem(tmp_path / "ok.png", tmp_path / "rgb.png", "indices", ls)[0]
    )


def test_polygon_names_follow_json2labelImg():
    ls = get_label_set("categories8")
    assert ls.class_of_name("cargroup") == ls.class_of_name("car") == 7
    assert ls.class_of_name("vehicle") == 7 and ls.class_of_name("license plate") is None
    assert ls.class_of_name("_background_") == ls.background_class() == 0
    with pytest.raises(KeyError):
        ls.class_of_name("lorry")
    ids, instances = polygon_values(["car", "cargroup", "car", "road", "license plate"])
    assert ids == [26, 26, 26, 7, -1] and instances == [26000, 26, 26001, 7, -1]


def test_train_id_to_label_id_is_the_table():
    for label in LABELS:
        if 0 <= label.trainId < 255:
            assert label_ids_from_train_ids(np.array([[label.trainId]], np.uint8))[0, 0] == label.id
    with pytest.raises(ValueError, match=r"unknown Cityscapes training ids \[19\]"):
        label_ids_from_train_ids(np.array([[19]], np.uint8))

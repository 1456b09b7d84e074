import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers.records import corrupt, make_prepared, pack_dir
from urbanseg.cli import main
from urbanseg.config import PackConfig
from urbanseg.data import tfrecord as records
from urbanseg.data.formats import ShardSpec
from urbanseg.data.pack import pack
from urbanseg.errors import UserError
from urbanseg.labels import get_label_set
from urbanseg.outputs import LOCK, MARKER


def test_masked_crc_matches_crc32c_check_value():
    # CRC-32C("123456789") = 0xE3069283 (the standard check value), then TFRecord's mask.
    crc = 0xE3069283
    assert records.masked_crc(b"123456789") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) % 2**32


def test_pack_layout_spec_and_contents(tmp_path):
    prepared, out = pack_dir(tmp_path, {"train": 5, "val": 3}, shards=2)
    spec = json.loads((out / "train" / "spec.json").read_text())
    assert (spec["height"], spec["width"], spec["data_length"]) == (16, 32, 5)
    assert spec["classes"] == list(get_label_set("categories8").classes) and len(spec["palette"]) == 8
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert spec["pixel_counts"] == manifest["splits"]["train"]["pixel_counts"]
    assert [s["file"] for s in spec["shards"]] == ["00000-of-00002.tfrecord", "00001-of-00002.tfrecord"]
    assert [s["records"] for s in spec["shards"]] == [2, 3]  # even: sizes differ by at most one
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        [MARKER, "spec.json"] + [s["file"] for s in spec["shards"]] + [s["index"] for s in spec["shards"]]
    )
    names = []
    for shard in spec["shards"]:
        path = out / "train" / shard["file"]
        assert path.stat().st_size == shard["bytes"]
        for data in records.iter_records(path):
            ex = records.decode_example(data)
            name = ex["name"][0].decode()
            city = name.split("_")[0]
            assert ex["id"] == [len(names)] and ex["height"] == [16] and ex["width"] == [32]
            # the prepared PNG bytes, copied without re-encoding
            assert ex["image_data"][0] == (prepared / "images" / "train" / city / f"{name}.png").read_bytes()
            assert ex["label_data"][0] == (prepared / "labels" / "train" / city / f"{name}.png").read_bytes()
            names.append(name)
    assert names == sorted(manifest["splits"]["train"]["stems"])
    assert records.verify_shards(out / "train", progress=False)["records"] == 5
    assert json.loads((out / "val" / "spec.json").read_text())["data_length"] == 3


def test_index_is_tfrecord2idx_format(tmp_path):
    _, out = pack_dir(tmp_path, {"train": 4}, shards=1)
    shard = out / "train" / "00000-of-00001.tfrecord"
    written = records.index_path(shard).read_text()
    # reference: tfrecord2idx's scan, "<offset> <whole record length>" per line
    blob, rows, pos = shard.read_bytes(), [], 0
    while pos < len(blob):
        n = int.from_bytes(blob[pos : pos + 8], "little")
        rows.append(f"{pos} {n + 16}\n")
        pos += n + 16
    assert written == "".join(rows) and len(rows) == 4
    records.index_path(shard).unlink()
    assert records.build_index(shard).tolist() == [[int(v) for v in r.split()] for r in rows]
    assert records.index_path(shard).read_text() == written


TF_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import tensorflow as tf
    shards, out, example_hex = sys.argv[1:4]
    spec = {k: tf.io.FixedLenFeature([], t) for k, t in [("id", tf.int64), ("name", tf.string),
            ("image_data", tf.string), ("label_data", tf.string), ("height", tf.int64), ("width", tf.int64)]}
    rows = []
    for raw in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(shards))):
        ex = tf.io.parse_single_example(raw, spec)
        rows.append([int(ex["id"]), ex["name"].numpy().decode(), hashlib.sha256(ex["image_data"].numpy()).hexdigest(),
                     hashlib.sha256(ex["label_data"].numpy()).hexdigest(), int(ex["height"]), int(ex["width"])])
    with tf.io.TFRecordWriter(out) as w:
        for i in range(3):
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[i, -i])),
                "name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x" * (i * 1000)])),
                "f": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5 * i]))})).SerializeToString())
    reserialized = tf.train.Example.FromString(bytes.fromhex(example_hex)).SerializeToString(deterministic=True)
    print(json.dumps({"rows": rows, "example": reserialized.hex()}))
""")
EXAMPLE = {
    "id": 3,
    "name": "aachen_000000_000019",
    "image_data": b"\x89PNG\x00\xff",
    "height": 256,
    "width": 512,
    "neg": -5,
    "f": [0.25, 2.0],
}


@pytest.fixture(scope="module")
def tensorflow_run(tmp_path_factory):
    """Pack 7 records in 3 shards and run TensorFlow once (in a fresh interpreter, so its
    import cost and protobuf registrations stay out of this process) on them: it reads
    our shards, writes its own TFRecord file and re-serializes one of our Examples."""
    tmp = tmp_path_factory.mktemp("tf")
    _, out = pack_dir(tmp, {"train": 7}, shards=3)
    tf_file = tmp / "tf.tfrecord"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            TF_SCRIPT,
            str(out / "train" / "*.tfrecord"),
            str(tf_file),
            records.encode_example(EXAMPLE).hex(),
        ],
        capture_output=True,
        text=True,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
    )
    if "No module named 'tensorflow'" in done.stderr:
        pytest.skip("tensorflow is not importable here (pip install tensorflow-cpu): reference tests skipped")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, tf_file, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # TensorFlow's import alone takes 5-30 s on a shared CPU
def test_tensorflow_reads_our_shards(tensorflow_run):
    import hashlib

    out, _, result = tensorflow_run
    ours = []
    for shard in sorted((out / "train").glob("*.tfrecord")):
        for data in records.iter_records(shard):
            ex = records.decode_example(data)
            ours.append(
                [
                    ex["id"][0],
                    ex["name"][0].decode(),
                    hashlib.sha256(ex["image_data"][0]).hexdigest(),
                    hashlib.sha256(ex["label_data"][0]).hexdigest(),
                    ex["height"][0],
                    ex["width"][0],
                ]
            )
    assert result["rows"] == ours and [r[0] for r in ours] == list(range(7))


@pytest.mark.slow  # TensorFlow's import alone takes 5-30 s on a shared CPU
def test_we_read_tensorflows_tfrecord_file(tensorflow_run):
    _, tf_file, _ = tensorflow_run
    got = [records.decode_example(d) for d in records.iter_records(tf_file)]
    assert [g["id"] for g in got] == [[0, 0], [1, -1], [2, -2]]
    assert [len(g["name"][0]) for g in got] == [0, 1000, 2000] and got[1]["f"] == [0.5]
    index = records.build_index(tf_file)
    assert records.read_record(tf_file, int(index[2, 0]), record=2) == records.read_record(
        tf_file, int(index[2, 0]), int(index[2, 1])
    )


@pytest.mark.slow  # TensorFlow's import alone takes 5-30 s on a shared CPU
def test_our_example_bytes_equal_tensorflows_serialization(tensorflow_run):
    assert tensorflow_run[2]["example"] == records.encode_example(EXAMPLE).hex()


@pytest.mark.parametrize("how", ["length", "length_crc", "data", "data_crc", "truncate"])
def test_corruption_names_shard_record_and_offset(tmp_path, how):
    _, out = pack_dir(tmp_path, {"train": 6}, shards=2)
    shard = out / "train" / "00001-of-00002.tfrecord"
    offset = int(records.read_index(shard)[1, 0])
    corrupt(shard, how, offset)
    expect = rf"00001-of-00002\.tfrecord: record 1 at byte offset {offset}"
    with pytest.raises(records.CorruptRecordError, match=expect):
        list(records.iter_records(shard))
    with pytest.raises(records.CorruptRecordError, match=expect):
        records.verify_shards(out / "train", progress=False)
    with pytest.raises(records.CorruptRecordError, match=expect):
        records.read_record(shard, offset, record=1)
    assert len(records.read_record(shard, 0, record=0)) > 0  # record 0 is intact


def test_stale_or_missing_index_is_reported_and_rebuilt(tmp_path):
    _, out = pack_dir(tmp_path, {"train": 4}, shards=1)
    shard = out / "train" / "00000-of-00001.tfrecord"
    good = records.index_path(shard).read_text()
    records.index_path(shard).write_text(good.splitlines()[0] + "\n")
    with pytest.raises(UserError, match=r"stale; rebuild it with urbanseg\.data\.tfrecord\.build_index"):
        records.read_index(shard)
    records.index_path(shard).unlink()
    with pytest.raises(UserError, match=r"\.index is missing; rebuild"):
        records.read_index(shard)
    records.build_index(shard)
    assert records.index_path(shard).read_text() == good


def test_rerun_replaces_split_and_failure_keeps_previous(tmp_path):
    prepared, out = pack_dir(tmp_path, {"train": 5}, shards=2)
    pack(PackConfig(prepared=prepared, out=out, shards=3))
    names = sorted(p.name for p in (out / "train").glob("*.tfrecord"))
    assert names == [f"0000{k}-of-00003.tfrecord" for k in range(3)]
    before = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    # a broken input on the next run: the error names it, the packed split is untouched
    label = next((prepared / "labels" / "train").glob("*/*.png"))
    label.write_bytes(b"not a png")
    with pytest.raises(UserError, match=rf"{label.name}: not a PNG file"):
        pack(PackConfig(prepared=prepared, out=out, shards=1))
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == [MARKER, LOCK, "train"]  # no partial folders left


def test_damaged_or_short_png_is_named_not_packed(tmp_path):
    """pack copies PNG bytes into the records without decoding them: every chunk's checksum
    is verified first, so changed bytes or a file cut short are named, not packed."""
    prepared, out = pack_dir(tmp_path, {"train": 3}, shards=1)
    image = next((prepared / "images" / "train").glob("*/*.png"))
    data = bytearray(image.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
    image.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"{image.name}: damaged PNG .*re-run `urbanseg prepare`"):
        pack(PackConfig(prepared=prepared, out=out, shards=1))
    image.write_bytes(bytes(data[:20]))  # shorter than the IHDR chunk
    with pytest.raises(UserError, match=rf"{image.name}: damaged PNG"):
        pack(PackConfig(prepared=prepared, out=out, shards=1))


def test_pack_is_deterministic(tmp_path):
    prepared, out = pack_dir(tmp_path, {"train": 5}, shards=2)
    again = tmp_path / "again"
    pack(PackConfig(prepared=prepared, out=again, shards=2))
    for p in (out / "train").glob("*.tfrecord"):
        assert p.read_bytes() == (again / "train" / p.name).read_bytes()


def test_more_shards_than_records_and_skipped_splits(tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prepared", {"train": 2})
    out = tmp_path / "shards"
    pack(PackConfig(prepared=prepared, out=out, shards=8))
    assert [s.records for s in ShardSpec.load(out / "train" / "spec.json").shards] == [1, 1]
    assert "skipping split 'val'" in capsys.readouterr().out and not (out / "val").exists()


def test_cli_errors_exit_2_naming_the_problem(tmp_path, capsys):
    out = str(tmp_path / "shards")
    assert main(["pack", "--prepared", str(tmp_path / "nope"), "--out", out]) == 2
    assert "prepared folder" in capsys.readouterr().err
    prepared = make_prepared(tmp_path / "prepared", {"train": 3})
    assert main(["pack", "--prepared", str(prepared), "--out", out, "--splits", "test"]) == 2
    assert "none of the splits ['test']" in capsys.readouterr().err
    shutil.rmtree(prepared / "images" / "train" / "bonn")
    assert main(["pack", "--prepared", str(prepared), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "bonn_000001_000019" in err and "Traceback" not in err
    (prepared / "manifest.json").write_text("{")
    assert main(["pack", "--prepared", str(prepared), "--out", out]) == 2
    assert "manifest.json is not a valid manifest" in capsys.readouterr().err
    assert not Path(out, "train").exists()


def test_size_mismatch_is_reported(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", {"train": 2})
    image = next((prepared / "images" / "train").glob("*/*.png"))
    cv2.imwrite(str(image), np.zeros((16, 30, 3), np.uint8))
    with pytest.raises(UserError, match=r"is 30x16 .* the manifest says 32x16"):
        pack(PackConfig(prepared=prepared, out=tmp_path / "s"))


def test_synth_prepare_pack_end_to_end(tmp_path):
    """The real upstream stages: `urbanseg synth` -> `prepare` -> `pack`, then verify."""
    raw, prepared, out = tmp_path / "raw", tmp_path / "prepared", tmp_path / "shards"
    assert main(["synth", "--out", str(raw), "--train", "3", "--val", "2", "--size", "256x128", "--workers", "1"]) == 0
    assert main(["prepare", "--data", str(raw), "--out", str(prepared), "--size", "64x32", "--workers", "1"]) == 0
    assert main(["pack", "--prepared", str(prepared), "--out", str(out), "--shards", "2"]) == 0
    manifest = json.loads((prepared / "manifest.json").read_text())
    for split, n in (("train", 3), ("val", 2)):
        spec = ShardSpec.load(out / split / "spec.json")
        assert (spec.width, spec.height, spec.data_length) == (64, 32, n)
        assert list(spec.pixel_counts) == manifest["splits"][split]["pixel_counts"]
        assert records.verify_shards(out / split, progress=False)["records"] == n
    assert (out / "train").stat().st_mode & 0o755 == 0o755  # not left private like a temp folder

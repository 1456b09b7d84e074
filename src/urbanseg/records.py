"""TFRecord shards: write, index, read, verify, and the `urbanseg pack` stage.

File format (TensorFlow's, byte for byte, so `tf.data.TFRecordDataset` reads our shards):
each record is

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32), CRC32C from
`google_crc32c`. Each `data` is a serialized `tensorflow.Example` (protobuf; the message
classes are built here from a descriptor with TensorFlow's package, names and field numbers,
so TensorFlow is not a dependency).

Index file `<shard>.index` (the format of the `tfrecord` package's tfrecord2idx): one line
per record, "<byte offset of the record> <byte length of the whole record incl. 16 bytes of
framing>".
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from urbanseg.errors import UserError
from urbanseg.util import current_umask

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked crc of the 8 length bytes
_FOOTER = struct.Struct("<I")  # masked crc of the data
FRAMING = _HEADER.size + _FOOTER.size  # 16 bytes around every record's data
SPEC_FORMAT_VERSION = 1


class CorruptRecordError(UserError):
    """A shard whose bytes do not match their CRCs, are truncated, or disagree with the index."""


def masked_crc(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C of `data` (a CRC of data containing CRCs is fragile unmasked)."""
    import google_crc32c

    crc = google_crc32c.value(bytes(data))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """The full on-disk bytes of one record holding `data`."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + _FOOTER.pack(masked_crc(data))


# ----------------------------------------------------------------------------- tf.train.Example


@functools.cache
def example_class() -> type:
    """The `tensorflow.Example` message class, built from a descriptor equal in wire format to
    tensorflow/core/example/{feature,example}.proto, in a private pool (no clash when
    TensorFlow itself is imported in the same process)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="urbanseg/tf_example.proto", package="tensorflow", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> descriptor_pb2.DescriptorProto:
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
        return msg

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", ("value", 1, F.TYPE_BYTES, rep, ""))
    message("FloatList", ("value", 1, F.TYPE_FLOAT, rep, ""))  # proto3: packed by default
    message("Int64List", ("value", 1, F.TYPE_INT64, rep, ""))
    feature = message("Feature", ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
                      ("float_list", 2, F.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
                      ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tensorflow.Int64List"))
    feature.oneof_decl.add(name="kind")
    for field in feature.field:
        field.oneof_index = 0
    features = message("Features", ("feature", 1, F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry"))
    entry = features.nested_type.add(name="FeatureEntry")  # how protoc spells map<string, Feature>
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
    message("Example", ("features", 1, F.TYPE_MESSAGE, opt, ".tensorflow.Features"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def encode_example(features: dict[str, bytes | str | int | float | list]) -> bytes:
    """Serialize a `tensorflow.Example`: bytes/str -> bytes_list, int -> int64_list,
    float -> float_list (a list gives several values of the type of its first item).
    Map keys are written sorted, so equal input gives equal bytes."""
    example = example_class()()
    for key, value in features.items():
        values = value if isinstance(value, list) else [value]
        feature = example.features.feature[key]
        if all(isinstance(v, (bytes, str)) for v in values):
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
        elif all(isinstance(v, (int, np.integer)) for v in values):
            feature.int64_list.value.extend(int(v) for v in values)
        else:
            feature.float_list.value.extend(float(v) for v in values)
    return example.SerializeToString(deterministic=True)


def decode_example(data: bytes) -> dict[str, list]:
    """Parse a serialized `tensorflow.Example` into {feature name: list of values}."""
    example = example_class()()
    example.ParseFromString(data)
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[key] = list(getattr(feature, kind).value) if kind else []
    return out


# ----------------------------------------------------------------------------- reading


def _check_record(buf: bytes, path: Path | str, record: int, offset: int) -> bytes:
    """Validate one whole record's bytes (header + data + footer) and return its data."""
    where = f"{path}: record {record} at byte offset {offset}"
    if len(buf) < _HEADER.size:
        raise CorruptRecordError(f"{where}: truncated header ({len(buf)} of {_HEADER.size} bytes); "
                                 "the shard is incomplete, re-run `urbanseg pack`")
    length, length_crc = _HEADER.unpack_from(buf)
    if masked_crc(buf[:8]) != length_crc:
        raise CorruptRecordError(f"{where}: length CRC mismatch (corrupt length bytes); re-run `urbanseg pack`")
    end = _HEADER.size + length
    if len(buf) < end + _FOOTER.size:
        raise CorruptRecordError(f"{where}: truncated: {length} data bytes + 4 CRC bytes expected, "
                                 f"{len(buf) - _HEADER.size} present; re-run `urbanseg pack`")
    data = buf[_HEADER.size:end]
    if masked_crc(data) != _FOOTER.unpack_from(buf, end)[0]:
        raise CorruptRecordError(f"{where}: data CRC mismatch (corrupt record bytes); re-run `urbanseg pack`")
    return data


def iter_records(path: Path | str) -> Iterator[bytes]:
    """Yield the data of every record of one TFRecord file in order, checking both CRCs.

    Raises CorruptRecordError naming the file, the record index and its byte offset on a
    CRC mismatch or truncation."""
    with open(path, "rb", buffering=1 << 20) as f:
        record, offset = 0, 0
        while header := f.read(_HEADER.size):
            length, length_crc = _HEADER.unpack(header) if len(header) == _HEADER.size else (0, None)
            # A length whose CRC fails is not trusted: _check_record then says why.
            rest = f.read(length + _FOOTER.size) if masked_crc(header[:8]) == length_crc else b""
            buf = header + rest
            yield _check_record(buf, path, record, offset)
            record, offset = record + 1, offset + len(buf)


def read_record(file: Path | str | int, offset: int, length: int | None = None, *, record: int = -1,
                name: Path | str | None = None) -> bytes:
    """The data of the record starting at byte `offset` of `file` (a path or an open file
    descriptor, read with os.pread so one descriptor is safe across threads).

    `length` (the whole record, as in the index) saves a read; a record whose header
    disagrees with it raises CorruptRecordError (a stale index). `record` and `name` only
    label error messages."""
    if isinstance(file, int):
        fd, close, label = file, False, name or f"fd {file}"
    else:
        fd, close, label = os.open(file, os.O_RDONLY), True, name or file
    try:
        if length is None:
            header = os.pread(fd, _HEADER.size, offset)
            ok = len(header) == _HEADER.size and masked_crc(header[:8]) == _HEADER.unpack(header)[1]
            rest = os.pread(fd, _HEADER.unpack(header)[0] + _FOOTER.size, offset + _HEADER.size) if ok else b""
            buf = header + rest
        else:
            buf = os.pread(fd, length, offset)
        data = _check_record(buf, label, record, offset)
    finally:
        if close:
            os.close(fd)
    if length is not None and len(data) + FRAMING != length:
        raise CorruptRecordError(f"{label}: record {record} at byte offset {offset} is {len(data) + FRAMING} "
                                 f"bytes but the index says {length}: the index is stale; rebuild it with "
                                 f"urbanseg.records.build_index({str(label)!r})")
    return data


def index_path(shard: Path | str) -> Path:
    return Path(f"{shard}.index")


def build_index(shard: Path | str) -> np.ndarray:
    """Scan `shard` (checking CRCs), write `<shard>.index` atomically and return it as an
    int64 array (records, 2) of [offset, length]."""
    from urbanseg.util import atomic_write_text

    rows, offset = [], 0
    for data in iter_records(shard):
        rows.append((offset, len(data) + FRAMING))
        offset += len(data) + FRAMING
    atomic_write_text(index_path(shard), "".join(f"{o} {n}\n" for o, n in rows))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def read_index(shard: Path | str) -> np.ndarray:
    """`<shard>.index` as an int64 array (records, 2) of [offset, length], checked against the
    shard's size; a missing, unreadable or stale index raises UserError with the fix."""
    path, fix = index_path(shard), f"rebuild it with urbanseg.records.build_index({str(shard)!r})"
    try:
        text = path.read_text()
        index = np.asarray([line.split() for line in text.splitlines()], dtype=np.int64).reshape(-1, 2)
    except FileNotFoundError:
        raise UserError(f"index {path} is missing; {fix}") from None
    except (ValueError, OSError) as e:
        raise UserError(f"index {path} is unreadable ({e}); {fix}") from None
    size, covered = os.path.getsize(shard), int(index[:, 1].sum())
    expected_offsets = np.concatenate([[0], np.cumsum(index[:, 1])[:-1]]) if len(index) else index[:, 0]
    if (index[:, 1] < FRAMING).any() or not np.array_equal(index[:, 0], expected_offsets):
        raise UserError(f"index {path} is not a sequence of records; {fix}")
    if covered > size:
        cut = int(np.argmax(index[:, 0] + index[:, 1] > size))
        raise CorruptRecordError(f"{shard}: record {cut} at byte offset {index[cut, 0]} is cut off: the shard is "
                                 f"{size} bytes, its index covers {covered} (a truncated shard, or a stale index: "
                                 f"re-run `urbanseg pack`, or {fix} if the shard is the newer file)")
    if covered != size:
        raise UserError(f"index {path} covers {covered} bytes of {shard} ({size} bytes): it is stale; {fix}")
    return index


def load_spec(split_dir: Path | str) -> dict[str, Any]:
    """`<split_dir>/spec.json` as a dict; UserError naming the file when missing or invalid."""
    path = Path(split_dir) / "spec.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: {split_dir} is not a packed split; run `urbanseg pack`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-run `urbanseg pack`") from None


def verify_shards(split_dir: Path | str, *, progress: bool = True) -> dict[str, int]:
    """Read every record of a packed split, checking CRCs, the index files, the spec's counts,
    and that `id` runs 0..n-1. Returns {"shards": n, "records": n, "bytes": n}; raises
    CorruptRecordError / UserError naming the shard, record and offset on the first problem."""
    from tqdm import tqdm

    split_dir = Path(split_dir)
    spec = load_spec(split_dir)
    total = sum(s["bytes"] for s in spec["shards"])
    record_id, nbytes = 0, 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {split_dir.name}", disable=not progress) as bar:
        for shard in spec["shards"]:
            path, lengths = split_dir / shard["file"], []
            for data in iter_records(path):  # CRCs and framing first: they name the bad record
                got = decode_example(data).get("id", [None])[0]
                if got != record_id:
                    raise CorruptRecordError(f"{path}: record {len(lengths)} has id {got}, expected {record_id}")
                lengths.append(len(data) + FRAMING)
                record_id += 1
                bar.update(lengths[-1])
            index = read_index(path)
            if len(lengths) != shard["records"] or index[:, 1].tolist() != lengths:
                raise CorruptRecordError(f"{path}: {len(lengths)} records, spec.json says {shard['records']} and "
                                         f"the index {len(index)}; re-run `urbanseg pack`")
            nbytes += os.path.getsize(path)
    if record_id != spec["data_length"]:
        raise CorruptRecordError(f"{split_dir}: {record_id} records, spec.json data_length {spec['data_length']}")
    return {"shards": len(spec["shards"]), "records": record_id, "bytes": nbytes}


# ----------------------------------------------------------------------------- urbanseg pack

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header(data: bytes, path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, without decoding."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise UserError(f"{path} is not a PNG file; re-run `urbanseg prepare`")
    return struct.unpack(">IIBB", data[16:26])


def _load_manifest(prepared: Path) -> dict[str, Any]:
    path = prepared / "manifest.json"
    if not prepared.is_dir():
        raise UserError(f"prepared folder {prepared} not found; run `urbanseg prepare --out {prepared}` first")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: {prepared} is not a prepared folder; run `urbanseg prepare`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid manifest ({e}); re-run `urbanseg prepare`") from None
    missing = [k for k in ("label_set", "size", "splits") if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise UserError(f"{path} is not a valid manifest (no {', '.join(missing)}); re-run `urbanseg prepare`")
    return manifest


def _split_pairs(prepared: Path, split: str, info: dict[str, Any]) -> list[tuple[str, Path, Path]]:
    """[(stem, image path, label path)] of a prepared split sorted by stem; UserError listing
    the stems of the manifest whose files are missing. Entries come from the manifest's
    "files" ("<city>/<stem>") when present, else its "stems" (looked up under the cities)."""
    images, labels = prepared / "images" / split, prepared / "labels" / split
    by_stem: dict[str, Path] = {}
    for p in sorted(images.glob("*/*.png")):
        if p.stem in by_stem:
            raise UserError(f"stem {p.stem!r} appears in two cities: {by_stem[p.stem]} and {p}")
        by_stem[p.stem] = p.relative_to(images)
    pairs, missing = [], []
    for stem in sorted(info.get("files") or info["stems"], key=lambda s: Path(s).name):
        rel = Path(f"{stem}.png") if "/" in stem else by_stem.get(stem)
        if rel is None or not (images / rel).is_file() or not (labels / rel).is_file():
            missing.append(stem)
            continue
        pairs.append((Path(stem).name, images / rel, labels / rel))
    if missing:
        raise UserError(f"{len(missing)} stems of split {split!r} in {prepared / 'manifest.json'} have no image "
                        f"and label under {images} and {labels}, e.g. {missing[:3]}; re-run `urbanseg prepare`")
    if "count" in info and info["count"] != len(pairs):
        raise UserError(f"{prepared / 'manifest.json'}: split {split!r} count {info['count']} != "
                        f"{len(pairs)} stems; re-run `urbanseg prepare`")
    return pairs


def _encode_pair(record_id: int, stem: str, image: Path, label: Path, size: tuple[int, int]) -> bytes:
    """One serialized Example: the prepared PNG files' bytes as they are (no re-encode)."""
    image_data, label_data = image.read_bytes(), label.read_bytes()
    w, h, depth, _ = _png_header(image_data, image)
    lw, lh, ldepth, ltype = _png_header(label_data, label)
    if (w, h) != tuple(size) or (lw, lh) != tuple(size):
        raise UserError(f"{image} is {w}x{h} and {label} {lw}x{lh}, the manifest says {size[0]}x{size[1]}; "
                        "re-run `urbanseg prepare`")
    if depth != 8 or (ldepth, ltype) != (8, 0):
        raise UserError(f"{image} / {label}: expected an 8-bit image and an 8-bit greyscale label "
                        f"(got bit depths {depth}/{ldepth}, label colour type {ltype}); re-run `urbanseg prepare`")
    return encode_example({"id": record_id, "name": stem, "image_data": image_data, "label_data": label_data,
                           "height": h, "width": w})


def _pixel_counts(pairs: list[tuple[str, Path, Path]], num_classes: int) -> list[int]:
    """Per-class label pixel counts (ignore excluded), for a manifest that lacks them."""
    import cv2

    counts = np.zeros(256, np.int64)
    for _, _, label in pairs:
        counts += np.bincount(cv2.imread(str(label), cv2.IMREAD_UNCHANGED).ravel(), minlength=256)
    return counts[:num_classes].tolist()


def _write_shards(stage: Path, pairs: list, num_shards: int, size: tuple[int, int], desc: str) -> list[dict]:
    """Write `pairs` as `num_shards` contiguous, even shards (+ index files) into `stage`."""
    from tqdm import tqdm

    from urbanseg.util import atomic_path, atomic_write_text

    n, shards = len(pairs), []
    bounds = [k * n // num_shards for k in range(num_shards + 1)]
    with tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for k in range(num_shards):
            name, rows = f"{k:05d}-of-{num_shards:05d}.tfrecord", []
            with atomic_path(stage / name) as tmp, open(tmp, "wb") as f:
                for i in range(bounds[k], bounds[k + 1]):
                    record = frame_record(_encode_pair(i, *pairs[i], size))
                    rows.append((f.tell(), len(record)))
                    f.write(record)
                    bar.update()
            atomic_write_text(index_path(stage / name), "".join(f"{o} {m}\n" for o, m in rows))
            shards.append({"file": name, "index": name + ".index", "first_id": bounds[k], "records": len(rows),
                           "bytes": sum(m for _, m in rows)})
    return shards


def _make_readable(folder: Path) -> None:
    """Give the folder and its files the umask's usual modes (mkdtemp/mkstemp make them
    private, 0700/0600), so shards packed for a team are readable by it."""
    umask = current_umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _swap_in(stage: Path, final: Path) -> None:
    """Replace the folder `final` by `stage` with two renames (the old one is then deleted)."""
    import shutil

    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        try:
            os.replace(stage, final)
        except BaseException:
            os.replace(old, final)  # put the previous split back
            raise
        shutil.rmtree(old)
    else:
        os.replace(stage, final)


def pack_split(prepared: Path, manifest: dict, split: str, out: Path, shards: int, config: dict) -> dict:
    """Pack one prepared split into `out/<split>/`; returns its spec. The split is built in
    `out/.<split>.partial-*` (each shard under a temporary name, spec.json last) and swapped
    in place of any previous `out/<split>` only when complete."""
    import shutil
    import tempfile

    from urbanseg import __version__
    from urbanseg.labels import LabelSet
    from urbanseg.util import atomic_write_text

    info, label_set = manifest["splits"][split], LabelSet.from_dict(manifest["label_set"])
    pairs = _split_pairs(prepared, split, info)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f".{split}.partial-*"):  # from an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{split}.partial-", dir=out))
    try:
        shard_list = _write_shards(stage, pairs, min(shards, len(pairs)), manifest["size"], f"pack {split}")
        spec = {
            "format_version": SPEC_FORMAT_VERSION, "urbanseg_version": __version__, "split": split,
            "height": manifest["size"][1], "width": manifest["size"][0], "data_length": len(pairs),
            "num_classes": label_set.num_classes, "classes": list(label_set.classes),
            "palette": [list(c) for c in label_set.palette], "ignore_index": label_set.ignore_index,
            "label_set": label_set.to_dict(),
            "pixel_counts": info.get("pixel_counts") or _pixel_counts(pairs, label_set.num_classes),
            "features": {"id": "int64", "name": "bytes", "image_data": "bytes (PNG, RGB)",
                         "label_data": "bytes (PNG, uint8 class index, 255 ignore)", "height": "int64",
                         "width": "int64"},
            "shards": shard_list, "prepared": str(prepared.resolve()), "data": manifest.get("data"), "pack": config,
        }
        # one key per line, values compact: readable without a 300-line palette
        atomic_write_text(stage / "spec.json", "{\n" + ",\n".join(
            f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in spec.items()) + "\n}\n")
        _make_readable(stage)
        _swap_in(stage, out / split)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return spec


def pack(config: Any) -> None:
    """`urbanseg pack`: every requested split present in the prepared manifest ->
    `<out>/<split>/NNNNN-of-NNNNN.tfrecord` + `.index` + `spec.json`."""
    from urbanseg.config import to_dict

    prepared, out = Path(config.prepared), Path(config.out)
    manifest = _load_manifest(prepared)
    todo = [s for s in config.splits if s in manifest["splits"] and manifest["splits"][s].get("stems")]
    if not todo:
        raise UserError(f"none of the splits {list(config.splits)} is prepared in {prepared} "
                        f"(it has {sorted(manifest['splits'])}); choose others with --splits")
    for split in config.splits:
        if split not in todo:
            print(f"pack: skipping split {split!r}: not prepared in {prepared}")
    for split in todo:
        spec = pack_split(prepared, manifest, split, out, config.shards, to_dict(config))
        size = sum(s["bytes"] for s in spec["shards"]) / 1e6
        print(f"pack: {split}: {spec['data_length']} records in {len(spec['shards'])} shards "
              f"({size:.1f} MB) -> {out / split}")

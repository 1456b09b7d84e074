"""TFRecord shards: write, index, read, verify (the split's spec.json is `urbanseg.data.formats.ShardSpec`).

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
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from urbanseg.data.formats import ShardSpec
from urbanseg.errors import UserError
from urbanseg.util import atomic_write_text

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked crc of the 8 length bytes
_FOOTER = struct.Struct("<I")  # masked crc of the data
FRAMING = _HEADER.size + _FOOTER.size  # 16 bytes around every record's data


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
    feature = message(
        "Feature",
        ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
        ("float_list", 2, F.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
        ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tensorflow.Int64List"),
    )
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
        raise CorruptRecordError(
            f"{where}: truncated header ({len(buf)} of {_HEADER.size} bytes); "
            "the shard is incomplete, re-run `urbanseg pack`"
        )
    length, length_crc = _HEADER.unpack_from(buf)
    if masked_crc(buf[:8]) != length_crc:
        raise CorruptRecordError(f"{where}: length CRC mismatch (corrupt length bytes); re-run `urbanseg pack`")
    end = _HEADER.size + length
    if len(buf) < end + _FOOTER.size:
        raise CorruptRecordError(
            f"{where}: truncated: {length} data bytes + 4 CRC bytes expected, "
            f"{len(buf) - _HEADER.size} present; re-run `urbanseg pack`"
        )
    data = buf[_HEADER.size : end]
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


def read_record(
    file: Path | str | int, offset: int, length: int | None = None, *, record: int = -1, name: Path | str | None = None
) -> bytes:
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
        raise CorruptRecordError(
            f"{label}: record {record} at byte offset {offset} is {len(data) + FRAMING} "
            f"bytes but the index says {length}: the index is stale; rebuild it with "
            f"urbanseg.data.tfrecord.build_index({str(label)!r})"
        )
    return data


def index_path(shard: Path | str) -> Path:
    return Path(f"{shard}.index")


def build_index(shard: Path | str) -> np.ndarray:
    """Scan `shard` (checking CRCs), write `<shard>.index` atomically and return it as an
    int64 array (records, 2) of [offset, length]."""

    rows, offset = [], 0
    for data in iter_records(shard):
        rows.append((offset, len(data) + FRAMING))
        offset += len(data) + FRAMING
    atomic_write_text(index_path(shard), "".join(f"{o} {n}\n" for o, n in rows))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def read_index(shard: Path | str) -> np.ndarray:
    """`<shard>.index` as an int64 array (records, 2) of [offset, length], checked against the
    shard's size; a missing, unreadable or stale index raises UserError with the fix."""
    path, fix = index_path(shard), f"rebuild it with urbanseg.data.tfrecord.build_index({str(shard)!r})"
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
        raise CorruptRecordError(
            f"{shard}: record {cut} at byte offset {index[cut, 0]} is cut off: the shard is "
            f"{size} bytes, its index covers {covered} (a truncated shard, or a stale index: "
            f"re-run `urbanseg pack`, or {fix} if the shard is the newer file)"
        )
    if covered != size:
        raise UserError(f"index {path} covers {covered} bytes of {shard} ({size} bytes): it is stale; {fix}")
    return index


def verify_shards(split_dir: Path | str, *, progress: bool = True) -> dict[str, int]:
    """Read every record of a packed split, checking CRCs, the index files, the spec's counts,
    and that `id` runs 0..n-1. Returns {"shards": n, "records": n, "bytes": n}; raises
    CorruptRecordError / UserError naming the shard, record and offset on the first problem."""
    from tqdm import tqdm

    split_dir = Path(split_dir)
    spec = ShardSpec.load(split_dir / ShardSpec.FILE)
    total = sum(s.bytes for s in spec.shards)
    record_id, nbytes = 0, 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {split_dir.name}", disable=not progress) as bar:
        for shard in spec.shards:
            path, lengths = split_dir / shard.file, list[int]()
            for data in iter_records(path):  # CRCs and framing first: they name the bad record
                got = decode_example(data).get("id", [None])[0]
                if got != record_id:
                    raise CorruptRecordError(f"{path}: record {len(lengths)} has id {got}, expected {record_id}")
                lengths.append(len(data) + FRAMING)
                record_id += 1
                bar.update(lengths[-1])
            index = read_index(path)
            if len(lengths) != shard.records or index[:, 1].tolist() != lengths:
                raise CorruptRecordError(
                    f"{path}: {len(lengths)} records, spec.json says {shard.records} and "
                    f"the index {len(index)}; re-run `urbanseg pack`"
                )
            nbytes += os.path.getsize(path)
    return {"shards": len(spec.shards), "records": record_id, "bytes": nbytes}

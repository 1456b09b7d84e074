"""The two files the data stages meet at, one typed class each: `Manifest` (a prepared
folder's manifest.json, written by `prepare`, read by `pack` and `evaluate --full-res`)
and `ShardSpec` (a packed split's spec.json, written by `pack`, read by the loader,
`train`, `evaluate`, `predict --split` and `verify_shards`).

`load(path)` checks structure, types and values (a wrong one is a `FormatError` naming
the file, the field and the fix) and the format version (`urbanseg.schema.check_version`);
`save(path)` writes atomically in the documented layout (docs/formats.md). Readers use
the typed attributes, never raw keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from urbanseg import __version__
from urbanseg.labels import LabelSet
from urbanseg.schema import FormatError, Node, check_version, load_json
from urbanseg.util import atomic_write_text

MANIFEST_VERSION = 1
SPEC_VERSION = 1
# The record features of every shard (docs/formats.md), listed in spec.json for readers.
FEATURES = {
    "id": "int64",
    "name": "bytes",
    "image_data": "bytes (PNG, RGB)",
    "label_data": "bytes (PNG, uint8 class index, 255 ignore)",
    "height": "int64",
    "width": "int64",
}


def _current_version() -> str:

    return __version__


def _relative(node: Node) -> str:
    """A path below the folder the format describes: no absolute path, no `..`."""
    text = node.text()
    if text.startswith(("/", "\\")) or ".." in text.replace("\\", "/").split("/"):
        raise node.error("a path relative to the prepared split, without `..`")
    return text


# --------------------------------------------------------------------------- manifest.json


# Layouts and annotation kinds a prepared folder can come from (`urbanseg prepare`); a
# manifest without `layout` is of the Cityscapes layout (written before paired folders).
LAYOUTS = ("cityscapes", "pairs")
SOURCES = ("labelIds", "trainIds", "indices", "color", "polygons", "labelme")


@dataclass(frozen=True)
class SplitEntry:
    """One prepared split: `stems` (sorted by city, then stem), `files` ("<city>/<stem>",
    relative to images/<split>/ and labels/<split>/), per-class label pixel counts and the
    ignored pixels. Manifests of older writers may lack the last three (None). For paired
    folders, `annotations[i]` is the raw annotation of `stems[i]`, relative to the
    manifest's `masks` folder (None for the Cityscapes layout)."""

    stems: tuple[str, ...]
    files: tuple[str, ...] | None = None
    pixel_counts: tuple[int, ...] | None = None
    ignored_pixels: int | None = None
    annotations: tuple[str, ...] | None = None

    @property
    def count(self) -> int:
        return len(self.stems)

    @property
    def entries(self) -> tuple[str, ...]:
        """What to look the pairs up by: `files` when present, else `stems`."""
        return self.files or self.stems

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "stems": list(self.stems)}
        if self.files is not None:
            out["files"] = list(self.files)
        if self.pixel_counts is not None:
            out["pixel_counts"] = list(self.pixel_counts)
        if self.ignored_pixels is not None:
            out["ignored_pixels"] = self.ignored_pixels
        if self.annotations is not None:
            out["annotations"] = list(self.annotations)
        return out

    @classmethod
    def read(cls, node: Node, num_classes: int) -> SplitEntry:
        count = node["count"].integer(min=0)
        stems = tuple(_relative(n) for n in node["stems"].items())
        if len(stems) != count:
            raise node["count"].invalid(f"is {count} but `{node.path}.stems` lists {len(stems)} names")
        if len(set(stems)) != len(stems):
            raise node["stems"].invalid("lists a stem twice; stems must be unique within a split")
        return cls(
            stems=stems,
            files=node["files"].maybe(lambda n: _files(n, stems)),
            pixel_counts=node["pixel_counts"].maybe(lambda n: tuple(n.ints(length=num_classes, min=0))),
            ignored_pixels=node["ignored_pixels"].maybe(lambda n: n.integer(min=0)),
            annotations=node["annotations"].maybe(lambda n: tuple(_relative(i) for i in n.items(length=count))),
        )


def _files(node: Node, stems: tuple[str, ...]) -> tuple[str, ...]:
    """`files[i]` is "<city>/<stems[i]>"."""
    files = []
    for i, (item, stem) in enumerate(zip(node.items(length=len(stems)), stems, strict=True)):
        rel = _relative(item)
        if Path(rel).name != Path(stem).name:
            raise item.error(f'"<city>/{stem}" (the file of `stems[{i}]`)')
        files.append(rel)
    return tuple(files)


@dataclass(frozen=True)
class Manifest:
    """A prepared folder's manifest.json: label set, size (W, H), annotation source (one
    of `SOURCES`), the raw dataset folder (`data`; the images folder of paired folders)
    and the prepared splits. Paired folders also record `layout` "pairs" and `masks`, the
    annotation folder; a manifest without them is of the Cityscapes layout. Written last
    by `prepare`."""

    FILE: ClassVar[str] = "manifest.json"

    label_set: LabelSet
    size: tuple[int, int]
    splits: dict[str, SplitEntry]
    data: str | None = None
    source: str | None = None
    urbanseg_version: str = field(default_factory=_current_version)
    layout: str | None = None
    masks: str | None = None

    def to_dict(self) -> dict[str, Any]:
        pairs = {"layout": self.layout, "masks": self.masks} if self.layout not in (None, "cityscapes") else {}
        return {
            "format_version": MANIFEST_VERSION,
            "urbanseg_version": self.urbanseg_version,
            "label_set": self.label_set.to_dict(),
            "size": list(self.size),
            "source": self.source,
            "data": self.data,
            **pairs,
            "splits": {name: entry.to_dict() for name, entry in self.splits.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path: Path | str) -> None:

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> Manifest:
        """Read and check `path` (a prepared folder's manifest.json); FormatError naming
        the file, the field and the fix ("re-run `urbanseg prepare`")."""
        path = Path(path)
        doc = load_json(
            path,
            what="manifest",
            fix="re-run `urbanseg prepare`",
            missing=f"{path} not found: {path.parent} is not a prepared folder; run `urbanseg prepare`",
        )
        return cls.read(doc)

    @classmethod
    def parse(cls, value: Any, file: Path | str) -> Manifest:
        """A manifest from its dict (what `to_dict` returns), checked as `load` does."""
        return cls.read(Node.root(value, file=file, fix="re-run `urbanseg prepare`"))

    @classmethod
    def read(cls, doc: Node) -> Manifest:
        doc.obj()
        check_version(doc, MANIFEST_VERSION, "manifest")
        label_set = LabelSet.read(doc["label_set"])
        manifest = cls(
            label_set=label_set,
            size=tuple(doc["size"].ints(length=2, min=1)),  # type: ignore[arg-type]
            splits={
                name: SplitEntry.read(node, label_set.num_classes) for name, node in doc["splits"].members().items()
            },
            data=doc["data"].maybe(Node.text),
            source=doc["source"].maybe(lambda n: n.text(choices=SOURCES)),
            urbanseg_version=doc["urbanseg_version"].maybe(Node.text) or "unknown",
            layout=doc["layout"].maybe(lambda n: n.text(choices=LAYOUTS)),
            masks=doc["masks"].maybe(Node.text),
        )
        if manifest.layout == "pairs":  # what evaluate --full-res finds the raw annotations by
            if manifest.masks is None:
                raise doc["masks"].error("the annotation folder of the paired folders")
            for name, entry in manifest.splits.items():
                if entry.annotations is None:
                    raise doc["splits"][name]["annotations"].error("the raw annotation of each stem")
        return manifest


# --------------------------------------------------------------------------- spec.json


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split: its file and index file (beside spec.json), the id of its
    first record, its record count and its size in bytes."""

    file: str
    index: str
    first_id: int
    records: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "index": self.index,
            "first_id": self.first_id,
            "records": self.records,
            "bytes": self.bytes,
        }

    @classmethod
    def read(cls, node: Node, first_id: int) -> ShardEntry:
        entry = cls(
            file=node["file"].file_name(),
            index=node["index"].file_name(),
            first_id=node["first_id"].integer(min=0),
            records=node["records"].integer(min=0),
            bytes=node["bytes"].integer(min=0),
        )
        if entry.first_id != first_id:
            raise node["first_id"].invalid(f"is {entry.first_id}, but the shards before it hold {first_id} records")
        return entry


@dataclass(frozen=True)
class ShardSpec:
    """A packed split's spec.json: image size, label set, per-class pixel counts (for class
    weights), the shards in order, where the data came from and the pack config."""

    FILE: ClassVar[str] = "spec.json"

    split: str
    width: int
    height: int
    label_set: LabelSet
    pixel_counts: tuple[int, ...]
    shards: tuple[ShardEntry, ...]
    prepared: str | None = None
    data: str | None = None
    pack: dict[str, Any] | None = None
    features: dict[str, Any] = field(default_factory=lambda: dict(FEATURES))
    urbanseg_version: str = field(default_factory=_current_version)

    @property
    def data_length(self) -> int:
        """Records in the split (ids 0..data_length-1)."""
        return sum(s.records for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        ls = self.label_set
        return {
            "format_version": SPEC_VERSION,
            "urbanseg_version": self.urbanseg_version,
            "split": self.split,
            "height": self.height,
            "width": self.width,
            "data_length": self.data_length,
            "num_classes": ls.num_classes,
            "classes": list(ls.classes),
            "palette": [list(c) for c in ls.palette],
            "ignore_index": ls.ignore_index,
            "label_set": ls.to_dict(),
            "pixel_counts": list(self.pixel_counts),
            "features": self.features,
            "shards": [s.to_dict() for s in self.shards],
            "prepared": self.prepared,
            "data": self.data,
            "pack": self.pack,
        }

    def to_json(self) -> str:
        # one key per line, values compact: readable without a 300-line palette
        return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in self.to_dict().items()) + "\n}\n"

    def save(self, path: Path | str) -> None:

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> ShardSpec:
        """Read and check `path` (a split's spec.json); FormatError naming the file, the
        field and the fix ("re-run `urbanseg pack`")."""
        path = Path(path)
        doc = load_json(
            path,
            what="shard spec",
            fix="re-run `urbanseg pack`",
            missing=f"{path} not found: {path.parent} is not a packed split; run `urbanseg pack`",
        )
        return cls.read(doc)

    @classmethod
    def read(cls, doc: Node) -> ShardSpec:
        doc.obj()
        check_version(doc, SPEC_VERSION, "shard spec")
        label_set = LabelSet.read(doc["label_set"])
        shards: list[ShardEntry] = []
        for node in doc["shards"].items():
            shards.append(ShardEntry.read(node, sum(s.records for s in shards)))
        spec = cls(
            split=doc["split"].text(),
            width=doc["width"].integer(min=1),
            height=doc["height"].integer(min=1),
            label_set=label_set,
            pixel_counts=tuple(doc["pixel_counts"].ints(length=label_set.num_classes, min=0)),
            shards=tuple(shards),
            prepared=doc["prepared"].maybe(Node.text),
            data=doc["data"].maybe(Node.text),
            pack=doc["pack"].maybe(Node.obj),
            features=doc["features"].obj(),
            urbanseg_version=doc["urbanseg_version"].maybe(Node.text) or "unknown",
        )
        _check_summary(doc, spec)
        return spec


def _check_summary(doc: Node, spec: ShardSpec) -> None:
    """The fields repeated "at a glance" must agree with `label_set` and `shards`."""
    length = doc["data_length"].integer(min=0)
    if length != spec.data_length:
        raise doc["data_length"].invalid(
            f"is {length} but the shards hold {spec.data_length} records (the sum of `shards[].records`)"
        )
    derived = spec.to_dict()
    for key in ("num_classes", "classes", "palette", "ignore_index"):
        if doc[key].value != derived[key]:
            raise doc[key].error(f"{json.dumps(derived[key])[:60]}, as in `label_set`")


__all__ = [
    "FEATURES",
    "LAYOUTS",
    "MANIFEST_VERSION",
    "SOURCES",
    "SPEC_VERSION",
    "FormatError",
    "Manifest",
    "ShardEntry",
    "ShardSpec",
    "SplitEntry",
]

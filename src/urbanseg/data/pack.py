"""`urbanseg pack`: prepared image/label pairs -> sharded TFRecord files with a spec.

Out: ``<out>/<split>/NNNNN-of-NNNNN.tfrecord`` (+ ``.index``) and ``<out>/<split>/spec.json``
(records: `urbanseg.data.tfrecord`; spec.json: `urbanseg.data.formats.ShardSpec`; both in
docs/formats.md). Each split is built in a hidden staging folder and swapped in only when
complete. The out folder and every split folder it replaces must be pack's own
(`urbanseg.outputs`); one pack at a time per out folder.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from urbanseg import outputs
from urbanseg.config import PackConfig, to_dict
from urbanseg.data.formats import Manifest, ShardEntry, ShardSpec, SplitEntry
from urbanseg.data.tfrecord import encode_example, frame_record, index_path
from urbanseg.errors import UserError
from urbanseg.imaging import png_problem
from urbanseg.util import atomic_path, atomic_write_text, current_umask


def _png_header(data: bytes, path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, once every chunk's
    checksum is verified (`imaging.png_problem`): the bytes go into the records as they
    are, so a damaged file would otherwise only show when a loader decodes it."""
    problem = png_problem(data)
    if problem is None and data[12:16] != b"IHDR":
        problem = "not a PNG file"
    if problem:
        raise UserError(f"{path}: {problem}; re-run `urbanseg prepare` to write it again")
    return struct.unpack(">IIBB", data[16:26])


def _load_manifest(prepared: Path) -> Manifest:
    if prepared.exists() and not prepared.is_dir():
        raise UserError(f"--prepared {prepared} is a file; give the folder `urbanseg prepare --out` wrote")
    if not prepared.is_dir():
        raise UserError(f"prepared folder {prepared} not found; run `urbanseg prepare --out {prepared}` first")
    return Manifest.load(prepared / Manifest.FILE)


def _split_pairs(prepared: Path, split: str, info: SplitEntry) -> list[tuple[str, Path, Path]]:
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
    for stem in sorted(info.entries, key=lambda s: Path(s).name):
        rel = Path(f"{stem}.png") if "/" in stem else by_stem.get(stem)
        if rel is None or not (images / rel).is_file() or not (labels / rel).is_file():
            missing.append(stem)
            continue
        pairs.append((Path(stem).name, images / rel, labels / rel))
    if missing:
        raise UserError(
            f"{len(missing)} stems of split {split!r} in {prepared / Manifest.FILE} have no image "
            f"and label under {images} and {labels}, e.g. {missing[:3]}; re-run `urbanseg prepare`"
        )
    return pairs


def _encode_pair(record_id: int, stem: str, image: Path, label: Path, size: tuple[int, int]) -> bytes:
    """One serialized Example: the prepared PNG files' bytes as they are (no re-encode)."""
    image_data, label_data = image.read_bytes(), label.read_bytes()
    w, h, depth, _ = _png_header(image_data, image)
    lw, lh, ldepth, ltype = _png_header(label_data, label)
    if (w, h) != tuple(size) or (lw, lh) != tuple(size):
        raise UserError(
            f"{image} is {w}x{h} and {label} {lw}x{lh}, the manifest says {size[0]}x{size[1]}; "
            "re-run `urbanseg prepare`"
        )
    if depth != 8 or (ldepth, ltype) != (8, 0):
        raise UserError(
            f"{image} / {label}: expected an 8-bit image and an 8-bit greyscale label "
            f"(got bit depths {depth}/{ldepth}, label colour type {ltype}); re-run `urbanseg prepare`"
        )
    return encode_example(
        {"id": record_id, "name": stem, "image_data": image_data, "label_data": label_data, "height": h, "width": w}
    )


def _pixel_counts(pairs: list[tuple[str, Path, Path]], num_classes: int) -> list[int]:
    """Per-class label pixel counts (ignore excluded), for a manifest that lacks them."""
    import cv2

    counts = np.zeros(256, np.int64)
    for _, _, label in pairs:
        labels = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
        if labels is None:
            raise UserError(f"{label} cannot be decoded as a PNG; re-run `urbanseg prepare`")
        counts += np.bincount(labels.ravel(), minlength=256)
    return counts[:num_classes].tolist()


def _write_shards(
    stage: Path, pairs: list[tuple[str, Path, Path]], num_shards: int, size: tuple[int, int], desc: str
) -> list[ShardEntry]:
    """Write `pairs` as `num_shards` contiguous, even shards (+ index files) into `stage`."""
    from tqdm import tqdm

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
            shards.append(
                ShardEntry(
                    file=name,
                    index=name + ".index",
                    first_id=bounds[k],
                    records=len(rows),
                    bytes=sum(m for _, m in rows),
                )
            )
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


def pack_split(prepared: Path, manifest: Manifest, split: str, out: Path, shards: int, config: dict) -> ShardSpec:
    """Pack one prepared split into `out/<split>/`; returns its spec. The split is built in
    `out/.<split>.partial-*` (each shard under a temporary name, spec.json last) and swapped
    in place of any previous `out/<split>` only when complete. The caller holds `out`
    (`outputs.claim`) and has checked that `out/<split>` is pack's (`_check_splits`)."""

    info, label_set = manifest.splits[split], manifest.label_set
    pairs = _split_pairs(prepared, split, info)
    # left by an interrupted run (no other run is using them: this one holds the out folder's lock)
    for leftover in [*out.glob(f".{split}.partial-*"), *out.glob(f".{split}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{split}.partial-", dir=out))
    try:
        shard_list = _write_shards(stage, pairs, min(shards, len(pairs)), manifest.size, f"pack {split}")
        spec = ShardSpec(
            split=split,
            width=manifest.size[0],
            height=manifest.size[1],
            label_set=label_set,
            pixel_counts=info.pixel_counts or tuple(_pixel_counts(pairs, label_set.num_classes)),
            shards=tuple(shard_list),
            prepared=str(prepared.resolve()),
            data=manifest.data,
            pack=config,
        )
        spec.save(stage / ShardSpec.FILE)
        outputs.write_marker(stage, "pack")
        _make_readable(stage)
        _swap_in(stage, out / split)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return spec


def pack(config: PackConfig) -> int:
    """`urbanseg pack`: every requested split present in the prepared manifest ->
    `<out>/<split>/NNNNN-of-NNNNN.tfrecord` + `.index` + `spec.json`."""

    prepared, out = Path(config.prepared), Path(config.out)
    manifest = _load_manifest(prepared)
    todo = [s for s in config.splits if s in manifest.splits and manifest.splits[s].count]
    if not todo:
        raise UserError(
            f"none of the splits {list(config.splits)} is prepared in {prepared} "
            f"(it has {sorted(manifest.splits)}); choose others with --splits"
        )
    for split in config.splits:
        if split not in todo:
            print(f"pack: skipping split {split!r}: not prepared in {prepared}")
    with outputs.claim(out, "pack", check=lambda: _check_splits(out, todo)):
        for split in todo:
            spec = pack_split(prepared, manifest, split, out, config.shards, to_dict(config))
            size = sum(s.bytes for s in spec.shards) / 1e6
            print(
                f"pack: {split}: {spec.data_length} records in {len(spec.shards)} shards "
                f"({size:.1f} MB) -> {out / split}"
            )
    return 0


def _check_splits(out: Path, splits: list[str]) -> None:
    """Only pack's own split folders are replaced: UserError for any other `out/<split>`
    (reads only)."""
    for split in splits:
        outputs.check_owner(out / split, "pack", what="split folder")

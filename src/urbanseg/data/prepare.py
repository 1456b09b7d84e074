"""`urbanseg prepare`: a raw dataset -> resized image/label pairs.

In:  the Cityscapes layout (``--data``: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``
     and ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``, or another ``--source``), or
     paired folders (``--images``, ``--masks``); `urbanseg.data.sources` finds the pairs and
     their splits, `urbanseg.data.annotations` reads each annotation into class indices.
Out: ``<out>/images/<split>/<city>/<stem>.png``  RGB uint8 (H, W, 3), anti-aliased resize;
     ``<out>/labels/<split>/<city>/<stem>.png``  uint8 (H, W) class index, 255 = ignore,
     nearest-neighbour resize; ``<out>/manifest.json`` (written last: it exists only when
     every pair is in place); ``<out>/prepare_config.yaml`` (the resolved command).

Every file is written to a temporary name and renamed, so an interrupted run leaves
only complete files, and a re-run skips the pairs whose outputs are newer than both
inputs. The settings that change the outputs (raw folders, size, source, label set) are
recorded in ``<out>/.urbanseg-prepare.json`` before the first write: a re-run with other settings is
refused (mixing two settings in one folder would be silent corruption, and deleting a
long preparation behind the user's back is worse) unless ``--overwrite`` is given.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from urbanseg import __version__, outputs, util
from urbanseg.config import PrepareConfig, parse_size, to_dict
from urbanseg.data.annotations import BadFile, header_problem, read_bgr, read_labels
from urbanseg.data.formats import MANIFEST_VERSION, Manifest
from urbanseg.data.sources import Found, Pair, find
from urbanseg.errors import UserError
from urbanseg.imaging import png_problem, resize_image, resize_labels, save_png
from urbanseg.labels import LabelSet, get_label_set
from urbanseg.memory import check_prepare as check_prepare_memory

STATE_FILE = ".urbanseg-prepare.json"
MANIFEST = "manifest.json"  # `urbanseg.data.formats.Manifest`
_NOTES = 10  # notes on annotations (labelme flags, shapes not drawn) printed in full
__all__ = ["BadFile", "Conversion", "Outcome", "Pair", "prepare", "process_pair", "read_labels"]


@dataclass(frozen=True)
class Conversion:
    """What every pair is turned into: output size (W, H), annotation kind, label set."""

    size: tuple[int, int]
    source: str
    label_set: LabelSet


class Outcome(NamedTuple):
    written: bool
    counts: np.ndarray | None  # (256,) int64 histogram of the output label image
    error: str | None


# --------------------------------------------------------------------------- per pair


def _existing_counts(pair: Pair, conversion: Conversion) -> np.ndarray | None:
    """Histogram of an existing, valid output label, or None if it must be redone. Both
    files' checksums are verified (`png_problem`): `pack` copies their bytes as they are."""
    from PIL import Image

    try:
        image, label = pair.out_image.read_bytes(), pair.out_label.read_bytes()  # read once: checked, then opened
        if png_problem(image) or png_problem(label):
            return None
        with Image.open(io.BytesIO(label)) as im:
            labels = np.asarray(im) if im.mode == "L" and im.size == conversion.size else None
        with Image.open(io.BytesIO(image)) as im:
            image_ok = im.mode == "RGB" and im.size == conversion.size
    except OSError:
        return None
    if labels is None or not image_ok:
        return None
    counts = np.bincount(labels.ravel(), minlength=256)
    valid = counts[: conversion.label_set.num_classes].sum() + counts[conversion.label_set.ignore_index]
    return counts if valid == labels.size else None


def process_pair(pair: Pair, conversion: Conversion, *, redo: bool = False) -> Outcome:
    """Prepare one pair, or keep its outputs when they are newer than both inputs."""
    # No cv2.setNumThreads(1) here: in a forked worker it waits forever on the parent's
    # thread-pool state (seen in gdb: pthread_cond_destroy). OpenCV itself copes with fork.
    if not redo and _is_up_to_date(pair):
        counts = _existing_counts(pair, conversion)
        if counts is not None:
            return Outcome(False, counts, None)
    try:
        bgr = read_bgr(pair.image)
        classes = read_labels(pair.label, conversion.source, conversion.label_set)
        if bgr.shape[:2] != classes.shape:
            raise BadFile(
                f"{pair.image} is {bgr.shape[1]}x{bgr.shape[0]} but {pair.label} is "
                f"{classes.shape[1]}x{classes.shape[0]}; an image and its annotation must match"
            )
    except BadFile as e:
        return Outcome(False, None, str(e))
    small = np.ascontiguousarray(resize_image(bgr, conversion.size)[..., ::-1])  # BGR -> RGB at the small size
    labels = resize_labels(classes, conversion.size)
    # A pair counts as done only when both files exist and are newer than its inputs, so a
    # run stopped between these two writes redoes the pair.
    save_png(pair.out_label, labels)
    save_png(pair.out_image, small)
    return Outcome(True, np.bincount(labels.ravel(), minlength=256), None)


def _is_up_to_date(pair: Pair) -> bool:
    """Both outputs exist and are newer than both inputs. An input's change time (ctime)
    counts too: unzip and `cp -p` give new files an old mtime, never an old ctime."""
    try:
        done = min(pair.out_image.stat().st_mtime_ns, pair.out_label.stat().st_mtime_ns)
    except FileNotFoundError:
        return False
    inputs = [pair.image.stat(), pair.label.stat()]
    return done >= max(max(st.st_mtime_ns, st.st_ctime_ns) for st in inputs)


# --------------------------------------------------------------------------- the output folder


def _settings(size: tuple[int, int], source: str, label_set: LabelSet) -> dict[str, Any]:
    """What the outputs depend on besides the input files' contents and where they are
    (`sources.find` adds the raw folders, first)."""
    return {"size": list(size), "source": source, "label_set": label_set.to_dict()}


_FLAGS = {
    "layout": "layout",
    "data": "--data",
    "images": "--images",
    "masks": "--masks",
    "size": "--size",
    "source": "--source",
    "label_set": "label set",
}


def _differences(old: dict, new: dict) -> str:
    def show(key: str, settings: dict) -> str:
        value = settings.get(key)
        if key == "size" and value:
            return "x".join(map(str, value))
        if key == "layout":
            return str(value or "cityscapes")
        return (value or {}).get("name", "?") if key == "label_set" else str(value or "none")

    parts = [
        f"{flag} {show(k, old)} (now {show(k, new)}" + (", other content)" if show(k, old) == show(k, new) else ")")
        for k, flag in _FLAGS.items()
        if old.get(k) != new.get(k)
    ]
    return ", ".join(parts) or "an older urbanseg's settings"


def _kept_splits(previous: dict | None, requested: list[str]) -> dict[str, Any]:
    """The manifest entries of the splits an earlier run prepared and this one was not asked
    for (`--splits`): kept as they were. A split asked for but without pairs now is not kept:
    its outputs are stale like those of a removed pair."""
    return {s: e for s, e in (previous or {}).get("splits", {}).items() if s not in requested}


def _moved_pairs(out: Path, kept: dict[str, Any], splits: dict[str, list[Pair]], size: tuple[int, int]) -> list[str]:
    """Pairs of this run whose picture is in a kept split already ("stem (val -> train)").
    A stem alone does not prove it (paired folders may use 0001.png in train/ and val/ for
    two pictures): a pair whose stem is there too is resized as `process_pair` would and
    compared with the kept split's image. Only such pairs are read: usually none."""
    from PIL import Image

    now = {pair.stem: pair for pairs in splits.values() for pair in pairs}
    moved = []
    for old, entry in kept.items():
        for name in entry.get("files") or entry.get("stems", []):
            pair = now.get(Path(name).name)
            found = list((out / "images" / old).glob(f"*/{Path(name).name}.png")) if pair else []
            if not pair or len(found) != 1:
                continue
            try:
                with Image.open(found[0]) as im:
                    before = np.asarray(im.convert("RGB"))
                after = resize_image(read_bgr(pair.image), size)[..., ::-1]
            except (OSError, BadFile):  # unreadable: the header checks or the run name it
                continue
            if np.array_equal(before, after):
                moved.append(f"{pair.stem} ({old} -> {pair.split})")
    return moved


def _claim_out(
    out: Path, settings: dict, overwrite: bool, splits: dict[str, list[Pair]], requested: list[str]
) -> tuple[dict | None, bool]:
    """Check, writing nothing, that `out` may take outputs made with `settings`: a new
    or empty folder, or one `urbanseg prepare` wrote (`outputs.check_owner`) with the
    same settings, where no pair of this run is in a split kept as it was (`_kept_splits`;
    the pair would be in two splits: validation images in training). Returns (its previous
    manifest if still valid, whether its old outputs must be wiped)."""
    outputs.check_owner(out, "prepare")
    state = out / STATE_FILE
    if not state.is_file():
        return None, False
    try:
        old = json.loads(state.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{state} is unreadable ({e}); delete {out} and prepare again") from None
    if old != settings:
        if not overwrite:
            raise UserError(
                f"--out {out} was prepared with {_differences(old, settings)}; mixing settings in one "
                "folder is refused: prepare into another --out, or add --overwrite to delete its "
                "images/, labels/ and manifest.json and redo everything"
            )
        return None, True
    try:
        previous = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None, False  # an interrupted run: its finished pairs are kept and skipped
    moved = _moved_pairs(out, _kept_splits(previous, requested), splits, tuple(settings["size"]))
    if moved:
        more = f" and {len(moved) - 3} more" if len(moved) > 3 else ""
        raise UserError(
            f"--out {out}: {len(moved)} pair(s) of this run are in a split an earlier run prepared there and "
            f"this run leaves as it was: {', '.join(moved[:3])}{more}; a pair in two splits would put "
            "evaluation images into training: prepare those splits again in this run (add them to "
            "--splits, or leave --splits out), or prepare into a new --out"
        )
    return previous, False


def _wipe(out: Path) -> None:
    """Delete the outputs of other settings (only after every check has passed)."""
    (out / MANIFEST).unlink(missing_ok=True)
    for kind in ("images", "labels"):
        if (out / kind).is_dir():
            shutil.rmtree(out / kind)


def _stale_files(out: Path, split: str, pairs: list[Pair]) -> list[Path]:
    """Outputs of `split` that no raw pair produces any more, and temporary files left by
    a killed run (`util.atomic_path`'s)."""
    keep = {p for pair in pairs for p in (pair.out_image, pair.out_label)}
    found = [
        p
        for kind in ("images", "labels")
        for pattern in ("*/*.png", "*/" + util.temporary_glob())
        for p in (out / kind / split).glob(pattern)
    ]
    return sorted(p for p in found if p not in keep)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
        for folder in (path.parent, path.parent.parent):  # the city's, then the split's, once empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _split_entry(
    pairs: list[Pair], outcomes: list[Outcome], label_set: LabelSet, annotations: list[str] | None
) -> dict[str, Any]:
    counted = [o.counts for o in outcomes if o.counts is not None]  # (every outcome here succeeded)
    counts = np.sum(counted, axis=0) if counted else np.zeros(256, np.int64)
    entry = {
        "count": len(pairs),
        "stems": [p.stem for p in pairs],
        "files": [f"{p.city}/{p.stem}" for p in pairs],
        "pixel_counts": counts[: label_set.num_classes].tolist(),
        "ignored_pixels": int(counts[label_set.ignore_index]),
    }
    return entry if annotations is None else {**entry, "annotations": annotations}


def _report_errors(errors: list[str], total: int, *, before_writing: bool) -> UserError:
    shown = "\n  ".join(errors[:10]) + (f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else "")
    state = (
        "found before writing: nothing was written"
        if before_writing
        else f"nothing was written for them and there is no {MANIFEST}; the pairs that were prepared are kept "
        "and skipped by the next run"
    )
    return UserError(
        f"{len(errors)} of {total} pairs cannot be prepared ({state}). Fix these and run again:\n  {shown}"
    )


def _header_problem(pair: Pair, conversion: Conversion) -> tuple[str | None, tuple[str, ...]]:
    return header_problem(pair.image, pair.label, conversion.source, conversion.label_set)


def _check_headers(todo: list[Pair], total: int, conversion: Conversion, workers: int) -> None:
    """Every pair to write opens, fits its image and (polygon files) parses with known
    labels, before anything is written; the notes on what is not drawn are printed."""
    # Header reads take ~0.1 ms: worker processes only pay off for a large dataset.
    checks = (
        util.progress_map(
            functools.partial(_header_problem, conversion=conversion),
            todo,
            workers=workers if len(todo) > 500 else 1,
            desc="check",
        )
        if todo
        else []
    )
    bad = [problem for problem, _ in checks if problem]
    if bad:
        raise _report_errors(bad, total, before_writing=True)
    notes = [note for _, found in checks for note in found]
    if notes:
        more = f"\n  ... and {len(notes) - _NOTES} more" if len(notes) > _NOTES else ""
        print(
            f"urbanseg prepare: note: {len(notes)} things in the annotations are not drawn:\n  "
            + "\n  ".join(notes[:_NOTES])
            + more,
            file=sys.stderr,
        )


def _check_memory(config: PrepareConfig, pairs: list[Pair]) -> None:
    """Refuse, before any work, a size whose pairs cannot fit in memory (`memory.check_prepare`),
    judged at the first raw image's size (read from its header; an unreadable one is named
    by the header checks that follow)."""
    from PIL import Image

    try:
        with Image.open(pairs[0].image) as im:
            raw = im.size
    except OSError:
        return
    check_prepare_memory(config, raw, len(pairs))


def _check_label_set(config: PrepareConfig, label_set: LabelSet) -> None:
    if config.source in ("labelIds", "trainIds") and not label_set.from_cityscapes:
        fix = (
            "add --source color to read the *_gtFine_color.png annotations"
            if config.data is not None
            else "read colour masks with --source color, class indices with --source indices"
        )
        kind = "label ids" if config.source == "labelIds" else "training ids"
        raise UserError(
            f"label set {label_set.name!r} from {config.labels} defines colours only, not Cityscapes {kind}: {fix}"
        )


def prepare(config: PrepareConfig) -> int:
    """`urbanseg prepare`: resize every raw pair of the requested splits into config.out."""
    size, out = parse_size(config.size), Path(config.out)
    label_set = get_label_set(config.labels)
    _check_label_set(config, label_set)
    source = config.source or "labelIds"  # (resolved by PrepareConfig)
    found = find(config, out, _settings(size, source, label_set))
    splits, settings = found.splits, found.settings
    every = [pair for pairs in splits.values() for pair in pairs]
    _check_memory(config, every)
    _claim_out(
        out, settings, config.overwrite, splits, config.splits
    )  # fail fast; checked again under the folder's lock
    todo = every if config.overwrite else [p for p in every if not _is_up_to_date(p)]
    workers = config.workers or util.default_workers()
    conversion = Conversion(size, source, label_set)
    _check_headers(todo, len(every), conversion, workers)
    with outputs.claim(
        out, "prepare", check=lambda: _claim_out(out, settings, config.overwrite, splits, config.splits)
    ) as claimed:
        assert claimed is not None  # what the check= above returned
        previous, wipe = claimed
        # Every check passed: from here on files are written. No manifest while they change.
        if wipe:
            _wipe(out)
        gone = [s for s in config.splits if s not in splits]  # asked for, no pairs now: all stale
        stale = [f for split in [*splits, *gone] for f in _stale_files(out, split, splits.get(split, []))]
        if todo or stale:
            (out / MANIFEST).unlink(missing_ok=True)
        util.write_if_changed(out / STATE_FILE, json.dumps(settings, indent=1) + "\n")
        _save_config(config, out)
        outcomes = util.progress_map(
            functools.partial(process_pair, conversion=conversion, redo=config.overwrite),
            every,
            workers=workers,
            desc="prepare",
        )
        errors = [o.error for o in outcomes if o.error]
        written = sum(o.written for o in outcomes)
        if errors:
            raise _report_errors(errors, len(every), before_writing=False)
        _remove(stale)
        entries = {
            split: _split_entry(
                pairs,
                [o for o, p in zip(outcomes, every, strict=True) if p.split == split],
                label_set,
                found.annotations(split),
            )
            for split, pairs in splits.items()
        }
        _write_manifest(out, found, {**_kept_splits(previous, config.splits), **entries})
    counts = ", ".join(f"{s} {len(p)}" for s, p in splits.items())
    print(f"prepared {len(every)} pairs into {out} ({written} written, {len(every) - written} up to date): {counts}")
    return 0


def _write_manifest(out: Path, found: Found, splits: dict[str, Any]) -> None:
    """manifest.json (`urbanseg.data.formats.Manifest`) from what was found and the split
    entries (dicts shaped like `SplitEntry.to_dict()`), checked like any reader checks it.
    The Cityscapes layout's has no `layout` and `masks` (what it was before they existed)."""
    settings = found.settings
    pairs = {"layout": found.layout, "masks": found.masks} if found.layout != "cityscapes" else {}
    manifest = Manifest.parse(
        {
            "format_version": MANIFEST_VERSION,
            "urbanseg_version": __version__,
            "label_set": settings["label_set"],
            "size": settings["size"],
            "source": settings["source"],
            "data": found.data,
            **pairs,
            "splits": splits,
        },
        out / MANIFEST,
    )
    util.write_if_changed(out / MANIFEST, manifest.to_json())


def _save_config(config: PrepareConfig, out: Path) -> None:
    """prepare_config.yaml: the resolved command of the latest run (kept if identical)."""
    import yaml

    util.write_if_changed(out / "prepare_config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))

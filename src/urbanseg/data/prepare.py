"""`urbanseg prepare`: a raw Cityscapes-layout dataset -> resized image/label pairs.

In:  ``<data>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and
     ``<data>/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`` (or ``_gtFine_color.png``).
Out: ``<out>/images/<split>/<city>/<stem>.png``  RGB uint8 (H, W, 3), anti-aliased resize;
     ``<out>/labels/<split>/<city>/<stem>.png``  uint8 (H, W) class index, 255 = ignore,
     nearest-neighbour resize; ``<out>/manifest.json`` (written last: it exists only when
     every pair is in place); ``<out>/prepare_config.yaml`` (the resolved command).

Every file is written to a temporary name and renamed, so an interrupted run leaves
only complete files, and a re-run skips the pairs whose outputs are newer than both
inputs. The settings that change the outputs (data folder, size, source, label set) are
recorded in ``<out>/.urbanseg-prepare.json`` before the first write: a re-run with other settings is
refused (mixing two settings in one folder would be silent corruption, and deleting a
long preparation behind the user's back is worse) unless ``--overwrite`` is given.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from urbanseg import __version__, outputs, util
from urbanseg.config import PrepareConfig, parse_size, to_dict
from urbanseg.data.formats import MANIFEST_VERSION, Manifest
from urbanseg.errors import UserError
from urbanseg.imaging import resize_image, resize_labels, save_png
from urbanseg.labels import LabelSet, get_label_set
from urbanseg.memory import check_prepare as check_prepare_memory

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = {"labelIds": "_gtFine_labelIds.png", "color": "_gtFine_color.png"}
STATE_FILE = ".urbanseg-prepare.json"
MANIFEST = "manifest.json"  # `urbanseg.data.formats.Manifest`
_SHOW = 5  # offending names listed in an error message


@dataclass(frozen=True)
class Pair:
    """One raw image/annotation pair and where its prepared files go."""

    split: str
    city: str
    stem: str
    image: Path
    label: Path
    out_image: Path
    out_label: Path


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


class BadFile(ValueError):
    """A raw file that cannot be prepared; the message names it and the fix."""


# --------------------------------------------------------------------------- per image


def _decode_error(path: Path) -> str:
    """Why a file could not be decoded, in PIL's words (OpenCV only returns None)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "OpenCV cannot decode it"


def read_bgr(path: Path) -> np.ndarray:
    """A raw image file -> (H, W, 3) uint8 BGR (grey, palette and RGBA are converted)."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # as fast as PIL (bench_prepare.py), any PNG mode
    if bgr is None:
        raise BadFile(f"{path}: unreadable ({_decode_error(path)}); re-extract or re-download it")
    return bgr


def _read_ids(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise BadFile(
                    f"{path}: mode {im.mode} is not an 8-bit single-channel label-id image; "
                    "for RGB colour annotations use --source color"
                )
            return np.asarray(im)
    except OSError as e:
        raise BadFile(f"{path}: unreadable ({type(e).__name__}: {e}); re-extract or re-download it") from None


def read_labels(path: Path, source: str, label_set: LabelSet) -> np.ndarray:
    """A raw annotation -> (H, W) uint8 class indices of `label_set` (255 ignore).

    Every pixel is mapped (and so checked) at full size: an unknown id or colour is an
    error wherever it is. The mapping is a per-pixel lookup, so mapping before the
    nearest-neighbour resize gives the same result as mapping after it."""
    try:
        if source == "labelIds":
            return label_set.labels_from_ids(_read_ids(path))
        return label_set.labels_from_colors(read_bgr(path), bgr=True)
    except BadFile:
        raise
    except ValueError as e:
        fix = (
            "is it a Cityscapes *_labelIds.png (not trainIds or instanceIds)?"
            if source == "labelIds"
            else "add them to your labelmap.json, or re-export the annotation without anti-aliasing/JPEG blending"
        )
        raise BadFile(f"{path}: {e}; {fix}") from None


def _existing_counts(pair: Pair, conversion: Conversion) -> np.ndarray | None:
    """Histogram of an existing, valid output label, or None if it must be redone."""
    from PIL import Image

    try:
        with Image.open(pair.out_label) as im:
            labels = np.asarray(im) if im.mode == "L" and im.size == conversion.size else None
        with Image.open(pair.out_image) as im:
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


def _header_problem(pair: Pair, source: str) -> str | None:
    """Cheap check before anything is written: both files open, sizes and modes fit."""
    from PIL import Image

    found = []
    for path in (pair.image, pair.label):
        try:
            with Image.open(path) as im:
                found.append((im.size, im.mode))
        except OSError as e:  # UnidentifiedImageError is an OSError
            return f"{path}: unreadable ({type(e).__name__}: {e}); re-extract or re-download it"
    (image_size, _), (label_size, mode) = found
    if source == "labelIds" and mode not in ("L", "P"):
        return (
            f"{pair.label}: mode {mode} is not an 8-bit single-channel label-id image; for RGB colour "
            "annotations use --source color"
        )
    if image_size != label_size:
        return (
            f"{pair.image} is {image_size[0]}x{image_size[1]} but {pair.label} is "
            f"{label_size[0]}x{label_size[1]}; an image and its annotation must have the same size"
        )
    return None


# --------------------------------------------------------------------------- the dataset


def _check_data(data: Path) -> None:
    if not data.is_dir():
        raise UserError(
            f"--data {data} is not a folder; point it at the folder holding leftImg8bit/ and gtFine/ "
            "(unzip leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip there, or run "
            f"`urbanseg synth --out {data}`)"
        )
    missing = [d for d in ("leftImg8bit", "gtFine") if not (data / d).is_dir()]
    if missing:
        nested = sorted(str(p.parent) for p in data.glob("*/leftImg8bit") if (p.parent / "gtFine").is_dir())
        hint = f"; did you mean --data {nested[0]}?" if nested else ""
        found = sorted(p.name for p in data.iterdir())[:8]
        raise UserError(
            f"--data {data} has no {' or '.join(m + '/' for m in missing)} folder (it holds {found}); "
            f"expected the Cityscapes layout leftImg8bit/<split>/<city>/ and gtFine/<split>/<city>/{hint}"
        )


def _names(folder: Path, suffix: str) -> dict[tuple[str, str], Path]:
    """{(city, stem): path} of <folder>/<city>/<stem><suffix>."""
    return {(p.parent.name, p.name[: -len(suffix)]): p for p in folder.glob(f"*/*{suffix}")}


def _unpaired(what: str, keys: set, folder: Path, suffix: str) -> str:
    shown = ", ".join(f"{city}/{stem}" for city, stem in sorted(keys)[:_SHOW])
    return f"{len(keys)} {what} have no {folder}/<city>/<stem>{suffix} (e.g. {shown})"


def find_pairs(data: Path, out: Path, split: str, source: str) -> tuple[list[Pair] | None, list[str]]:
    """The pairs of one split, sorted by (city, stem), and the pairing problems found.
    None when the split exists in neither leftImg8bit/ nor gtFine/."""
    image_dir, label_dir = data / "leftImg8bit" / split, data / "gtFine" / split
    if not image_dir.is_dir() and not label_dir.is_dir():
        return None, []
    suffix = LABEL_SUFFIX[source]
    images, labels = _names(image_dir, IMAGE_SUFFIX), _names(label_dir, suffix)
    if not images:
        return [], [
            (
                f"split {split!r} has no images: nothing matches {image_dir}/<city>/<stem>{IMAGE_SUFFIX}; "
                "add the images or leave the split out with --splits"
            )
        ]
    problems = []
    if images.keys() - labels.keys():
        other = "color" if source == "labelIds" else "labelIds"
        hint = (
            f" (only *{LABEL_SUFFIX[other]} were found: use --source {other})"
            if not labels and any(label_dir.glob(f"*/*{LABEL_SUFFIX[other]}"))
            else ""
        )
        problems.append(_unpaired("images", images.keys() - labels.keys(), label_dir, suffix) + hint)
    if labels.keys() - images.keys():
        problems.append(_unpaired("annotations", labels.keys() - images.keys(), image_dir, IMAGE_SUFFIX))
    cities: dict[str, str] = {}
    for city, stem in sorted(images.keys() & labels.keys()):
        if cities.setdefault(stem, city) != city:
            problems.append(
                f"stem {stem!r} of split {split!r} is in two cities ({cities[stem]}, {city}); "
                "stems must be unique within a split"
            )
    pairs = [
        Pair(
            split,
            c,
            s,
            images[c, s],
            labels[c, s],
            out / "images" / split / c / f"{s}.png",
            out / "labels" / split / c / f"{s}.png",
        )
        for c, s in sorted(images.keys() & labels.keys())
    ]
    return pairs, problems


def _settings(data: Path, size: tuple[int, int], source: str, label_set: LabelSet) -> dict[str, Any]:
    """Everything the outputs depend on besides the input files' contents."""
    return {"data": str(data.resolve()), "size": list(size), "source": source, "label_set": label_set.to_dict()}


def _differences(old: dict, new: dict) -> str:
    def show(key: str, settings: dict) -> str:
        value = settings.get(key)
        if key == "size" and value:
            return "x".join(map(str, value))
        return (value or {}).get("name", "?") if key == "label_set" else str(value)

    flags = {"data": "--data", "size": "--size", "source": "--source", "label_set": "label set"}
    parts = [
        f"{flag} {show(k, old)} (now {show(k, new)}" + (", other content)" if show(k, old) == show(k, new) else ")")
        for k, flag in flags.items()
        if old.get(k) != new[k]
    ]
    return ", ".join(parts) or "an older urbanseg's settings"


def _claim_out(out: Path, settings: dict, overwrite: bool) -> tuple[dict | None, bool]:
    """Check, writing nothing, that `out` may take outputs made with `settings`: a new
    or empty folder, or one `urbanseg prepare` wrote (`outputs.check_owner`) with the
    same settings. Returns (its previous manifest if still valid, whether its old
    outputs must be wiped)."""
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
        return json.loads((out / MANIFEST).read_text()), False
    except (OSError, json.JSONDecodeError):
        return None, False  # an interrupted run: its finished pairs are kept and skipped


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
        if path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()


def _split_entry(pairs: list[Pair], outcomes: list[Outcome], label_set: LabelSet) -> dict[str, Any]:
    counted = [o.counts for o in outcomes if o.counts is not None]  # (every outcome here succeeded)
    counts = np.sum(counted, axis=0) if counted else np.zeros(256, np.int64)
    return {
        "count": len(pairs),
        "stems": [p.stem for p in pairs],
        "files": [f"{p.city}/{p.stem}" for p in pairs],
        "pixel_counts": counts[: label_set.num_classes].tolist(),
        "ignored_pixels": int(counts[label_set.ignore_index]),
    }


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


def _find_splits(config: PrepareConfig, data: Path, out: Path) -> dict[str, list[Pair]]:
    """{split: pairs} of the requested splits that exist; UserError listing every pairing
    problem of every split."""
    _check_data(data)
    splits: dict[str, list[Pair]] = {}
    problems: list[str] = []
    for split in config.splits:
        pairs, found = find_pairs(data, out, split, config.source)
        problems += found
        if pairs is None:
            print(
                f"urbanseg prepare: skipping split {split!r}: {data}/leftImg8bit/{split} does not exist",
                file=sys.stderr,
            )
        else:
            splits[split] = pairs
    if problems:
        raise UserError(f"{data} is not a consistent Cityscapes layout:\n  " + "\n  ".join(problems))
    if not splits:
        raise UserError(
            f"none of the splits {list(config.splits)} exist under {data}/leftImg8bit/; "
            f"it holds {sorted(p.name for p in (data / 'leftImg8bit').iterdir())}: choose them with --splits"
        )
    return splits


def _check_headers(todo: list[Pair], total: int, source: str, workers: int) -> None:
    # Header reads take ~0.1 ms: worker processes only pay off for a large dataset.
    checks = (
        util.progress_map(
            functools.partial(_header_problem, source=source),
            todo,
            workers=workers if len(todo) > 500 else 1,
            desc="check",
        )
        if todo
        else []
    )
    bad = [c for c in checks if c]
    if bad:
        raise _report_errors(bad, total, before_writing=True)


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


def prepare(config: PrepareConfig) -> int:
    """`urbanseg prepare`: resize every raw pair of the requested splits into config.out."""
    size, out, data = parse_size(config.size), Path(config.out), Path(config.data)
    label_set = get_label_set(config.labels)
    if config.source == "labelIds" and not label_set.from_cityscapes:
        raise UserError(
            f"label set {label_set.name!r} from {config.labels} defines colours only, not Cityscapes "
            "label ids: add --source color to read the *_gtFine_color.png annotations"
        )
    splits = _find_splits(config, data, out)
    _check_memory(config, [pair for pairs in splits.values() for pair in pairs])
    settings = _settings(data, size, config.source, label_set)
    _claim_out(out, settings, config.overwrite)  # fail fast; checked again under the folder's lock
    every = [pair for pairs in splits.values() for pair in pairs]
    todo = every if config.overwrite else [p for p in every if not _is_up_to_date(p)]
    workers = config.workers or util.default_workers()
    _check_headers(todo, len(every), config.source, workers)
    with outputs.claim(out, "prepare", check=lambda: _claim_out(out, settings, config.overwrite)) as claimed:
        assert claimed is not None  # what the check= above returned
        previous, wipe = claimed
        # Every check passed: from here on files are written. No manifest while they change.
        if wipe:
            _wipe(out)
        stale = [f for split, pairs in splits.items() for f in _stale_files(out, split, pairs)]
        if todo or stale:
            (out / MANIFEST).unlink(missing_ok=True)
        util.write_if_changed(out / STATE_FILE, json.dumps(settings, indent=1) + "\n")
        _save_config(config, out)
        conversion = Conversion(size, config.source, label_set)
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
            split: _split_entry(pairs, [o for o, p in zip(outcomes, every, strict=True) if p.split == split], label_set)
            for split, pairs in splits.items()
        }
        _write_manifest(out, settings, str(data.resolve()), {**(previous or {}).get("splits", {}), **entries})
    counts = ", ".join(f"{s} {len(p)}" for s, p in splits.items())
    print(f"prepared {len(every)} pairs into {out} ({written} written, {len(every) - written} up to date): {counts}")
    return 0


def _write_manifest(out: Path, settings: dict, data: str, splits: dict[str, Any]) -> None:
    """manifest.json (`urbanseg.data.formats.Manifest`) from the settings and the split
    entries (dicts shaped like `SplitEntry.to_dict()`), checked like any reader checks it."""

    manifest = Manifest.parse(
        {
            "format_version": MANIFEST_VERSION,
            "urbanseg_version": __version__,
            "label_set": settings["label_set"],
            "size": settings["size"],
            "source": settings["source"],
            "data": data,
            "splits": splits,
        },
        out / MANIFEST,
    )
    util.write_if_changed(out / MANIFEST, manifest.to_json())


def _save_config(config: PrepareConfig, out: Path) -> None:
    """prepare_config.yaml: the resolved command of the latest run (kept if identical)."""
    import yaml

    util.write_if_changed(out / "prepare_config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))

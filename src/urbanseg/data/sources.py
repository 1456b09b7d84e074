"""Where `urbanseg prepare` finds its raw image/annotation pairs, one function per layout,
and which split each pair goes to.

- Cityscapes layout (``--data``): ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``
  with ``gtFine/<split>/<city>/<stem>_gtFine_<kind>`` (`LABEL_SUFFIX`).
- Paired folders (``--images``, ``--masks``): files matched by stem at any depth, the
  image and annotation endings configurable. Splits come from split sub-folders
  (``train/``, ``val/``, ``test/``; ``training/``, ``validation/``, ``testing/`` too) or
  from `urbanseg.data.splits` (list files, ``--splits NAME``, ``--val-fraction``). Prepared files go to
  ``<out>/{images,labels}/<split>/<group>/<stem>.png``: the group is the first folder
  below the split folder (the city in Cityscapes), ``all`` for files right in it.

Every problem is collected and raised as one UserError listing them all, before anything
is written. Which split a pair of paired folders goes to: `urbanseg.data.splits`.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from urbanseg.config import PrepareConfig
from urbanseg.data.annotations import JSON_SOURCES
from urbanseg.data.formats import Manifest
from urbanseg.data.splits import Candidate, assign_splits, file_ending
from urbanseg.errors import UserError
from urbanseg.imaging import IMAGE_SUFFIXES

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = {
    "labelIds": "_gtFine_labelIds.png",
    "color": "_gtFine_color.png",
    "trainIds": "_gtFine_labelTrainIds.png",  # what cityscapesscripts' createTrainIdLabelImgs writes
    "polygons": "_gtFine_polygons.json",
}
SPLIT_FOLDERS = {"training": "train", "validation": "val", "testing": "test"}  # other datasets' names
FLAT_GROUP = "all"  # the group of files right in a split (or in a folder without splits)
_SHOW = 5  # offending names listed in an error message


@dataclass(frozen=True)
class Pair:
    """One raw image/annotation pair and where its prepared files go."""

    split: str
    city: str  # the group folder: the Cityscapes city, or the first folder below the split
    stem: str
    image: Path
    label: Path
    out_image: Path
    out_label: Path


@dataclass(frozen=True)
class Found:
    """The pairs of the requested splits that exist, by split, and what the outputs depend
    on besides the files' contents (`settings`, recorded by prepare); `data` is the raw
    folder the manifest names, `masks` the annotation folder of paired folders (whose
    manifest also lists each pair's annotation, relative to it: `annotations`)."""

    layout: str  # "cityscapes" or "pairs"
    splits: dict[str, list[Pair]]
    settings: dict[str, Any]
    data: str
    masks: str | None = None

    def annotations(self, split: str) -> list[str] | None:
        if self.masks is None:
            return None
        return [p.label.relative_to(self.masks).as_posix() for p in self.splits[split]]


def find(config: PrepareConfig, out: Path, settings: dict[str, Any]) -> Found:
    """The pairs `config` asks for (`settings`: size and label set, completed here with the
    layout's folders and source). UserError listing every problem found."""
    if config.data is not None:
        data = Path(config.data)
        splits = _find_splits(config, data, out)
        resolved = str(data.resolve())
        return Found("cityscapes", splits, {"data": resolved, **settings}, resolved)
    images = Path(config.images or ".")
    masks = Path(config.masks) if config.masks is not None else images
    splits = _paired_splits(config, images, masks, out)
    settings = {"layout": "pairs", "images": str(images.resolve()), "masks": str(masks.resolve()), **settings}
    return Found("pairs", splits, settings, str(images.resolve()), str(masks.resolve()))


# --------------------------------------------------------------------------- Cityscapes


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
        hint = (
            f"; did you mean --data {nested[0]}?"
            if nested
            else "; for images and annotations in folders of your own use --images DIR --masks DIR"
        )
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


def _other_sources_hint(label_dir: Path, source: str) -> str:
    """ " (only *_gtFine_color.png were found: use --source color)" when other kinds are there."""
    others = [k for k, suffix in LABEL_SUFFIX.items() if k != source and any(label_dir.glob(f"*/*{suffix}"))]
    if not others:
        return ""
    found = ", ".join(f"*{LABEL_SUFFIX[k]}" for k in others)
    return f" (only {found} were found: use {' or '.join(f'--source {k}' for k in others)})"


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
        hint = _other_sources_hint(label_dir, source) if not labels else ""
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
        Pair(split, c, s, images[c, s], labels[c, s], *_outputs(out, split, c, s))
        for c, s in sorted(images.keys() & labels.keys())
    ]
    return pairs, problems


def _outputs(out: Path, split: str, group: str, stem: str) -> tuple[Path, Path]:
    return out / "images" / split / group / f"{stem}.png", out / "labels" / split / group / f"{stem}.png"


def _find_splits(config: PrepareConfig, data: Path, out: Path) -> dict[str, list[Pair]]:
    """{split: pairs} of the requested splits that exist; UserError listing every pairing
    problem of every split."""
    _check_data(data)
    splits: dict[str, list[Pair]] = {}
    problems: list[str] = []
    for split in config.splits:
        pairs, found = find_pairs(data, out, split, config.source or "labelIds")
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


# --------------------------------------------------------------------------- paired folders


@dataclass(frozen=True)
class RawFile:
    """A file found under --images or --masks: its stem, the split its folder names (None
    outside split folders) and its group (the first folder below the split)."""

    path: Path
    rel: str
    stem: str
    split: str | None
    group: str


def scan(root: Path, suffixes: list[str], split_names: set[str], skip: set[Path]) -> list[RawFile]:
    """Every file under `root` (any depth, hidden files and folders left out, nothing
    under the folders of `skip`) whose name ends with one of `suffixes`, sorted by path."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or any(path.is_relative_to(s) for s in skip):
            continue
        suffix = file_ending(path.name, suffixes)
        if suffix is None or not path.is_file():
            continue
        folders = rel.parts[:-1]
        split = SPLIT_FOLDERS.get(folders[0], folders[0]) if folders else None
        if split not in split_names:
            split = None
        below = folders[1:] if split is not None else folders
        found.append(RawFile(path, rel.as_posix(), path.name[: -len(suffix)], split, below[0] if below else FLAT_GROUP))
    return found


def _examples(files: list[RawFile]) -> str:
    return ", ".join(f.rel for f in files[:_SHOW])


def _index(files: list[RawFile], by_split: bool, flag: str, problems: list[str]) -> dict[tuple, RawFile]:
    """{(split or None, stem): file}; a key found twice is a problem naming both files."""
    index: dict[tuple, RawFile] = {}
    for f in files:
        key = (f.split if by_split else None, f.stem)
        if key in index:
            within = (f" within split {f.split!r}" if f.split else " outside the split folders") if by_split else ""
            problems.append(
                f"stem {f.stem!r} is in {flag} twice ({index[key].rel}, {f.rel}); stems must be unique{within}"
            )
        index.setdefault(key, f)
    return index


def _match(images: list[RawFile], masks: list[RawFile], config: PrepareConfig, problems: list[str]) -> list:
    """[(image, mask)] matched by stem (and split folder, when both sides have them)."""
    by_split = not config.split_file and any(f.split for f in images) and any(f.split for f in masks)
    image_index = _index(images, by_split, "--images", problems)
    mask_index = _index(masks, by_split, "--masks", problems)
    lonely_images = [f for k, f in image_index.items() if k not in mask_index]
    lonely_masks = [f for k, f in mask_index.items() if k not in image_index]
    mask_suffix = _mask_suffix(config)
    if lonely_images:
        problems.append(
            f"{len(lonely_images)} images have no annotation <stem>{mask_suffix} in --masks "
            f"{config.masks or config.images} (e.g. {_examples(lonely_images)}); add them, or set the "
            "annotation ending with --mask-suffix"
        )
    if lonely_masks:
        problems.append(
            f"{len(lonely_masks)} annotations have no image of the same stem in --images {config.images} "
            f"(e.g. {_examples(lonely_masks)}); add them, or set the image endings with --image-suffix"
        )
    return [(image_index[k], mask_index[k]) for k in image_index if k in mask_index]


def _mask_suffix(config: PrepareConfig) -> str:
    if config.mask_suffix is not None:
        return config.mask_suffix
    return ".json" if config.source in JSON_SOURCES else ".png"


def _scan_both(config: PrepareConfig, images: Path, masks: Path, out: Path) -> tuple[list, list]:
    for flag, folder in (("--images", images), ("--masks", masks)):
        if not folder.is_dir():
            raise UserError(f"{flag} {folder} is not a folder")
    mask_suffix = _mask_suffix(config)
    image_suffixes = list(config.image_suffix) or sorted(IMAGE_SUFFIXES)
    if images.resolve() == masks.resolve() and mask_suffix.lower() in (s.lower() for s in image_suffixes):
        raise UserError(
            f"--images and --masks are the same folder and {mask_suffix} files would be both: give the "
            "annotations their own ending (e.g. --mask-suffix _mask.png) or their own folder"
        )
    names = set(config.splits) | set(SPLIT_FOLDERS.values())
    skip = {out.resolve()}
    found_masks = scan(masks.resolve(), [mask_suffix], names, skip)
    mask_paths = {f.path for f in found_masks}
    found_images = [f for f in scan(images.resolve(), image_suffixes, names, skip) if f.path not in mask_paths]
    # Split folders not asked for are left alone (BDD100K's test/ has images, no masks).
    wanted = set(config.splits)
    found_images = [f for f in found_images if f.split is None or f.split in wanted]
    found_masks = [f for f in found_masks if f.split is None or f.split in wanted]
    if not found_images:
        raise UserError(
            f"--images {images} holds no image files (endings {', '.join(image_suffixes)}, at any depth); "
            "check the folder or give the endings with --image-suffix"
        )
    return found_images, found_masks


def _paired_splits(config: PrepareConfig, images: Path, masks: Path, out: Path) -> dict[str, list[Pair]]:
    """{split: pairs sorted by (group, stem)} of paired folders; UserError listing every problem."""
    found_images, found_masks = _scan_both(config, images, masks, out)
    problems: list[str] = []
    matched = _match(found_images, found_masks, config, problems)
    candidates = [Candidate(image.rel, image.stem, image.split or mask.split) for image, mask in matched]
    suffixes = [*(list(config.image_suffix) or sorted(IMAGE_SUFFIXES)), _mask_suffix(config)]
    split_of = assign_splits(config, candidates, f"--images {images}", suffixes, problems)
    if problems:
        raise UserError(f"--images {images} and --masks {masks} do not pair up:\n  " + "\n  ".join(problems))
    splits: dict[str, list[Pair]] = defaultdict(list)
    for image, mask in matched:
        split = split_of.get(image.rel)
        if split is not None:
            outputs = _outputs(out, split, image.group, image.stem)
            splits[split].append(Pair(split, image.group, image.stem, image.path, mask.path, *outputs))
    present = {s: sorted(splits[s], key=lambda p: (p.city, p.stem)) for s in config.splits if splits.get(s)}
    for split in config.splits:
        if split not in present:
            print(f"urbanseg prepare: skipping split {split!r}: no pairs in {images}", file=sys.stderr)
    if not present:
        raise UserError(
            f"none of the splits {list(config.splits)} has pairs in --images {images}; "
            f"found splits: {sorted(set(split_of.values())) or 'none'}: choose them with --splits"
        )
    return present


# --------------------------------------------------------------------------- evaluate --full-res


def raw_annotations(manifest: Manifest, split: str) -> tuple[Path, dict[str, Path]] | None:
    """(folder, {stem: raw annotation file}) of a prepared split whose annotations
    `evaluate --full-res` cannot find as Cityscapes' ``*_gtFine_labelIds.png`` (or
    ``_color.png``): those of paired folders (the manifest lists them) and the Cityscapes
    layout's trainIds and polygons files. None for the Cityscapes layout's labelIds and
    color (evaluate finds those under gtFine/ itself) and for a split not in the manifest."""
    entry = manifest.splits.get(split)
    if entry is None:
        return None
    if manifest.layout == "pairs" and manifest.masks is not None and entry.annotations is not None:
        root = Path(manifest.masks)
        return root, {stem: root / rel for stem, rel in zip(entry.stems, entry.annotations, strict=True)}
    if manifest.source in ("trainIds", "polygons") and manifest.data is not None:
        root, suffix = Path(manifest.data) / "gtFine" / split, LABEL_SUFFIX[manifest.source]
        return root, {Path(f).name: root / f"{f}{suffix}" for f in entry.entries if "/" in f}
    return None

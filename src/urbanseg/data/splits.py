"""Which split each pair of paired folders goes to (`urbanseg prepare --images`), in this
order: the lists of ``--split-file``; else the split folder the image or its annotation is
in (`urbanseg.data.sources` finds it); else, for folders without split folders, the one
split of ``--splits NAME``. Then ``--val-fraction`` moves a seeded share of train to val.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from urbanseg.config import PrepareConfig
from urbanseg.errors import UserError

_SHOW = 5  # offending names listed in an error message


class Candidate(NamedTuple):
    """A matched pair as the split rules see it: the image's path below --images (unique),
    its stem, and the split its folders name (None outside split folders)."""

    rel: str
    stem: str
    folder: str | None


def file_ending(name: str, suffixes: list[str]) -> str | None:
    """The longest of `suffixes` `name` ends with (case-insensitive), leaving a stem."""
    lower = name.lower()
    hits = [s for s in suffixes if lower.endswith(s.lower()) and len(name) > len(s)]
    return max(hits, key=len) if hits else None


def assign_splits(
    config: PrepareConfig, pairs: list[Candidate], images: str, suffixes: list[str], problems: list[str]
) -> dict[str, str]:
    """{pair's `rel`: split} of every pair whose split is known (pairs of splits not asked
    for are left out by the caller); the problems found are appended. `images` names the
    images folder in messages, `suffixes` are the endings a list entry may carry."""
    if config.split_file:
        listed = _listed_splits(config, {p.stem for p in pairs}, suffixes, problems)
        split_of = {p.rel: listed[p.stem] for p in pairs if p.stem in listed}
    elif any(p.folder for p in pairs):
        split_of = {p.rel: p.folder for p in pairs if p.folder}
        strays = [p.rel for p in pairs if not p.folder]
        if strays:
            problems.append(
                f"{len(strays)} images are outside the split folders ({', '.join(sorted(set(split_of.values())))}/) "
                f"of {images} (e.g. {', '.join(strays[:_SHOW])}); move them into one, or list the splits "
                "with --split-file"
            )
    elif len(config.splits) == 1 or config.val_fraction > 0:
        only = config.splits[0] if len(config.splits) == 1 else "train"
        split_of = {p.rel: only for p in pairs}
    else:
        problems.append(
            f"{images} has no split sub-folders (train/, val/, test/); say which pair goes where "
            "with --val-fraction 0.2 (a seeded random val split), --split-file train.txt val.txt, or "
            "--splits NAME to prepare every pair as that one split"
        )
        return {}
    if config.val_fraction > 0:
        _carve_val(config, split_of, {p.rel: p.stem for p in pairs}, problems)
    return split_of


def _carve_val(config: PrepareConfig, split_of: dict[str, str], stems: dict[str, str], problems: list[str]) -> None:
    """Move round(fraction * n) of the n train stems to val: those whose hash of (seed,
    stem) ranks lowest, so the choice does not depend on the file order or system, and
    adding files moves few others."""
    if "train" not in config.splits or "val" not in config.splits:
        problems.append("--val-fraction moves train pairs to val: --splits must include train and val")
        return
    if any(s == "val" for s in split_of.values()):
        problems.append(
            "--val-fraction: split 'val' already has pairs (from its sub-folder or list); drop --val-fraction"
        )
        return
    train = [rel for rel, split in split_of.items() if split == "train"]
    if len(train) < 2:
        problems.append(f"--val-fraction needs at least 2 train pairs to split; found {len(train)}")
        return
    count = min(max(1, round(config.val_fraction * len(train))), len(train) - 1)
    rank = sorted(train, key=lambda rel: (hashlib.sha256(f"{config.seed}/{stems[rel]}".encode()).hexdigest(), rel))
    for rel in rank[:count]:
        split_of[rel] = "val"


def _list_entries(path: Path) -> dict[str, list[str]]:
    """{split: entries} of one --split-file: a text file (split = its name without the
    extension; one entry a line, its first column; blank lines and # comments skipped) or
    a .json/.yaml mapping split -> list of entries."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--split-file {path}: cannot read it ({type(e).__name__}: {e})") from None
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        lines = [line.strip() for line in text.splitlines()]
        return {path.stem: [line.split()[0] for line in lines if line and not line.startswith("#")]}
    try:
        if path.suffix.lower() == ".json":
            value = json.loads(text)
        else:
            import yaml

            value = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise UserError(f"--split-file {path}: cannot parse it ({type(e).__name__}: {e})") from None
    ok = isinstance(value, dict) and all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in value.values()
    )
    if not ok:
        raise UserError(
            f'--split-file {path}: expected a mapping of split -> list of names, e.g. {{"train": ["a", "b"]}}'
        )
    return {str(k): v for k, v in value.items()}


def _entry_stem(entry: str, stems: set[str], suffixes: list[str]) -> str:
    """A list entry ("stem", "x/y/stem.jpg") -> the stem it names."""
    name = entry.replace("\\", "/").rsplit("/", 1)[-1]
    if name in stems:
        return name
    suffix = file_ending(name, suffixes)
    return name[: -len(suffix)] if suffix else name


def _listed_splits(config: PrepareConfig, stems: set[str], suffixes: list[str], problems: list[str]) -> dict[str, str]:
    """{stem: split} from the --split-file lists."""
    split_of: dict[str, str] = {}
    missing: dict[str, list[str]] = defaultdict(list)
    for path in config.split_file:
        for split, entries in _list_entries(Path(path)).items():
            for entry in entries:
                stem = _entry_stem(entry, stems, suffixes)
                if stem not in stems:
                    missing[split].append(entry)
                elif split_of.setdefault(stem, split) != split:
                    problems.append(f"{stem!r} is listed in two splits ({split_of[stem]}, {split}); list it once")
    for split, entries in missing.items():
        problems.append(
            f"{len(entries)} names listed for split {split!r} have no image/annotation pair "
            f"(e.g. {', '.join(entries[:_SHOW])})"
        )
    unlisted = len(stems - split_of.keys())
    if unlisted:
        print(f"urbanseg prepare: {unlisted} pairs are in no --split-file and are left out", file=sys.stderr)
    return split_of

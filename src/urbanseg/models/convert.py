"""`urbanseg import`: a pretrained model -> a self-describing urbanseg checkpoint; and
`resolve_model_checkpoint`, the one place where a command's checkpoint argument (predict,
evaluate, export --checkpoint; train --init) may name a pretrained source: it is
converted on first use (`resolve_pretrained`) and the converted checkpoint's path used.

A source is an smp hub id (`smp-hub/segformer-b0-512x1024-city-160k`), `hf:<id>` for a
transformers model, or a local folder written by `save_pretrained` (either library).
A hub model downloads into the usual Hugging Face cache; its conversion is kept in
`$HF_HOME/urbanseg/<source>/model.pt` (HF_HOME defaults to ~/.cache/huggingface) and
reused while the hub's revision (or, for a folder, its files) is the one it was made
from; offline, the conversion on disk is used as it is.

The checkpoint is the usual payload (`urbanseg.checkpoint`) plus
    source      {"id", "library", "revision", "converter", "repo_id" | "folder", and for a
                 model of the table: architecture, card, crop, licence, licence_url,
                 licence_summary, non_commercial}
    inference   {"mode": "whole" | "slide", "size": [W, H], "stride": [W, H] (slide)}
with `metrics` = the published mIoU ({"miou": 0.7654, "miou_source": url}) or {}.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from urbanseg.config import ImportConfig, parse_size
from urbanseg.errors import UserError
from urbanseg.labels import LabelSet, get_label_set
from urbanseg.models.hub import Snapshot, fetch_snapshot, hf_home, hub_info, is_repo_id
from urbanseg.models.pretrained import (
    PretrainedModel,
    Protocol,
    find_pretrained,
    source_facts,
)
from urbanseg.models.readers import Library, Loaded, detect_library, read_folder

# Bumped when a conversion would come out differently: older cached ones are redone.
CONVERTER_VERSION = 1
_PROBE = 64  # side of the test picture every conversion is run on


@dataclass(frozen=True)
class Source:
    """A parsed SOURCE: a hub repository (`repo_id`) or a local folder, and its library."""

    text: str
    library: Library
    repo_id: str | None = None
    folder: Path | None = None


def parse_source(text: str) -> Source:
    """'hf:<id>' -> transformers on the hub; an existing folder -> local (library from
    its config.json); 'owner/name' -> smp on the hub."""
    text = text.strip()
    if text.startswith("hf:"):
        repo = text[3:]
        if not is_repo_id(repo):
            raise UserError(
                f"{text!r}: after hf: give a hub id like hf:nvidia/segformer-b0-finetuned-cityscapes-1024-1024"
            )
        return Source(text, "transformers", repo_id=repo)
    path = Path(text).expanduser()
    if path.is_dir():
        return Source(text, detect_library(path), folder=path.resolve())
    if path.exists():
        raise UserError(
            f"{text} is a file: give the folder save_pretrained wrote (with config.json), "
            f"or an urbanseg checkpoint to commands that take one"
        )
    if is_repo_id(text):
        return Source(text, "smp", repo_id=text)
    raise UserError(
        f"{text!r} is not a folder, an smp hub id (owner/name) or hf:<id>; see `urbanseg models --pretrained`"
    )


def cache_path(source: Source) -> Path:
    """Where the conversion of `source` is kept: $HF_HOME/urbanseg/<name>/model.pt."""
    if source.repo_id is not None:
        name = ("hf--" if source.library == "transformers" else "smp--") + source.repo_id.replace("/", "--")
    else:
        name = "local--" + hashlib.sha256(str(source.folder).encode()).hexdigest()[:16]
    return hf_home() / "urbanseg" / name / "model.pt"


# Endings that make a checkpoint argument a file path, never a hub id ("runs/x.pt" is both).
_FILE_SUFFIXES = (".pt", ".pth", ".onnx")


def is_pretrained_source(text: str) -> bool:
    """Whether a checkpoint argument names a pretrained model rather than a checkpoint
    file: "hf:<id>"; a folder holding a save_pretrained config.json; "owner/name" that is
    not an existing path and does not end like a checkpoint file (.pt, .pth, .onnx)."""
    if text.startswith("hf:"):
        return True
    path = Path(text).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    if path.exists() or path.suffix.lower() in _FILE_SUFFIXES:
        return False
    return is_repo_id(text)


def resolve_model_checkpoint(text: str | None) -> str | None:
    """A command's checkpoint argument, resolved: a pretrained source (`is_pretrained_source`)
    -> the path of its converted checkpoint (converted on first use, see
    `resolve_pretrained`); anything else ("best", "last", a .pt path, None) unchanged."""
    if text is None or not is_pretrained_source(text):
        return text
    path = resolve_pretrained(text)
    print(f"{text}: the converted checkpoint {path}")
    return str(path)


def resolve_pretrained(source: str) -> Path:
    """The path of the urbanseg checkpoint converted from `source` (see `parse_source`),
    converting it on first use or when the hub has a newer revision. Offline, an existing
    conversion is used as it is; with nothing converted or cached -> UserError (fast)."""
    src = parse_source(source)
    path = cache_path(src)
    cached = cached_revision(path)
    if src.folder is not None:
        snap = local_snapshot(src.folder)
        return path if cached == snap.revision else write_conversion(convert(src, snap), path)
    info, reason = hub_info(src.repo_id or "")
    if info is not None and cached == str(info.sha):
        return path
    if info is None and cached is not None:
        print(f"{reason}: using the conversion in {path} (revision {cached[:12]})")
        return path
    snap = fetch_snapshot(src.repo_id or "", info, reason, source=src.text)
    return write_conversion(convert(src, snap), path)


def cached_revision(path: Path) -> str | None:
    """The source revision a conversion at `path` was made from (None: none there, or
    made by another converter version). Memory-mapped: the weights are not read."""
    if not path.is_file():
        return None
    try:
        source = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("source", {})
    except Exception:
        return None
    return source.get("revision") if source.get("converter") == CONVERTER_VERSION else None


def local_snapshot(folder: Path) -> Snapshot:
    """A folder as a snapshot; its revision is a fingerprint of the files' names, sizes
    and modification times, so an edited or replaced file makes a new conversion."""
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
        stat = f.stat()
        digest.update(f"{f.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return Snapshot(str(folder), folder, "local-" + digest.hexdigest()[:40])


def write_conversion(payload: dict[str, Any], path: Path) -> Path:
    from urbanseg.checkpoint import save_checkpoint

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, payload)
    except OSError as e:
        raise UserError(
            f"cannot write the converted model {path} ({e.strerror or e}); free space there, "
            f"set HF_HOME to a writable folder, or use `urbanseg import SOURCE --out FILE`"
        ) from None
    return path


def convert(
    src: Source, snap: Snapshot, *, labels: str | None = None, input_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The checkpoint payload of the model in `snap.folder` (see the module docstring)."""
    from urbanseg.checkpoint import build_payload

    entry = find_pretrained(src.text) if src.repo_id is not None else None
    loaded = read_folder(snap.folder, src.library)
    if entry is not None:
        _check_table_row(loaded, entry, snap.folder)
    label_set = _label_set(loaded, labels, snap.folder)
    protocol = entry.protocol if entry else Protocol("whole", _input_size(loaded, input_size, snap.folder))
    model = _rebuild(loaded, snap.folder)
    metrics = (
        {"miou": round(entry.miou / 100, 6), "miou_source": entry.miou_source}
        if entry and entry.miou is not None
        else {}
    )
    payload = build_payload(
        model,
        label_set=label_set,
        input_size=protocol.size,
        config={
            "command": "import",
            "source": src.text,
            "labels": label_set.name,
            "preprocessing": loaded.preprocessing,
        },
        step=0,
        epoch=0,
        metrics=metrics,
    )
    payload["source"] = _source_entry(src, snap, entry)
    payload["inference"] = protocol.to_dict()
    return payload


def _check_table_row(loaded: Loaded, entry: PretrainedModel, folder: Path) -> None:
    """The folder holds the table row's architecture (a SegFormer with its MiT variant):
    the conversion is labelled with the row's facts (name, published mIoU, licence), and
    `import ID --folder DIR` once labelled any model so, caching it under that ID."""
    variant = entry.architecture.rsplit("-", 1)[-1].lower()  # "SegFormer-B0" -> "b0"
    config = loaded.kwargs.get("config", {})
    if loaded.name == "smp":
        ok = loaded.kwargs.get("arch") == "Segformer" and config.get("encoder_name") == f"mit_{variant}"
    else:
        ok = config.get("model_type") == "segformer"
    if not ok:
        found = architecture_name({"name": loaded.name, "kwargs": loaded.kwargs})
        raise UserError(
            f"{folder} holds a {found}, not the {entry.architecture} of {entry.source}; give the folder that "
            f"model was fetched into, or import your folder as a SOURCE of its own: `urbanseg import {folder} "
            "--labels ...`"
        )


def _rebuild(loaded: Loaded, folder: Path) -> Any:
    """create_model from the plain kwargs (what model_from_checkpoint will do), the
    folder's weights loaded into it, checked on a test picture."""
    from urbanseg.models.registry import create_model

    model = create_model(loaded.name, loaded.num_classes, **loaded.kwargs).eval()
    net: Any = model.net.net if loaded.name == "hf" else model.net
    try:
        net.load_state_dict(loaded.state, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"the weights in {folder} do not fit the architecture of its config.json: {str(e).splitlines()[0][:300]}"
        ) from None
    probe = torch.full((1, 3, _PROBE, _PROBE), 128.0)
    with torch.inference_mode():
        out = model(probe)
    if out.shape != (1, loaded.num_classes, _PROBE, _PROBE) or not torch.isfinite(out).all():
        raise UserError(
            f"the model in {folder} does not give per-pixel class scores (got {tuple(out.shape)} "
            f"for a {_PROBE}x{_PROBE} picture)"
        )
    return model


def _label_set(loaded: Loaded, labels: str | None, folder: Path) -> LabelSet:
    """--labels, or classes19 for a 19-class model; the model's own class names (when
    its config has them) must be the label set's, in order."""
    if labels is None and loaded.num_classes != 19:
        raise UserError(
            f"the model in {folder} has {loaded.num_classes} classes: say which they are with "
            f"--labels (categories8, categories7 or a labelmap.json)"
        )
    label_set = get_label_set(labels or "classes19")
    if label_set.num_classes != loaded.num_classes:
        raise UserError(
            f"--labels {label_set.name} has {label_set.num_classes} classes, the model {loaded.num_classes}"
        )
    if loaded.class_names is not None:
        wrong = [
            (i, a, b)
            for i, (a, b) in enumerate(zip(loaded.class_names, label_set.classes, strict=True))
            if _class_key(a) != _class_key(b)
        ]
        if wrong:
            raise UserError(
                f"the model's classes are not {label_set.name}'s: e.g. class {wrong[0][0]} is "
                f"{wrong[0][1]!r}, not {wrong[0][2]!r}; give the matching --labels labelmap.json"
            )
    return label_set


def _class_key(name: str) -> str:
    """'traffic_light', 'Traffic-Light' and 'traffic light' name one class."""
    return name.lower().replace("_", " ").replace("-", " ").strip()


def _input_size(loaded: Loaded, given: tuple[int, int] | None, folder: Path) -> tuple[int, int]:
    size = given or loaded.size
    if size is None:
        raise UserError(
            f"{folder} does not say the input size it was trained at ({loaded.preprocessing}); "
            f"give it with --input-size WxH"
        )
    return size


def _source_entry(src: Source, snap: Snapshot, entry: PretrainedModel | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": src.text,
        "library": src.library,
        "revision": snap.revision,
        "converter": CONVERTER_VERSION,
    }
    if src.repo_id is not None:
        out["repo_id"] = src.repo_id
    out["folder"] = str(snap.folder)
    if entry is not None:
        out.update(source_facts(entry))
    else:
        out.update(licence="unknown", licence_summary="not in urbanseg's table: check the model's own licence")
    return out


def import_model(config: ImportConfig) -> int:
    """Entry point of `urbanseg import`: write (or reuse) the converted checkpoint; returns 0."""
    src = parse_source(config.source)
    if config.folder is not None and src.repo_id is None:
        raise UserError("--folder goes with a hub id (the model it was fetched from); a folder alone is a SOURCE")
    if config.out is not None and config.out.exists() and not config.overwrite:
        raise UserError(f"{config.out} exists; pick another --out or add --overwrite to replace it")
    size = parse_size(config.input_size, "--input-size") if config.input_size else None
    if config.out is None and config.folder is None:
        path = resolve_pretrained(config.source)
    else:
        snap = local_snapshot(config.folder.resolve()) if config.folder is not None else _snapshot(src)
        path = write_conversion(
            convert(src, snap, labels=config.labels, input_size=size),
            config.out if config.out is not None else cache_path(src),
        )
    print(describe(path))
    return 0


def _snapshot(src: Source) -> Snapshot:
    if src.folder is not None:
        return local_snapshot(src.folder)
    info, reason = hub_info(src.repo_id or "")
    return fetch_snapshot(src.repo_id or "", info, reason, source=src.text)


def architecture_name(model_args: dict[str, Any]) -> str:
    """'smp Segformer (mit_b0)' or 'transformers SegformerForSemanticSegmentation' from `model_args`."""
    kwargs = model_args["kwargs"]
    if model_args["name"] == "smp":
        return f"smp {kwargs['arch']} ({kwargs['config'].get('encoder_name', '?')})"
    if model_args["name"] == "hf":
        config = kwargs["config"]
        return f"transformers {(config.get('architectures') or [config.get('model_type')])[0]}"
    return str(model_args["name"])


def describe(path: Path) -> str:
    """What a converted checkpoint is, for the terminal: model, classes, protocol, score, licence."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    src, inf = ckpt["source"], ckpt["inference"]
    params = sum(
        v.numel()
        for k, v in ckpt["model_state"].items()
        if k not in ("mean", "std") and v.is_floating_point() and "running_" not in k
    )
    protocol = Protocol(inf["mode"], tuple(inf["size"]), tuple(inf["stride"]) if "stride" in inf else None)
    miou = ckpt["metrics"].get("miou")
    licence = (
        f"{src['licence']}: {src['licence_summary']} ({src['licence_url']})"
        if "licence_url" in src
        else f"{src['licence']}: {src['licence_summary']}"
    )
    lines = [
        f"{path}: converted from {src['id']} (revision {src['revision'][:12]})",
        (
            f"  {src.get('architecture') or architecture_name(ckpt['model'])}, {params / 1e6:.2f} M parameters, "
            f"{ckpt['label_set']['name']} ({len(ckpt['label_set']['classes'])} classes)"
        ),
        (
            f"  input {ckpt['input_size'][0]}x{ckpt['input_size'][1]}, {protocol.describe()}; normalisation mean "
            f"{[round(v, 3) for v in ckpt['normalization']['mean']]}, std "
            f"{[round(v, 3) for v in ckpt['normalization']['std']]}"
        ),
        "  published Cityscapes val mIoU: "
        + (f"{miou * 100:.2f} ({ckpt['metrics']['miou_source']})" if miou else "none checked"),
        f"  licence: {licence}",
    ]
    if src.get("non_commercial"):
        lines.append("  NOTE: these weights are for NON-COMMERCIAL use only.")
    lines.append(f"  use it: urbanseg predict --checkpoint {path} --input street.jpg")
    return "\n".join(lines)

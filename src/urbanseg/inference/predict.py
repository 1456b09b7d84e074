"""`urbanseg predict`: segment any images or videos, or draw N pictures from a split.

Two modes:

- ``--input FILE|DIR|GLOB|VIDEO ...``: for each image, at the image's own resolution,
  ``<stem>_overlay.png`` (mask blended over the image), ``<stem>_color.png`` (colour
  mask), ``<stem>_labels.png`` (uint8 class indices) and, with ``--cityscapes-ids``,
  ``<stem>_labelIds.png`` (Cityscapes label ids, the test server's format). A folder
  keeps its sub-folder layout under the output folder. A video gives
  ``<stem>_overlay.mp4`` at the video's size and frame rate.
- ``--split SPLIT --num N``: the original project's pictures, image | prediction side
  by side with titles and a legend, named after the source image, from the shards.

A bad input (missing, unreadable, empty folder) does not stop the others: the failures
are listed at the end and the command exits with status 2. The output folder must be
new, empty or predict's own (`urbanseg.outputs`): a user's files are never overwritten.
"""

from __future__ import annotations

import contextlib
import glob
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from urbanseg.config import PredictConfig
from urbanseg.errors import UserError
from urbanseg.imaging import IMAGE_SUFFIXES, overlay, read_image, save_png
from urbanseg.inference.engine import load_engine
from urbanseg.inference.plan import Plan, label_maps
from urbanseg.inference.predictor import Predictor, provenance
from urbanseg.labels import get_label_set
from urbanseg.outputs import MARKER, check_owner, claim
from urbanseg.rundir import RunDir, resolve_checkpoint
from urbanseg.util import atomic_path

SPLIT_PICTURES = 20  # --split's default --num, the original's
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


@dataclass(frozen=True)
class InputFile:
    """One input file and the output path prefix its results go to (`<out>/<rel>/<stem>`)."""

    source: Path
    prefix: Path

    @property
    def is_video(self) -> bool:
        return self.source.suffix.lower() in VIDEO_SUFFIXES


def predict(config: PredictConfig) -> int:
    """Entry point of `urbanseg predict`. Returns 0, or raises UserError listing failures."""
    checkpoint = None
    if config.model is None:
        from urbanseg.models.convert import resolve_model_checkpoint

        checkpoint = resolve_checkpoint(config.run, resolve_model_checkpoint(config.checkpoint))
    out = output_folder(config)
    check_owner(out, "predict")  # before the model loads (seconds, maybe an export): claim checks again
    predictor = load_engine(checkpoint=checkpoint, model=config.model, engine=config.engine, device=config.device)
    print(
        f"model: {predictor.info.get('checkpoint') or predictor.source} "
        f"({type(predictor).__name__}, {predictor.label_set.num_classes} classes "
        f"{predictor.label_set.name}, input {predictor.input_size[0]}x{predictor.input_size[1]})"
    )
    for label, value in provenance(predictor.info.get("source"), predictor.info.get("metrics")):
        print(f"{label}: {value}")
    projected = predictor.project_to(get_label_set(config.labels)) if config.labels else None
    if projected:
        print(f"labels: {projected}")
    plan = Plan.from_config(config, predictor.info)
    print(f"resolution: {plan.why}")
    if not plan.tta.plain:
        print(f"test-time augmentation: {plan.tta.describe()}, softmax probabilities averaged at the output size")
    if config.split is not None:
        return predict_split(config, predictor, plan, out)
    files, failures = collect_inputs(config.input, out)
    total = len(files) + len(failures)  # every input counts once: a missing one fails in collect_inputs
    id_lut = predictor.label_set.cityscapes_ids() if config.cityscapes_ids else None
    with claim(out, "predict") if files else contextlib.nullcontext():
        failures += predict_images(config, predictor, plan, [j for j in files if not j.is_video], id_lut)
        for file in (j for j in files if j.is_video):
            try:
                predict_video(config, predictor, plan, file)
            except ValueError as e:
                failures.append((str(file.source), str(e)))
    print(f"wrote predictions for {total - len(failures)} of {total} inputs to {out}")
    if failures:
        lines = "\n".join(f"  {src}: {why}" for src, why in failures)
        raise UserError(f"{len(failures)} of {total} inputs failed (the others were written):\n{lines}")
    return 0


def output_folder(config: PredictConfig) -> Path:
    """--out, or the default: `RUN/predict/input` (or `RUN/predict/SPLIT` with --split),
    else `predictions` (`predictions/SPLIT`)."""
    if config.out is not None:
        return config.out
    leaf = "input" if config.split is None else config.split
    if config.run is not None:
        return config.run / "predict" / leaf
    return Path("predictions") if config.split is None else Path("predictions") / leaf


def collect_inputs(entries: list[str], out: Path) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """Expand files, folders (recursively, keeping sub-folders) and globs into InputFiles.

    Returns (files, failures) where a failure is (entry, reason)."""
    files: list[InputFile] = []
    failures: list[tuple[str, str]] = []
    wanted = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            outputs = _output_folders(path, out)
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in wanted
                and not outputs.intersection(Path(os.path.abspath(p)).parents)
            )
            files += [InputFile(p, out / p.relative_to(path).parent / p.stem) for p in found]
            reason = f"folder has no images or videos ({', '.join(sorted(wanted))})"
        elif path.is_file():
            found = [path]
            files.append(InputFile(path, out / path.stem))
        elif glob.has_magic(entry):
            found = sorted(Path(p) for p in glob.glob(entry, recursive=True) if Path(p).is_file())
            files += [InputFile(p, out / p.stem) for p in found]
            reason = "the pattern matches no files"
        else:
            found, reason = [], "no such file or folder"
        if not found:
            failures.append((entry, reason))
    seen: dict[tuple[Path, bool], Path] = {}  # a video's outputs (NAME_overlay.mp4) never meet an image's
    unique = []
    for file in files:
        key = (file.prefix, file.is_video)
        if key in seen:
            failures.append((str(file.source), f"same output name as {seen[key]}; pass them in separate runs"))
        else:
            seen[key] = file.source
            unique.append(file)
    return unique, failures


def _output_folders(folder: Path, out: Path) -> set[Path]:
    """Folders below `folder` that urbanseg wrote (its marker; `out` itself even before the
    first run marks it): their pictures are results, not inputs. Without this a rerun with
    `--out` inside `--input` segmented its own overlays again, and more each time."""

    def absolute(p: Path) -> Path:
        return Path(os.path.abspath(p))

    found = {absolute(m.parent) for m in folder.rglob(MARKER) if m.parent != folder}
    return found | {absolute(out)} if absolute(out) != absolute(folder) else found


def _read(file: InputFile) -> np.ndarray | str:
    try:
        return read_image(file.source)
    except (ValueError, OSError) as e:
        return str(e)


def predict_images(
    config: PredictConfig, predictor: Predictor, plan: Plan, files: list[InputFile], id_lut: np.ndarray | None
) -> list[tuple[str, str]]:
    """Segment still images `batch_size` at a time, reading the next batch on a thread
    while the model runs. Returns the failures as (file, reason)."""
    from tqdm import tqdm

    failures: list[tuple[str, str]] = []
    chunks = [files[i : i + config.batch_size] for i in range(0, len(files), config.batch_size)]
    with ThreadPoolExecutor(max_workers=2) as pool, tqdm(total=len(files), desc="predict", unit="img") as bar:
        pending: list[Future] = [pool.submit(_read, j) for j in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            pending = [pool.submit(_read, j) for j in chunks[k + 1]] if k + 1 < len(chunks) else []
            ok = [(j, im) for j, im in zip(chunk, loaded, strict=False) if isinstance(im, np.ndarray)]
            failures += [(str(j.source), im) for j, im in zip(chunk, loaded, strict=False) if isinstance(im, str)]
            if ok:
                labels = label_maps(predictor, [im for _, im in ok], plan)
                for (file, image), lab in zip(ok, labels, strict=False):
                    write_outputs(file.prefix, image, lab, predictor, config, id_lut)
            bar.update(len(chunk))
    return failures


def write_outputs(
    prefix: Path,
    image: np.ndarray,
    labels: np.ndarray,
    predictor: Predictor,
    config: PredictConfig,
    id_lut: np.ndarray | None,
) -> None:
    """Write the requested PNGs for one (H, W, 3) image and its (H, W) uint8 class indices."""
    color = predictor.label_set.colorize(labels)
    name = prefix.name
    if "overlay" in config.outputs:
        save_png(prefix.with_name(f"{name}_overlay.png"), overlay(image, color, config.alpha))
    if "color" in config.outputs:
        save_png(prefix.with_name(f"{name}_color.png"), color)
    if "labels" in config.outputs:
        save_png(prefix.with_name(f"{name}_labels.png"), labels)
    if id_lut is not None:
        save_png(prefix.with_name(f"{name}_labelIds.png"), id_lut[labels])


def predict_video(config: PredictConfig, predictor: Predictor, plan: Plan, file: InputFile) -> Path:
    """Segment every frame of a video; write `<prefix>_overlay.mp4` (mp4v) at the same
    size and frame rate. ValueError if the video cannot be opened or has no frames."""
    import cv2
    from tqdm import tqdm

    cap = cv2.VideoCapture(str(file.source))
    try:
        if not cap.isOpened():
            raise ValueError(f"cannot open {file.source} as a video (corrupt, or a codec OpenCV lacks)")
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        target = file.prefix.with_name(f"{file.prefix.name}_overlay.mp4")
        with atomic_path(target) as tmp:
            writer: Any = None
            with tqdm(total=total, desc=file.source.name, unit="frame") as bar:
                while True:
                    batch = _read_frames(cap, config.batch_size)
                    if not batch:
                        break
                    if writer is None:
                        h, w = batch[0].shape[:2]
                        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            raise ValueError(f"OpenCV cannot write an mp4v video to {target}")
                    for frame, lab in zip(batch, label_maps(predictor, batch, plan), strict=False):
                        mixed = overlay(frame, predictor.label_set.colorize(lab), config.alpha)
                        writer.write(np.ascontiguousarray(mixed[..., ::-1]))
                    bar.update(len(batch))
            if writer is None:
                raise ValueError(f"{file.source} has no readable frames")
            writer.release()
    finally:
        cap.release()
    return target


def _read_frames(cap: Any, n: int) -> list[np.ndarray]:
    """Up to n frames as (H, W, 3) uint8 RGB."""
    frames: list[np.ndarray] = []
    while len(frames) < n:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(np.ascontiguousarray(frame[..., ::-1]))
    return frames


# --------------------------------------------------------------------------- --split


def predict_split(config: PredictConfig, predictor: Predictor, plan: Plan, out: Path) -> int:
    """The original's mode: `--num` pictures from the split's shards, image | prediction,
    into folder `out`."""
    from tqdm import tqdm

    from urbanseg.data.loader import ShardDataset

    split = config.split or "val"  # (called with --split only)
    if config.data is not None:
        root = config.data
    elif config.run is not None:
        root = RunDir(config.run).data
    else:  # PredictConfig refuses --split without --run or --data
        raise UserError("--split reads the shards named in the run's config.yaml: give --run runs/NAME or --data")
    dataset = ShardDataset(root, split)
    n = min(config.num or SPLIT_PICTURES, len(dataset))
    title = _model_title(predictor)
    with claim(out, "predict"):
        for start in tqdm(range(0, n, config.batch_size), desc=f"predict {split}", unit="batch"):
            items = [dataset[i] for i in range(start, min(n, start + config.batch_size))]
            images = [item["image"].permute(1, 2, 0).numpy() for item in items]
            for item, image, lab in zip(items, images, label_maps(predictor, images, plan), strict=False):
                picture = side_by_side(image, predictor.label_set.colorize(lab), str(item["name"]), title, predictor)
                save_png(out / f"{Path(str(item['name'])).stem}.png", picture)
    print(f"wrote {n} pictures (image | prediction) from {root}/{split} to {out}")
    return 0


def _model_title(predictor: Predictor) -> str:
    model = (predictor.info.get("model") or {}).get("name", predictor.source.stem)
    step = predictor.info.get("step")
    return f"prediction: {model}" + (f" (step {step})" if step is not None else "")


def side_by_side(image: np.ndarray, color: np.ndarray, left: str, right: str, predictor: Predictor) -> np.ndarray:
    """(H, W, 3) image and colour mask -> one (H', 2W + 6, 3) uint8 picture with titles
    above each half and a legend of the class colours below."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = image.shape[:2]
    size = int(np.clip(h // 16, 10, 28))
    font = ImageFont.load_default(size=size)
    pad, line, width = 6, size + 8, 2 * w + 6
    names, palette = predictor.label_set.classes, predictor.label_set.palette
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = line + int(max(probe.textlength(n, font=font) for n in names)) + 2 * pad
    per_row = max(1, width // cell)
    rows = -(-len(names) // per_row)
    canvas = Image.new("RGB", (width, line + h + rows * line + pad), "white")
    canvas.paste(Image.fromarray(image), (0, line))
    canvas.paste(Image.fromarray(color), (w + pad, line))
    draw = ImageDraw.Draw(canvas)
    for x, text in ((0, left), (w + pad, right)):
        draw.text((x + 2, 2), _fit(draw, text, font, w - 4), fill="black", font=font)
    for k, (name, rgb) in enumerate(zip(names, palette, strict=False)):
        x, y = (k % per_row) * cell + 2, line + h + pad + (k // per_row) * line
        draw.rectangle((x, y, x + line - 8, y + line - 8), fill=tuple(rgb), outline="black")
        draw.text((x + line - 4, y - 2), name, fill="black", font=font)
    return np.asarray(canvas)


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """`text`, cut with an ellipsis so that it is at most `width` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."

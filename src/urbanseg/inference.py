"""Run a trained model on images of any size: one `Predictor` interface over a PyTorch
checkpoint or an exported ONNX model, batching, resizing and sliding-window tiling.

Both backends take float32 (N, 3, H, W) images on the 0..255 scale (the model
normalises inside) and return float32 (N, C, H, W) logits; everything around them
(resizing, upsampling logits, tiling, argmax) is numpy/OpenCV shared by both, so the
ONNX path needs no PyTorch model code and both paths post-process identically.

Three ways to run a model on an (H, W) image, all returning (H, W) class indices:

- ``resize`` (default): resize to the training input size, run, upsample the logits
  bilinearly back to (H, W). The model sees the scale it was trained at.
- ``native``: run on the image as it is (the model pads to its stride inside).
- ``tile``: slide a window over the image at its own resolution, with overlap; logits
  of overlapping windows are averaged. Memory stays at C x window-height x W floats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from urbanseg.errors import UserError
from urbanseg.labels import LabelSet
from urbanseg.prepare import resize_image  # the training images' resize: same model input

Mode = Literal["resize", "native", "tile"]
ONNX_META_KEY = "urbanseg"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}


@dataclass
class Predictor:
    """A model that maps (N, 3, H, W) float32 0..255 images to (N, C, H, W) float32 logits.

    ``input_size`` is the training input size (W, H). ``fixed_size`` is (W, H) when the
    model accepts only that size (an ONNX export without dynamic axes), else None.
    """

    label_set: LabelSet
    input_size: tuple[int, int]
    source: Path
    info: dict[str, Any] = field(default_factory=dict)
    fixed_size: tuple[int, int] | None = None

    def logits(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class TorchPredictor(Predictor):
    """A PyTorch checkpoint (`urbanseg.checkpoint` payload), evaluated in inference mode."""

    def __init__(self, path: Path, device: str = "auto") -> None:
        import torch

        from urbanseg.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(path)
        try:
            label_set = LabelSet.from_dict(ckpt["label_set"])
            input_size = (int(ckpt["input_size"][0]), int(ckpt["input_size"][1]))
            model = model_from_checkpoint(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(
                f"checkpoint {path} is not a usable urbanseg checkpoint ({type(e).__name__}: {e})"
            ) from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        info = {"model": ckpt.get("model"), "step": ckpt.get("step"), "metrics": ckpt.get("metrics")}
        super().__init__(label_set, input_size, Path(path), info)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
        return out.float().cpu().numpy()


class OnnxPredictor(Predictor):
    """An ONNX model written by `urbanseg export`, run with ONNX Runtime (no PyTorch)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise UserError(f"ONNX model {path} does not exist; write one with `urbanseg export --run runs/NAME`")
        try:
            self.session = ort.InferenceSession(str(path), providers=_ort_providers(ort))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... types
            raise UserError(f"cannot load ONNX model {path}: {e}") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
        if raw is None:
            raise UserError(
                f"ONNX model {path} has no {ONNX_META_KEY!r} metadata (label set, input size); "
                "export it with `urbanseg export` or predict from the checkpoint with --checkpoint"
            )
        meta = json.loads(raw)
        (inp,) = self.session.get_inputs()
        self.input_name = inp.name
        h, w = inp.shape[2], inp.shape[3]
        fixed = (w, h) if isinstance(h, int) and isinstance(w, int) else None
        info = {k: meta.get(k) for k in ("model", "step", "metrics", "opset")}
        super().__init__(LabelSet.from_dict(meta["label_set"]), tuple(meta["input_size"]), Path(path), info, fixed)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def _ort_providers(ort: Any) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def run_data(run: Path) -> Path:
    """The shards folder a run was trained on (`data` in RUN/config.yaml)."""
    import yaml

    path = Path(run) / "config.yaml"
    try:
        return Path(yaml.safe_load(path.read_text())["data"])
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the shards folder (`data`) from {path} ({type(e).__name__}: {e}); "
                        "pass --data SHARDS") from None


def resolve_checkpoint(run: Path | None, checkpoint: str | None) -> Path:
    """`best`/`last` inside `run`, or a checkpoint path; UserError naming what is missing."""
    name = checkpoint or "best"
    if name in ("best", "last"):
        if run is None:
            raise UserError(f"--checkpoint {name} needs --run runs/NAME; or give a checkpoint path")
        path = Path(run) / f"{name}.pt"
    else:
        path = Path(name)
    if not path.is_file():
        hint = ""
        if run is not None and Path(run).is_dir():
            found = ", ".join(sorted(p.name for p in Path(run).glob("*.pt"))) or "no .pt files"
            hint = f" (run folder {run} has: {found})"
        raise UserError(
            f"checkpoint {path} does not exist{hint}; train with `urbanseg train` or pass --checkpoint PATH"
        )
    return path


def load_predictor(
    *, checkpoint: Path | None = None, onnx: Path | None = None, device: str = "auto"
) -> Predictor:
    """A TorchPredictor for a checkpoint or an OnnxPredictor for an .onnx file."""
    if onnx is not None:
        return OnnxPredictor(Path(onnx))
    if checkpoint is None:
        raise UserError("give --checkpoint PATH, --run runs/NAME or --model model.onnx")
    if Path(checkpoint).suffix == ".onnx":
        return OnnxPredictor(Path(checkpoint))
    return TorchPredictor(Path(checkpoint), device)


# --------------------------------------------------------------------------- images


def to_rgb8(array: np.ndarray, source: str = "image") -> np.ndarray:
    """Any decoded image -> (H, W, 3) uint8 RGB.

    Accepts (H, W) greyscale, (H, W, 1|3|4) channels-last in RGB(A) order, and uint8,
    uint16 (16-bit PNG/TIFF, scaled by 1/257), or float (0..1) samples. Alpha is dropped.
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{source}: unsupported image shape {a.shape}; expected (H, W) or (H, W, 1-4)")
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"{source}: unsupported sample type {a.dtype}; expected 8- or 16-bit integers or floats")
    channels = a.shape[2]
    if channels <= 2:  # grey or grey + alpha
        a = np.repeat(a[..., :1], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def read_image(path: Path) -> np.ndarray:
    """Read any still image file -> (H, W, 3) uint8 RGB. ValueError naming the file if unreadable.

    OpenCV first (keeps 16 bits), Pillow for what OpenCV cannot decode (GIF, ...)."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)  # np.fromfile + imdecode: non-ASCII paths work
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is not None:
        if img.ndim == 3 and img.shape[2] >= 3:  # OpenCV decodes to BGR(A)
            img = img[..., [2, 1, 0] + ([3] if img.shape[2] == 4 else [])]
        return to_rgb8(img, str(path))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return to_rgb8(np.asarray(im.convert("RGB")), str(path))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode {path} as an image ({e}); is it a corrupt or non-image file?") from None


def upsample_logits(logits: np.ndarray, size: tuple[int, int], rows: tuple[int, int] | None = None) -> np.ndarray:
    """(C, h, w) float32 -> (H, W, C) float32 at size (W, H), or only output rows
    [rows[0], rows[1]); bilinear with half-pixel centres, equal to torch's
    interpolate(mode="bilinear", align_corners=False).

    Separable: the vertical pass picks and blends two source rows per output row (so a
    band of rows costs only that band), OpenCV does the horizontal pass."""
    import cv2

    _, h, w = logits.shape
    W, H = size
    y0, y1 = rows or (0, H)
    hwc = logits.transpose(1, 2, 0)
    if h == H:
        band = hwc[y0:y1]
    else:
        src = np.maximum((np.arange(y0, y1) + 0.5) * (h / H) - 0.5, 0.0)  # torch clamps at the top edge
        i0 = np.minimum(src.astype(np.int64), h - 1)
        i1 = np.minimum(i0 + 1, h - 1)
        wy = (src - i0).astype(np.float32)[:, None, None]
        band = hwc[i0] * (1.0 - wy) + hwc[i1] * wy
    band = np.ascontiguousarray(band, dtype=np.float32)
    if w != W:
        band = cv2.resize(band, (W, y1 - y0), interpolation=cv2.INTER_LINEAR)
        band = band[..., None] if band.ndim == 2 else band  # OpenCV drops a single channel axis
    return band


def upsample_argmax(logits: np.ndarray, size: tuple[int, int], band: int = 256) -> np.ndarray:
    """(C, h, w) float32 logits -> (H, W) uint8 class indices at size (W, H), upsampling
    `band` rows at a time: memory is band x W x C floats, not H x W x C."""
    W, H = size
    out = np.empty((H, W), np.uint8)
    for y in range(0, H, band):
        out[y : y + band] = _argmax(upsample_logits(logits, size, (y, min(H, y + band))))
    return out


def _to_batch(images: list[np.ndarray]) -> np.ndarray:
    """List of (H, W, 3) uint8 of one size -> (N, 3, H, W) float32 on the 0..255 scale."""
    return np.stack(images).transpose(0, 3, 1, 2).astype(np.float32)


def _argmax(hwc: np.ndarray) -> np.ndarray:
    return hwc.argmax(axis=-1).astype(np.uint8)


# --------------------------------------------------------------------------- segmenting


def segment(
    predictor: Predictor,
    images: list[np.ndarray],
    *,
    mode: Mode = "resize",
    tile_size: tuple[int, int] | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
) -> list[np.ndarray]:
    """Class indices for each (H, W, 3) uint8 image: a list of (H, W) uint8 arrays.

    Images are batched `batch_size` at a time (in ``native`` mode, runs of equal size;
    in ``tile`` mode, the windows of one row of tiles)."""
    if mode == "tile":
        window = tile_size or predictor.fixed_size or predictor.input_size
        return [segment_tiled(predictor, im, window, overlap=overlap, batch_size=batch_size) for im in images]
    if mode == "native" and predictor.fixed_size is not None:
        raise UserError(
            f"{predictor.source} was exported for a fixed {predictor.fixed_size[0]}x{predictor.fixed_size[1]} input; "
            "it cannot run at native resolution: drop --native, use --tile, or re-export with dynamic axes"
        )
    out: list[np.ndarray] = []
    for group in _batches(images, batch_size, same_size=(mode == "native")):
        if mode == "resize":
            inputs = [resize_image(im, predictor.fixed_size or predictor.input_size) for im in group]
        else:
            inputs = group
        logits = predictor.logits(_to_batch(inputs))
        out.extend(upsample_argmax(lg, (im.shape[1], im.shape[0])) for lg, im in zip(logits, group, strict=False))
    return out


def _batches(images: list[np.ndarray], batch_size: int, *, same_size: bool) -> list[list[np.ndarray]]:
    groups: list[list[np.ndarray]] = []
    for im in images:
        if groups and len(groups[-1]) < batch_size and (not same_size or groups[-1][0].shape == im.shape):
            groups[-1].append(im)
        else:
            groups.append([im])
    return groups


def tile_starts(length: int, window: int, overlap: float) -> list[int]:
    """Window offsets covering [0, length): stride window*(1-overlap), the last one flush
    with the end. A window longer than the image gives the single offset 0."""
    if length <= window:
        return [0]
    stride = max(1, round(window * (1.0 - overlap)))
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def segment_tiled(
    predictor: Predictor, image: np.ndarray, window: tuple[int, int], *, overlap: float = 0.25, batch_size: int = 4
) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 class indices by a sliding window at native resolution.

    Logits of overlapping windows are summed; the argmax of the sum equals the argmax of
    the average (every class at a pixel has the same window count). Rows of the result
    are final once the next row of windows starts below them, so only a band of
    C x window-height x W logits is held, however tall the image."""
    H, W = image.shape[:2]
    tw, th = min(window[0], W), min(window[1], H)
    ys, xs = tile_starts(H, th, overlap), tile_starts(W, tw, overlap)
    out = np.empty((H, W), np.uint8)
    band: np.ndarray | None = None  # (th, W, C) sums for image rows [y, y + th)
    bar = _window_bar(len(ys) * len(xs))
    for r, y in enumerate(ys):
        crops = [image[y : y + th, x : x + tw] for x in xs]
        logits = _window_logits(predictor, crops, batch_size)
        bar.update(len(xs))
        if band is None:
            band = np.zeros((th, W, logits[0].shape[0]), np.float32)
        for x, lg in zip(xs, logits, strict=False):
            band[:, x : x + tw] += lg.transpose(1, 2, 0)
        done = (ys[r + 1] if r + 1 < len(ys) else H) - y  # rows no later window touches
        out[y : y + done] = _argmax(band[:done])
        band[: th - done] = band[done:].copy()
        band[th - done :] = 0.0
    bar.close()
    return out


def _window_bar(total: int) -> Any:
    """A progress bar over the windows of one image, only when there are many of them."""
    from tqdm import tqdm

    return tqdm(total=total, desc="tiles", unit="win", leave=False, disable=total < 32)


def _window_logits(predictor: Predictor, crops: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """(C, h, w) logits of equal-size crops; padded (edge pixels repeated) to a fixed-size
    model's input and cropped back."""
    h, w = crops[0].shape[:2]
    if predictor.fixed_size is not None and predictor.fixed_size != (w, h):
        fw, fh = predictor.fixed_size
        if w > fw or h > fh:
            raise UserError(f"--tile-size {w}x{h} exceeds the {fw}x{fh} input {predictor.source} was exported for")
        crops = [np.pad(c, ((0, fh - h), (0, fw - w), (0, 0)), mode="edge") for c in crops]
    out: list[np.ndarray] = []
    for i in range(0, len(crops), batch_size):
        out.extend(lg[:, :h, :w] for lg in predictor.logits(_to_batch(crops[i : i + batch_size])))
    return out


# --------------------------------------------------------------------------- rendering


def overlay(rgb: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an (H, W, 3) uint8 colour mask over an (H, W, 3) uint8 image."""
    mixed = rgb.astype(np.float32) * (1.0 - alpha) + color.astype(np.float32) * alpha
    return (mixed + 0.5).astype(np.uint8)


def cityscapes_id_lut(label_set: LabelSet) -> np.ndarray:
    """(256,) uint8 table class index -> Cityscapes label id, for the official test server:
    the mapping the official evaluation (`urbanseg.metrics`) reads back. UserError for a
    colour-only label set."""
    from urbanseg.metrics import label_ids_for_classes

    return label_ids_for_classes(label_set)

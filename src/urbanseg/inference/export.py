"""`urbanseg export`: a checkpoint -> an ONNX model that `urbanseg predict --model` (or
any ONNX Runtime user) runs without PyTorch.

The graph takes ``image``: float32 (N, 3, H, W) on the 0..255 scale (normalisation is
inside) and returns ``logits``: float32 (N, C, H, W). Batch, height and width are
dynamic unless ``--no-dynamic``. The model's metadata_props hold one JSON entry
``urbanseg`` with the label set (classes, palette, id mapping), input size [W, H],
normalisation, model name and arguments, step and metrics of the checkpoint.

The file is checked before it is moved into place: ``onnx.checker``, then ONNX Runtime
against PyTorch on a test picture at the input size (and at an odd size when dynamic):
the argmax must agree on >= 99.9% of the pixels. An existing file is replaced only if it
is an urbanseg export (`is_urbanseg_onnx`).

With ``--quantize int8`` the int8 model (`urbanseg.inference.quantize`) is written beside
the fp32 one as ``NAME.int8.onnx``: calibrated on ``--num`` images of split
``--calibrate`` (default train: the val images score it, so they do not calibrate it),
then both models are scored on every image of the val split; the mIoU before and after
and the argmax agreement are printed and stored in its metadata (``quantization``).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from urbanseg import __version__
from urbanseg.config import ExportConfig
from urbanseg.errors import UserError
from urbanseg.inference.metadata import ONNX_META_KEY, OnnxMetadata, Quantization, read_entry
from urbanseg.inference.quantize import METHOD, int8_path, pick_images, quantize_onnx, score_pair, session
from urbanseg.outputs import check_file, make_folder
from urbanseg.rundir import RunDir, resolve_checkpoint
from urbanseg.util import atomic_path, remove_dead_temporaries

MIN_AGREEMENT = 0.999
DEFAULT_CALIBRATION = 32
VAL_SPLIT = "val"


def export(config: ExportConfig) -> int:
    """Entry point of `urbanseg export`: write the ONNX model; returns 0."""
    from urbanseg.checkpoint import load_checkpoint, model_from_checkpoint
    from urbanseg.models.convert import resolve_model_checkpoint

    source = resolve_checkpoint(config.run, resolve_model_checkpoint(config.checkpoint))
    if is_onnx_file(source):
        raise UserError(
            f"--checkpoint {source} is an ONNX model already; export reads a PyTorch checkpoint (best.pt, "
            "--run RUN); `evaluate --model` and `predict --model` run ONNX models as they are"
        )
    target = Path(config.out or source.with_suffix(".onnx"))
    check_file(target, "export", is_urbanseg_onnx)
    make_folder(target.parent)  # now: a place where no folder can be made is named before the work
    int8_target = int8_path(target) if config.quantize == "int8" else None
    if int8_target is not None:
        check_file(int8_target, "export", is_urbanseg_onnx, what="int8 model")
    ckpt = load_checkpoint(source)
    model = model_from_checkpoint(ckpt).eval()
    meta = OnnxMetadata.from_checkpoint(ckpt, source, config.opset, config.dynamic)
    splits = _quantize_splits(config, meta) if int8_target is not None else None  # checked before the work
    for written in (target, int8_target):  # temporary files of exports killed mid-write
        if written is not None:
            remove_dead_temporaries(written)
    with atomic_path(target) as tmp:
        export_onnx(model, tmp, meta.input_size, opset=config.opset, dynamic=config.dynamic, metadata=meta.to_dict())
        agreement = verify_onnx(model, tmp, meta.input_size, dynamic=config.dynamic)
    sizes = ", ".join(f"{k}: {v:.4%}" for k, v in agreement.items())
    print(
        f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, opset {config.opset}, "
        f"{'dynamic' if config.dynamic else 'fixed'} input) from {source}"
    )
    print(f"argmax agreement with PyTorch: {sizes}")
    if int8_target is not None and splits is not None:
        write_int8(target, int8_target, meta, *splits)
        target = int8_target
    print(f"run it: urbanseg predict --model {target} --input IMAGES")
    return 0


def _quantize_splits(config: ExportConfig, meta: OnnxMetadata) -> tuple[str, list[np.ndarray], Any]:
    """(calibration split, its chosen images, val ShardDataset) for --quantize: UserError for missing
    shards or splits (naming those available), a label set that differs from the model's,
    or images whose size a fixed-size export does not take."""
    from urbanseg.data.loader import ShardDataset

    if config.data is not None:
        shards = Path(config.data)
    elif config.run is not None:
        shards = RunDir(config.run).data
    else:
        raise UserError("--quantize int8 needs the shards it calibrates on: give --run runs/NAME or --data SHARDS")
    calibration = ShardDataset(shards, config.calibrate or "train")
    val = ShardDataset(shards, VAL_SPLIT)
    for dataset in (calibration, val):
        if dataset.label_set.classes != meta.label_set.classes:
            raise UserError(
                f"shards {shards / dataset.split} use label set {dataset.label_set.name!r} "
                f"({dataset.label_set.num_classes} classes), the model {meta.label_set.name!r} "
                f"({meta.label_set.num_classes}); give --data with shards of the model's label set"
            )
        size = (dataset.spec.width, dataset.spec.height)
        if not config.dynamic and size != tuple(meta.input_size):
            raise UserError(
                f"shards {shards / dataset.split} hold {size[0]}x{size[1]} images, the --no-dynamic export takes "
                f"only {meta.input_size[0]}x{meta.input_size[1]}; drop --no-dynamic or give --data with that size"
            )
    if len(calibration) == 0:
        raise UserError(f"split {calibration.split!r} of {shards} has no images to calibrate on; use --calibrate SPLIT")
    num = config.num or DEFAULT_CALIBRATION
    chosen = pick_images(len(calibration), num)
    return calibration.split, [calibration[int(i)]["image"].numpy() for i in chosen], val


def write_int8(
    fp32: Path, target: Path, meta: OnnxMetadata, split: str, images: list[np.ndarray], val: Any
) -> Quantization:
    """Quantize `fp32` (calibrated on `images` of `split`, (3, H, W) uint8 each) into `target`, score
    both on `val`, store the result in the int8 model's metadata and print it."""
    import onnx

    with atomic_path(target) as tmp:
        print(f"int8: calibrating on {len(images)} images, then scoring fp32 and int8 on {len(val)} {val.split} images")
        try:
            result = quantize_onnx(fp32, tmp, images)
        except Exception as e:  # ONNX Runtime's tooling on a graph it cannot quantize
            raise UserError(
                f"int8 quantization of {fp32} failed ({type(e).__name__}: {e}); the fp32 export is written and "
                "usable, the int8 model is not"
            ) from None
        fp32_session, int8_session = session(fp32), session(tmp)
        if meta.dynamic:  # the int8 graph takes any size as the fp32 one does
            w, h = meta.input_size
            x = probe_picture(w + w // 4 + 3, h - h // 8 + 5)
            want, got = (s.run(None, {"image": x})[0].shape for s in (fp32_session, int8_session))
            if want != got:
                raise UserError(f"the int8 model outputs {got} for an input the fp32 one maps to {want}; report a bug")
        classes, ignore = meta.label_set.num_classes, meta.label_set.ignore_index
        scores = score_pair(fp32_session, int8_session, val, classes, ignore)
        quantization = Quantization(
            dtype="int8",
            method=METHOD,
            calibration_split=split,
            calibration_images=len(images),
            val_split=val.split,
            val_images=scores.images,
            miou_fp32=scores.miou_fp32,
            miou_int8=scores.miou_int8,
            agreement=scores.agreement,
            float_nodes=result.float_nodes,
        )
        proto = onnx.load(str(tmp))
        for entry in proto.metadata_props:
            if entry.key == ONNX_META_KEY:
                entry.value = json.dumps(dataclasses.replace(meta, quantization=quantization).to_dict())
        onnx.save(proto, str(tmp))
    before, after = _fmt(scores.miou_fp32), _fmt(scores.miou_int8)
    drop = (
        ""
        if scores.miou_fp32 is None or scores.miou_int8 is None
        else f" (change {scores.miou_int8 - scores.miou_fp32:+.4f})"
    )
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, int8) from {fp32}")
    print(
        f"val mIoU on {scores.images} {val.split} images: fp32 {before} -> int8 {after}{drop}; "
        f"argmax agreement {scores.agreement:.2%}"
    )
    return quantization


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def is_onnx_file(path: Path | str) -> bool:
    """Whether a checkpoint argument names an ONNX model (`--checkpoint x.onnx` runs as
    `--model x.onnx`); the one rule for load_engine, evaluate and export."""
    return Path(path).suffix.lower() == ".onnx"


def is_urbanseg_onnx(path: Path) -> bool:
    """Whether `path` is an ONNX model carrying urbanseg's metadata (one `export` wrote)."""
    return read_entry(path) is not None


def export_onnx(
    model: Any, path: Path, input_size: tuple[int, int], *, opset: int, dynamic: bool, metadata: dict[str, Any]
) -> None:
    """Trace `model` (eval mode, float32 (N, 3, H, W) 0..255 -> logits) to ONNX at `path`,
    attach `metadata` as JSON under metadata_props["urbanseg"] and run onnx.checker."""
    import onnx
    import torch

    w, h = input_size
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    if dynamic:
        # Trace at a size that is not a multiple of any stride, so that the model's
        # "pad to the stride" branch is recorded (with its shape arithmetic) in the graph.
        w, h = w + 1, h + 1
    dummy = torch.full((1, 3, h, w), 128.0)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which
        # needs the extra `onnxscript` package; this one exports every urbanseg model.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, json.dumps(metadata)
    proto.producer_name, proto.producer_version = "urbanseg", __version__
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise UserError(f"the exported ONNX graph is invalid ({e}); try another --opset") from None
    onnx.save(proto, str(path))


def probe_picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(1, 3, H, W) float32 0..255: smooth random blobs with edges, closer to a photo than
    noise (noise puts many pixels on near-ties between classes)."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
    picture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(picture, 0, 255).transpose(2, 0, 1)[None].astype(np.float32)


def verify_onnx(model: Any, path: Path, input_size: tuple[int, int], *, dynamic: bool) -> dict[str, float]:
    """Argmax agreement ONNX Runtime vs PyTorch per test size; UserError below 99.9%."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    w, h = input_size
    sizes = [(w, h)] + ([(w + w // 4 + 3, h - h // 8 + 5)] if dynamic else [])
    result = {}
    for sw, sh in sizes:
        x = probe_picture(sw, sh)
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).argmax(1).numpy()
        got = session.run(None, {"image": x})[0]
        if got.shape[-2:] != (sh, sw):
            raise UserError(
                f"ONNX output is {got.shape[-2]}x{got.shape[-1]} for a {sh}x{sw} input; "
                "this model does not export with dynamic sizes, use --no-dynamic"
            )
        result[f"{sw}x{sh}"] = float((got.argmax(1) == expected).mean())
        if result[f"{sw}x{sh}"] < MIN_AGREEMENT:
            raise UserError(
                f"ONNX Runtime agrees with PyTorch on only {result[f'{sw}x{sh}']:.4%} of the pixels "
                f"at {sw}x{sh} (need {MIN_AGREEMENT:.1%}); try another --opset or --no-dynamic"
            )
    return result

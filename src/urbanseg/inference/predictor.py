"""The inference engines: one `Predictor` interface over a PyTorch checkpoint or an
exported ONNX model (run with ONNX Runtime, no PyTorch model code).

Both take float32 (N, 3, H, W) images on the 0..255 scale (the model normalises inside)
and return float32 (N, C, H, W) logits; resizing, tiling and upsampling around them are
shared (`urbanseg.inference.segment`). `urbanseg.inference.engine.load_engine` picks
one for `--engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from urbanseg.errors import UserError
from urbanseg.inference.fold import optimize_for_inference
from urbanseg.inference.metadata import ONNX_META_KEY, OnnxMetadata
from urbanseg.labels import LabelSet
from urbanseg.projection import require_projection


@dataclass
class Predictor:
    """A model that maps (N, 3, H, W) float32 0..255 images to (N, C, H, W) float32 logits.

    ``input_size`` is the training input size (W, H). ``fixed_size`` is (W, H) when the
    model accepts only that size (an ONNX export without dynamic axes), else None.
    ``label_set`` is the set of the class indices `segment` returns: the model's own, or
    after `project_to` a coarser one, each predicted class mapped by ``class_map``.
    """

    label_set: LabelSet
    input_size: tuple[int, int]
    source: Path
    info: dict[str, Any] = field(default_factory=dict)
    fixed_size: tuple[int, int] | None = None
    class_map: np.ndarray | None = None  # (256,) uint8, applied after the argmax

    def logits(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def project_to(self, target: LabelSet) -> str | None:
        """Make `segment` return `target`'s classes: the model's predictions mapped class ->
        class after the argmax (`urbanseg.projection`). Returns what was done (None: the
        same classes); UserError when there is no such mapping."""
        found = require_projection(
            self.label_set,
            target,
            f"the model {self.info.get('checkpoint') or self.source}",  # the checkpoint, not its engine cache
            f"--labels {target.name}",
            fix=f"Drop --labels to write the model's own {self.label_set.name} classes",
        )
        if found is None:
            return None
        self.label_set, self.class_map = target, found.lut
        return found.describe()


def provenance(source: dict[str, Any] | None, metrics: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, value) rows saying where a converted checkpoint comes from, under which
    licence and with which published score; [] for a checkpoint urbanseg trained.
    `source` and `metrics` are the checkpoint's entries (see `urbanseg.models.convert`)."""
    if not source:
        return []
    licence = str(source.get("licence", "unknown"))
    if source.get("licence_summary"):
        licence += f": {source['licence_summary']}"
    if source.get("licence_url"):
        licence += f" ({source['licence_url']})"
    if source.get("non_commercial"):
        licence = "NON-COMMERCIAL use only. " + licence
    miou = (metrics or {}).get("miou")
    score = (
        f"{100 * miou:.2f} Cityscapes val mIoU ({metrics.get('miou_source') or 'source not recorded'})"
        if isinstance(miou, (int, float)) and metrics
        else "none on record"
    )
    return [
        ("pretrained", f"{source.get('id')} (revision {str(source.get('revision', '?'))[:12]})"),
        ("licence", licence),
        ("published score", score),
    ]


class TorchPredictor(Predictor):
    """A PyTorch checkpoint (`urbanseg.checkpoint` payload), evaluated in inference mode.

    With `optimize` (default), batch norms are folded into the convolutions and, on the
    CPU, weights and inputs are channels-last (`urbanseg.inference.fold`);
    `optimizations` lists what was done."""

    def __init__(self, path: Path, device: str = "auto", *, optimize: bool = True) -> None:
        import torch

        from urbanseg.checkpoint import load_checkpoint, model_from_checkpoint, summarize_checkpoint
        from urbanseg.device import pick_device

        ckpt = load_checkpoint(path)
        try:
            label_set = LabelSet.from_dict(ckpt["label_set"])
            input_size = (int(ckpt["input_size"][0]), int(ckpt["input_size"][1]))
            model = model_from_checkpoint(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(
                f"checkpoint {path} is not a usable urbanseg checkpoint ({type(e).__name__}: {e})"
            ) from None
        self.device = pick_device(device)
        self.optimizations: list[str] = []
        if optimize:
            model, self.optimizations = optimize_for_inference(model, self.device)
        self.model = model.to(self.device).eval()
        self.channels_last = "channels-last" in self.optimizations
        self._memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        info = {
            "model": ckpt.get("model"),
            "step": ckpt.get("step"),
            "metrics": ckpt.get("metrics"),
            "source": ckpt.get("source"),  # a converted pretrained model's origin and licence
            "inference": ckpt.get("inference"),  # its recorded protocol (urbanseg.inference.protocol)
            # for evaluate's report, so it need not read the checkpoint again
            "summary": summarize_checkpoint(ckpt),
            "training_config": ckpt.get("config"),
        }
        super().__init__(label_set, input_size, Path(path), info)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            images = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            out = self.model(images.contiguous(memory_format=self._memory_format))
        return out.float().cpu().numpy()


class OnnxPredictor(Predictor):
    """An ONNX model written by `urbanseg export`, run with ONNX Runtime (no PyTorch)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise UserError(f"ONNX model {path} does not exist; write one with `urbanseg export --run runs/NAME`")
        try:
            self.session = ort.InferenceSession(str(path), providers=_ort_providers(ort))
        except Exception as e:
            raise UserError(f"cannot load ONNX model {path}: {e}") from None
        meta = OnnxMetadata.parse(self.session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY), path)
        (inp,) = self.session.get_inputs()
        self.input_name = inp.name
        h, w = inp.shape[2], inp.shape[3]
        fixed = (w, h) if isinstance(h, int) and isinstance(w, int) else None
        classes = self.session.get_outputs()[0].shape[1]
        if isinstance(classes, int) and classes != meta.label_set.num_classes:
            raise UserError(
                f"ONNX model {path} outputs {classes} classes, its metadata's label set "
                f"{meta.label_set.name!r} has {meta.label_set.num_classes}; export it again with "
                "`urbanseg export`"
            )
        info = {**meta.info, "epoch": meta.epoch, "urbanseg_version": meta.urbanseg_version}
        super().__init__(meta.label_set, meta.input_size, Path(path), info, fixed)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def _ort_providers(ort: Any) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]

"""The metadata an exported ONNX model carries (written by `urbanseg export`, read by
`urbanseg predict --model`): one JSON object under ``metadata_props["urbanseg"]`` with the
label set, input size [W, H], normalisation, model name and arguments, step, epoch and
metrics of the checkpoint, opset and whether sizes are dynamic; for a converted pretrained
model also its `source` (origin, licence) and `inference` protocol; for an int8 model
(`urbanseg export --quantize int8`) also ``quantization``: how it was calibrated and its
val mIoU before (fp32) and after (int8).

Format 1 has no ``quantization``; format 2 adds it (written only when present, so an
fp32 export stays readable by an urbanseg that knows format 1 only).

Only the standard library and numpy are imported: ONNX Runtime users need no PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from urbanseg import __version__
from urbanseg.labels import LabelSet
from urbanseg.schema import FormatError, Node, check_version

ONNX_META_KEY = "urbanseg"
FORMAT_VERSION = 2
_FIX = "export it again with `urbanseg export`, or predict from the checkpoint with --checkpoint"


def read_entry(path: Path) -> str | None:
    """The text of ONNX file `path`'s urbanseg metadata entry; None when the file is not
    an ONNX model or has none (not one urbanseg wrote)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    return next((entry.value for entry in proto.metadata_props if entry.key == ONNX_META_KEY), None)


def _current_version() -> str:

    return __version__


@dataclass(frozen=True)
class Quantization:
    """How an int8 model was made and what it scores: `dtype` "int8"; `method` (e.g.
    "onnxruntime static QDQ, per-channel int8 weights, uint8 activations, MinMax");
    calibration on `calibration_images` images of split `calibration_split`; on
    `val_images` images of split `val_split`: mIoU of the fp32 model (`miou_fp32`), of
    the int8 model (`miou_int8`) and the share of pixels whose argmax agrees
    (`agreement`); `float_nodes`: compute nodes deliberately left in float."""

    dtype: str
    method: str
    calibration_split: str
    calibration_images: int
    val_split: str
    val_images: int
    miou_fp32: float | None
    miou_int8: float | None
    agreement: float
    float_nodes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, doc: Node) -> Quantization:
        doc.obj()

        def share(n: Node) -> float:
            value = n.number()
            if not 0.0 <= value <= 1.0:
                raise n.error("a number between 0 and 1")
            return value

        return cls(
            dtype=doc["dtype"].text(choices=("int8",)),
            method=doc["method"].text(),
            calibration_split=doc["calibration_split"].text(),
            calibration_images=doc["calibration_images"].integer(min=1),
            val_split=doc["val_split"].text(),
            val_images=doc["val_images"].integer(min=0),
            miou_fp32=doc["miou_fp32"].maybe(share),
            miou_int8=doc["miou_int8"].maybe(share),
            agreement=share(doc["agreement"]),
            float_nodes=doc["float_nodes"].maybe(Node.texts) or [],
        )


@dataclass(frozen=True)
class OnnxMetadata:
    """What a predictor needs besides the graph. `model` is {"name", "kwargs"},
    `normalization` {"mean", "std"} on the 0..255 scale (informative: the graph
    normalises inside)."""

    label_set: LabelSet
    input_size: tuple[int, int]
    model: dict[str, Any]
    normalization: dict[str, Any] | None = None
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, Any] | None = None
    checkpoint: str | None = None
    opset: int | None = None
    dynamic: bool | None = None
    source: dict[str, Any] | None = None
    inference: dict[str, Any] | None = None
    urbanseg_version: str = field(default_factory=_current_version)
    quantization: Quantization | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], source: Path, opset: int, dynamic: bool) -> OnnxMetadata:
        """From a loaded (validated) checkpoint dict."""
        return cls(
            label_set=LabelSet.from_dict(ckpt["label_set"]),
            input_size=tuple(ckpt["input_size"]),
            model=ckpt["model"],
            normalization=ckpt.get("normalization"),
            step=ckpt.get("step"),
            epoch=ckpt.get("epoch"),
            metrics=ckpt.get("metrics"),
            checkpoint=str(source),
            opset=opset,
            dynamic=dynamic,
            source=ckpt.get("source"),
            inference=ckpt.get("inference"),
        )

    def to_dict(self) -> dict[str, Any]:
        extra = {"quantization": self.quantization.to_dict()} if self.quantization is not None else {}
        return {
            # The lowest format that holds the content: format 1 readers read fp32 exports.
            "format_version": FORMAT_VERSION if extra else 1,
            "urbanseg_version": self.urbanseg_version,
            "model": self.model,
            "label_set": self.label_set.to_dict(),
            "input_size": list(self.input_size),
            "normalization": self.normalization,
            "step": self.step,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "checkpoint": self.checkpoint,
            "opset": self.opset,
            "dynamic": self.dynamic,
            "source": self.source,
            "inference": self.inference,
            "input": "image: float32 (N, 3, H, W), RGB, 0..255 (normalised inside)",
            "output": "logits: float32 (N, C, H, W)",
            **extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @property
    def info(self) -> dict[str, Any]:
        """What a Predictor shows about its model."""
        info = {
            "model": self.model,
            "step": self.step,
            "metrics": self.metrics,
            "opset": self.opset,
            "source": self.source,
            "inference": self.inference,
        }
        if self.quantization is not None:
            info["quantization"] = self.quantization.to_dict()
        return info

    @classmethod
    def parse(cls, text: str | None, file: Path | str) -> OnnxMetadata:
        """The metadata string of ONNX model `file` (None when it has none), checked:
        FormatError naming the file, the field and the fix."""
        where = f"ONNX model {file}"
        if text is None:
            raise FormatError(f"{where} has no {ONNX_META_KEY!r} metadata (label set, input size); {_FIX}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{where}: its {ONNX_META_KEY!r} metadata is not JSON ({e}); {_FIX}") from None
        return cls.read(Node.root(value, file=f"{where} metadata", fix=_FIX))

    @classmethod
    def read(cls, doc: Node) -> OnnxMetadata:
        doc.obj()
        check_version(doc, FORMAT_VERSION, "metadata")
        model = doc["model"]
        model["name"].text()
        model["kwargs"].obj()
        return cls(
            label_set=LabelSet.read(doc["label_set"]),
            input_size=tuple(doc["input_size"].ints(length=2, min=1)),  # type: ignore[arg-type]
            model=model.obj(),
            normalization=doc["normalization"].maybe(Node.obj),
            step=doc["step"].maybe(lambda n: n.integer(min=0)),
            epoch=doc["epoch"].maybe(lambda n: n.integer(min=0)),
            metrics=doc["metrics"].maybe(Node.obj),
            checkpoint=doc["checkpoint"].maybe(Node.text),
            opset=doc["opset"].maybe(lambda n: n.integer(min=1)),
            dynamic=doc["dynamic"].maybe(Node.boolean),
            source=doc["source"].maybe(Node.obj),
            inference=doc["inference"].maybe(Node.obj),
            urbanseg_version=doc["urbanseg_version"].maybe(Node.text) or "unknown",
            quantization=doc["quantization"].maybe(Quantization.read),
        )

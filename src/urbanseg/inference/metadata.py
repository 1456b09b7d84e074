"""The metadata an exported ONNX model carries (written by `urbanseg export`, read by
`urbanseg predict --model`): one JSON object under ``metadata_props["urbanseg"]`` with the
label set, input size [W, H], normalisation, model name and arguments, step, epoch and
metrics of the checkpoint, opset and whether sizes are dynamic; for a converted pretrained
model also its `source` (origin, licence) and `inference` protocol.

Only the standard library and numpy are imported: ONNX Runtime users need no PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from urbanseg import __version__
from urbanseg.labels import LabelSet
from urbanseg.schema import FormatError, Node, check_version

ONNX_META_KEY = "urbanseg"
FORMAT_VERSION = 1
_FIX = "export it again with `urbanseg export`, or predict from the checkpoint with --checkpoint"


def _current_version() -> str:

    return __version__


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
        return {
            "format_version": FORMAT_VERSION,
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
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @property
    def info(self) -> dict[str, Any]:
        """What a Predictor shows about its model."""
        return {
            "model": self.model,
            "step": self.step,
            "metrics": self.metrics,
            "opset": self.opset,
            "source": self.source,
            "inference": self.inference,
        }

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
        )

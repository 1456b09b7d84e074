"""The pretrained Cityscapes models urbanseg offers: one table (`PRETRAINED`), the source of
`urbanseg models --pretrained`, of the model table in docs/pretrained.md and of the
facts `urbanseg import` writes into a converted checkpoint (licence, protocol, score).

Where the facts come from:
- Weights: every row is one of NVIDIA's SegFormer releases (NVlabs/SegFormer), trained on
  Cityscapes for 160k iterations; smp-hub converted them with smp's script
  scripts/models-conversions/segformer-original-decoder-to-smp.py, Hugging Face hosts
  them as nvidia/segformer-*-finetuned-cityscapes-*. Neither card states a score.
- Licence: NVIDIA Source Code License for SegFormer, non-commercial use (research or
  evaluation) only; both hubs label the weights "license: other".
- Protocol (test_cfg of NVlabs' configs local_configs/segformer/B*/segformer.b*.*.city.160k.py):
  1024x1024 crops are scored with a 1024x1024 sliding window, stride 768x768, on the
  full 2048x1024 image; the 512x1024 crop with the whole image resized to 1024x512.
- mIoU (Cityscapes val, single scale): mmsegmentation's model zoo, which trained the
  same recipe (1024x1024 crops, 160k iterations, sliding window) itself; NVIDIA's own
  weights are not scored there. No checked figure for the 512x1024 crop.
- Download size: the hub's file list for smp B0-B2 (14.9, 54.7, 109 MB); the others are
  4 bytes per fp32 parameter, which those three match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

MMSEG_ZOO = "https://github.com/open-mmlab/mmsegmentation/tree/main/configs/segformer"
NVLABS = "https://github.com/NVlabs/SegFormer"


@dataclass(frozen=True)
class Licence:
    name: str
    url: str
    non_commercial: bool
    summary: str


NVIDIA_SEGFORMER = Licence(
    name="NVIDIA Source Code License for SegFormer",
    url=f"{NVLABS}/blob/master/LICENSE",
    non_commercial=True,
    summary="non-commercial use only (research or evaluation)",
)


@dataclass(frozen=True)
class Protocol:
    """How the model is run on a full image, as it was scored: "whole" resizes the image
    to `size` (W, H); "slide" runs `size` (W, H) windows every `stride` (W, H) pixels over
    the image at its own resolution and averages the overlapping logits."""

    mode: Literal["whole", "slide"]
    size: tuple[int, int]
    stride: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "size": list(self.size)}
        if self.stride is not None:
            out["stride"] = list(self.stride)
        return out

    def describe(self) -> str:
        if self.mode == "slide" and self.stride is not None:
            return (
                f"sliding window {self.size[0]}x{self.size[1]}, stride {self.stride[0]}x{self.stride[1]}, "
                f"at full resolution"
            )
        return f"whole image resized to {self.size[0]}x{self.size[1]}"


@dataclass(frozen=True)
class PretrainedModel:
    """One pretrained Cityscapes model (19 classes, Cityscapes trainIds)."""

    source: str  # what to pass to `urbanseg import`: an smp-hub id or "hf:<id>"
    library: Literal["smp", "transformers"]
    architecture: str
    params_m: float  # parameters, millions
    crop: tuple[int, int]  # training crop (W, H)
    protocol: Protocol
    miou: float | None  # published Cityscapes val mIoU, percent
    miou_source: str
    licence: Licence
    download_mb: float
    card: str

    @property
    def repo_id(self) -> str:
        return self.source.removeprefix("hf:")


_WHOLE_512 = Protocol("whole", (1024, 512))
_SLIDE_1024 = Protocol("slide", (1024, 1024), (768, 768))
# variant -> (parameters (M), mmsegmentation's mIoU at 1024x1024, fp32 size (MB))
_VARIANTS = {
    "b0": (3.72, 76.54, 14.9),
    "b1": (13.68, 78.56, 54.7),
    "b2": (27.36, 81.08, 109.0),
    "b3": (47.24, 81.94, 189.0),
    "b4": (64.01, 81.89, 256.0),
    "b5": (84.61, 82.25, 338.4),
}


def _row(source: str, variant: str, crop: tuple[int, int]) -> PretrainedModel:
    params, miou, size = _VARIANTS[variant]
    slide = crop == (1024, 1024)
    library: Literal["smp", "transformers"] = "transformers" if source.startswith("hf:") else "smp"
    return PretrainedModel(
        source=source,
        library=library,
        architecture=f"SegFormer-{variant.upper()}",
        params_m=params,
        crop=crop,
        protocol=_SLIDE_1024 if slide else _WHOLE_512,
        miou=miou if slide else None,
        miou_source=MMSEG_ZOO if slide else "",
        licence=NVIDIA_SEGFORMER,
        download_mb=size,
        card=f"https://huggingface.co/{source.removeprefix('hf:')}",
    )


_ROWS = (
    [_row("smp-hub/segformer-b0-512x1024-city-160k", "b0", (1024, 512))]
    + [_row(f"smp-hub/segformer-{v}-1024x1024-city-160k", v, (1024, 1024)) for v in _VARIANTS]
    + [_row("hf:nvidia/segformer-b0-finetuned-cityscapes-512-1024", "b0", (1024, 512))]
    + [_row(f"hf:nvidia/segformer-{v}-finetuned-cityscapes-1024-1024", v, (1024, 1024)) for v in _VARIANTS]
)
# source -> model. The one list of pretrained models (listing, docs, import).
PRETRAINED: dict[str, PretrainedModel] = {row.source: row for row in _ROWS}


def find_pretrained(source: str) -> PretrainedModel | None:
    """The table's row for `source` ("hf:" optional for the transformers rows)."""
    return PRETRAINED.get(source) or PRETRAINED.get(f"hf:{source}")


def licence_line(licence: Licence) -> str:
    return f"{licence.name}: {licence.summary} ({licence.url})"


def pretrained_table() -> str:
    """The Markdown table `urbanseg models --pretrained` prints (and docs/pretrained.md holds)."""
    header = (
        "| source (`urbanseg import SOURCE`) | architecture | params (M) | crop (WxH) | inference protocol "
        "| Cityscapes val mIoU | licence | download (MB) |"
    )
    rows = [header, "|-|-|-|-|-|-|-|-|"]
    for m in PRETRAINED.values():
        miou = f"{m.miou:.2f} [mmseg zoo]" if m.miou is not None else "-"
        licence = "non-commercial" if m.licence.non_commercial else m.licence.name
        rows.append(
            f"| `{m.source}` | {m.architecture} | {m.params_m:.2f} | {m.crop[0]}x{m.crop[1]} | "
            f"{m.protocol.describe()} | {miou} | {licence} | {m.download_mb:.1f} |"
        )
    return "\n".join(rows)


def table_notes() -> str:
    """The lines under the table: sources of the figures and the licence."""
    return "\n".join(
        [
            (
                f"mIoU [mmseg zoo]: {MMSEG_ZOO} (same recipe, trained by mmsegmentation: 1024x1024 crops, "
                f"160k iterations, sliding window; NVIDIA's released weights are not scored there)."
            ),
            (
                f"Weights: NVIDIA's SegFormer release ({NVLABS}); `smp-hub/...` through segmentation-models-pytorch, "
                f"`hf:...` through transformers (pip install 'urbanseg[hf]')."
            ),
            f"Licence of every row: {licence_line(NVIDIA_SEGFORMER)}.",
        ]
    )


def source_facts(model: PretrainedModel) -> dict[str, Any]:
    """The table's facts about `model` as plain data, for a checkpoint's "source" entry."""
    return {
        "architecture": model.architecture,
        "card": model.card,
        "crop": list(model.crop),
        "licence": model.licence.name,
        "licence_url": model.licence.url,
        "licence_summary": model.licence.summary,
        "non_commercial": model.licence.non_commercial,
    }

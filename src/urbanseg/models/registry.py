"""Segmentation models by name: `create_model(name, num_classes)` from the plain dict `MODELS`.

Every model is wrapped in `SegmentationModel`, which fixes the contract the rest of
urbanseg relies on: it takes float32 (N, 3, H, W) images with values 0..255 (a uint8
batch `.float()`), normalises them inside with the model's mean/std (ImageNet's, or an
imported model's own), pads H and W to the network's stride, and returns float32 logits
(N, num_classes, H, W) at the input size. `model.model_args` ({"name", "kwargs"})
rebuilds the architecture; the weights come from a state dict (see `urbanseg.checkpoint`).

`IMPORTED` holds the families that rebuild a pretrained model from its library's own
config (written by `urbanseg import`): not trainable by name, so not in `MODELS`, which
`urbanseg models`, the benchmarks and the per-model tests walk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from urbanseg.errors import UserError
from urbanseg.models.builders import (
    Built,
    HfConfigBuilder,
    LrasppBuilder,
    SmpBuilder,
    SmpConfigBuilder,
    UNetOriginalBuilder,
)
from urbanseg.models.hub import hf_hub_cache, hub_offline, hub_reachable
from urbanseg.torchfile import torch_load
from urbanseg.util import atomic_path

_MBV3, _MBV4 = "tu-mobilenetv3_large_100", "tu-mobilenetv4_conv_small"
# name -> builder. The one list of model names (the CLI, the benchmark and the tests read it).
MODELS: dict[str, Any] = {
    "unet-original": UNetOriginalBuilder(),
    "unet-resnet18": SmpBuilder("Unet", "resnet18", "smp U-Net, ResNet-18 encoder"),
    "unet-mobilenetv3": SmpBuilder("Unet", _MBV3, "smp U-Net, timm MobileNetV3-Large encoder"),
    "fpn-resnet18": SmpBuilder("FPN", "resnet18", "smp FPN, ResNet-18 encoder"),
    "fpn-mobilenetv3": SmpBuilder("FPN", _MBV3, "smp FPN, timm MobileNetV3-Large encoder"),
    "fpn-mobilenetv4": SmpBuilder("FPN", _MBV4, "smp FPN, timm MobileNetV4-Conv-Small encoder"),
    "deeplabv3plus-resnet18": SmpBuilder("DeepLabV3Plus", "resnet18", "smp DeepLabV3+, ResNet-18 encoder"),
    "deeplabv3plus-mobilenetv3": SmpBuilder("DeepLabV3Plus", _MBV3, "smp DeepLabV3+, timm MobileNetV3-Large encoder"),
    "deeplabv3plus-mobilenetv4": SmpBuilder(
        "DeepLabV3Plus", _MBV4, "smp DeepLabV3+, timm MobileNetV4-Conv-Small encoder"
    ),
    "segformer-mit_b0": SmpBuilder("Segformer", "mit_b0", "smp SegFormer, MiT-B0 encoder"),
    "lraspp-mobilenetv3": LrasppBuilder(),
}
# name -> builder of an imported model (`urbanseg import`): smp's or transformers' own config
# in the kwargs ("arch"/"config"), with the model's own "mean"/"std".
IMPORTED: dict[str, Any] = {"smp": SmpConfigBuilder(), "hf": HfConfigBuilder()}
# Chosen by measurement (see benchmarks/bench_models.py and the README): at least 20x
# faster than unet-original at 512x256 on the CPU.
DEFAULT_MODEL = "lraspp-mobilenetv3"


class SegmentationModel(nn.Module):
    """(N, 3, H, W) float images 0..255 -> (N, num_classes, H, W) float logits.

    Normalises with `mean`/`std` (buffers, 0..255 scale, from the builder), pads the bottom and right
    edges to a multiple of `stride` with zeros *after* normalisation (i.e. with the mean
    colour, as mmsegmentation does), runs `net` and crops the logits back.
    """

    mean: torch.Tensor  # (1, 3, 1, 1) buffers
    std: torch.Tensor
    model_args: dict[str, Any]

    def __init__(self, name: str, built: Built, num_classes: int, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.net = built.net
        self.stride = built.stride
        self.head_prefixes = tuple("net." + p for p in built.head_prefixes)  # keys in self.state_dict()
        self.model_args = {"name": name, "kwargs": {"num_classes": num_classes, **kwargs}}
        self.encoder_weights: str | None = None  # provenance only, set by create_model
        self._encoder = [built.encoder]  # a list so it is not registered twice as a submodule
        self.register_buffer("mean", torch.tensor(built.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(built.std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def num_classes(self) -> int:
        return self.model_args["kwargs"]["num_classes"]

    @property
    def encoder(self) -> nn.Module:
        """The pretrained part (smp encoder, torchvision backbone, U-Net down path)."""
        return self._encoder[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            images = images.float()
        h, w = images.shape[-2:]
        # (images - mean) / std as one batch-norm pass (running var = std^2, eps 0): the same
        # values (to float rounding), but one ONNX BatchNormalization instead of a Sub and
        # a Div over the whole picture (half the time of that step in ONNX Runtime).
        x = F.batch_norm(images, self.mean.view(-1), self.std.view(-1) ** 2, eps=0.0)
        if self.stride == 1:  # nothing to pad, nothing to crop (no copies in an ONNX export)
            return self.net(x)
        pad_h, pad_w = (-h) % self.stride, (-w) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.net(x)[..., :h, :w]


def create_model(
    name: str, num_classes: int, *, encoder_weights: str | None = None, **kwargs: Any
) -> SegmentationModel:
    """Build model `name` (a key of `MODELS`, or of `IMPORTED` with that family's config
    in kwargs) with a new `num_classes`-way head.

    encoder_weights: None (random init), "imagenet" (the libraries' own download, cached
    under ~/.cache; offline, only what is cached, failing at once otherwise), or the path
    of a local state dict for the encoder / backbone (see `save_encoder_weights`). Other
    kwargs go to the builder (e.g. `base_channels` for unet-original, `decoder_channels`
    for smp models) and are kept in `model_args`.
    """
    builder = MODELS.get(name) or IMPORTED.get(name)
    if builder is None:
        raise UserError(
            f"unknown model {name!r}; valid names: {', '.join(MODELS)} "
            f"(pretrained models come from `urbanseg import`, see `urbanseg models --pretrained`)"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    local = None
    if encoder_weights not in (None, "imagenet"):
        local = Path(encoder_weights)
        if not local.is_file():
            raise UserError(
                f"--encoder-weights {encoder_weights!r}: expected 'imagenet' or an existing "
                f"weights file (a state dict saved with urbanseg.models.save_encoder_weights)"
            )
    try:
        built = (
            _build_imagenet(builder, num_classes, kwargs)
            if encoder_weights == "imagenet"
            else builder(num_classes, False, **kwargs)
        )
    except TypeError as e:
        raise UserError(f"model {name!r} does not accept the arguments {sorted(kwargs)}: {e}") from e
    except UserError:
        raise
    except Exception as e:  # the architecture builds without weights, so this is the download
        if encoder_weights != "imagenet":
            raise
        raise UserError(_offline_message(name, e)) from e
    model = SegmentationModel(name, built, num_classes, kwargs)
    if local is not None:
        load_encoder_weights(model, local)
    model.encoder_weights = None if encoder_weights is None else str(encoder_weights)
    return model


def _build_imagenet(builder: Any, num_classes: int, kwargs: dict[str, Any]) -> Built:
    """Build with the libraries' ImageNet weights. When the hub cannot be reached, build
    in the hub's offline mode: cached weights still load, missing ones fail at once
    instead of after huggingface_hub's ~25 s of connection retries."""

    if hub_reachable():
        return builder(num_classes, True, **kwargs)
    with hub_offline():
        return builder(num_classes, True, **kwargs)


def _offline_message(name: str, error: Exception) -> str:

    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return (
        f"could not get the ImageNet weights for {name!r} ({type(error).__name__}: {first_line}). "
        f"The libraries download them on first use (into {hf_hub_cache()} or ~/.cache/torch), "
        f"which needs internet access. Offline: on a machine with internet run\n"
        f'  python -c "from urbanseg.models import create_model, save_encoder_weights; '
        f"save_encoder_weights(create_model('{name}', 1, encoder_weights='imagenet'), '{name}-imagenet.pth')\"\n"
        f"copy {name}-imagenet.pth here and pass --encoder-weights {name}-imagenet.pth "
        f"(or copy the cache folder), or leave --encoder-weights unset to train from scratch."
    )


def save_encoder_weights(model: SegmentationModel, path: Path | str) -> None:
    """Save the encoder's state dict (the file `--encoder-weights PATH` reads), atomically."""
    with atomic_path(path) as tmp:
        torch.save(model.encoder.state_dict(), tmp)


# Prefixes under which an encoder's weights appear in common checkpoint files: ours, smp,
# torchvision (features./backbone.), timm inside smp (model.), DataParallel (module.).
_PREFIXES = (
    "",
    "net.encoder.",
    "net.backbone.",
    "net.net.backbone.",
    "encoder.",
    "backbone.",
    "features.",
    "model.",
    "module.",
)


def load_encoder_weights(model: SegmentationModel, path: Path | str) -> None:
    """Load a local state dict into `model.encoder`. Accepts the encoder's own keys or
    the keys of a whole-model file with a known prefix; keys of other parts (e.g. an
    ImageNet classifier) are ignored. Missing or mis-shaped encoder weights -> UserError."""
    state = torch_load(
        path,
        what="encoder weights file",
        fix="give a plain state dict (tensors only), e.g. from urbanseg.models.save_encoder_weights",
    )
    for key in ("model_state", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"encoder weights {path}: expected a state dict, got {type(state).__name__}")
    target = model.encoder.state_dict()
    best: dict[str, Any] = {}
    for strip in _PREFIXES:
        for add in _PREFIXES:
            cand = {add + k[len(strip) :]: v for k, v in state.items() if k.startswith(strip)}
            if len(cand.keys() & target.keys()) > len(best.keys() & target.keys()):
                best = cand
    missing = [k for k in target if k not in best and not k.endswith("num_batches_tracked")]
    wrong = [k for k in target if k in best and best[k].shape != target[k].shape]
    if missing or wrong:
        raise UserError(
            f"encoder weights {path} do not fit {model.model_args['name']}: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]}); "
            f"save them from the same model with urbanseg.models.save_encoder_weights"
        )
    model.encoder.load_state_dict({k: best.get(k, v) for k, v in target.items()})


def model_stats(name: str, size: tuple[int, int], num_classes: int = 8) -> tuple[int, int]:
    """(parameters, FLOPs) of model `name` for one (1, 3, H, W) forward pass at size (W, H).

    FLOPs as counted by torch.utils.flop_counter (2 per multiply-add; convolutions and
    matmuls only). The pass runs on the meta device: shapes only, no compute."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(name, num_classes).to("meta").eval()
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, size[1], size[0], device="meta"))
    return params, counter.get_total_flops()

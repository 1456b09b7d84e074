"""The architectures behind the model names: each builder returns the bare network, its
output stride, its encoder and the prefixes of its classification head.

segmentation-models-pytorch and torchvision supply the networks; the original project's
plain U-Net is kept here for comparison. `SmpConfigBuilder` and `HfConfigBuilder` rebuild
imported pretrained models (`urbanseg import`) from the library's own config.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from urbanseg.errors import UserError

# ImageNet statistics on the 0..255 scale, as used by every pretrained encoder here
# (torchvision, timm and smp all train their ImageNet weights with these).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class Built(NamedTuple):
    """What a builder returns: the bare network (normalised, stride-aligned input ->
    logits (N, C, H, W)), its stride, its encoder (for local weights files), the
    prefixes of its classification head in `net.state_dict()` (replaced by `--init`) and
    the mean/std (0..255 scale) its input is normalised with."""

    net: nn.Module
    stride: int
    encoder: nn.Module
    head_prefixes: tuple[str, ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


class SmpBuilder:
    """A segmentation-models-pytorch architecture with a given encoder."""

    def __init__(self, arch: str, encoder: str, description: str) -> None:
        self.arch, self.encoder, self.description = arch, encoder, description

    def __call__(self, num_classes: int, pretrained: bool, **kwargs: Any) -> Built:
        import segmentation_models_pytorch as smp

        # timm-universal ("tu-") encoders take True; smp's own encoders take a tag.
        weights = (True if self.encoder.startswith("tu-") else "imagenet") if pretrained else None
        net = smp.create_model(
            self.arch, encoder_name=self.encoder, encoder_weights=weights, classes=num_classes, **kwargs
        )
        return Built(net, net.encoder.output_stride, net.encoder, ("segmentation_head.",))


class _LogitsOnly(nn.Module):
    """torchvision segmentation models return {"out": logits}; keep only the tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


class LrasppBuilder:
    """torchvision's LR-ASPP on a MobileNetV3-Large backbone."""

    description = "torchvision LR-ASPP, MobileNetV3-Large backbone (Howard et al. 2019)"

    def __call__(self, num_classes: int, pretrained: bool, **kwargs: Any) -> Built:
        from torchvision.models import MobileNet_V3_Large_Weights
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        backbone = MobileNet_V3_Large_Weights.IMAGENET1K_V1 if pretrained else None
        net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=backbone, num_classes=num_classes, **kwargs)
        # torchvision's MobileNetV3 uses BatchNorm momentum 0.01 (long ImageNet schedules):
        # after a short CPU training the eval-mode statistics still lag far behind and the
        # model predicted one class on the demo's validation set (pixel accuracy 0.36 vs
        # 0.66 after recalibrating them). PyTorch's default 0.1, as in every other model here.
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
        # The backbone is dilated (output stride 16) and the head upsamples its two branches
        # to each other's size and the logits to the input size itself, so any input size
        # works without padding: stride 1. (With 16, every ONNX export carried a Pad and two
        # crops of the full-resolution logits, copies that cost ~8 % of a 2048x1024 run
        # even when, as for every Cityscapes size, nothing needs padding.)
        heads = ("net.classifier.low_classifier.", "net.classifier.high_classifier.")  # inside _LogitsOnly
        return Built(_LogitsOnly(net), 1, net.backbone, heads)


def _double_conv(cin: int, cout: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNetOriginal(nn.Module):
    """The original project's plain U-Net (Ronneberger et al. 2015, 'same' padding):
    5 levels of two 3x3 conv(+BN)+ReLU with `base` * (1, 2, 4, 8, 16) channels (64 ->
    1024), 2x2 max-pool down, 2x2 transposed conv up, skip concatenation, 1x1 head.
    (N, 3, H, W) with H, W multiples of 16 -> (N, num_classes, H, W)."""

    def __init__(self, num_classes: int, base: int = 64, batch_norm: bool = True) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(5)]
        ins = [3, *widths[:-1]]
        self.encoder = nn.ModuleList(_double_conv(i, o, batch_norm) for i, o in zip(ins, widths, strict=True))
        self.up = nn.ModuleList(nn.ConvTranspose2d(w, w // 2, 2, stride=2) for w in widths[:0:-1])
        self.decoder = nn.ModuleList(_double_conv(w, w // 2, batch_norm) for w in widths[:0:-1])
        self.head = nn.Conv2d(base, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


class UNetOriginalBuilder:
    description = "the original project's plain U-Net, 64->1024 channels (kept for comparison)"

    def __call__(self, num_classes: int, pretrained: bool, base_channels: int = 64, batch_norm: bool = True) -> Built:
        if pretrained:
            raise UserError(
                "unet-original has no pretrained weights; leave --encoder-weights unset "
                "(or pass a local encoder weights file, or fine-tune with --init CHECKPOINT)"
            )
        if base_channels < 1:
            raise UserError(f"unet-original: base_channels {base_channels} must be >= 1")
        net = UNetOriginal(num_classes, base_channels, batch_norm)
        return Built(net, 16, net.encoder, ("head.",))


# ---------------------------------------------------------------- imported pretrained models


def _no_imagenet(pretrained: bool, family: str) -> None:
    if pretrained:
        raise UserError(
            f"{family} models bring their own weights: import them with `urbanseg import SOURCE` "
            f"and fine-tune with --init, instead of --encoder-weights imagenet"
        )


def _normalisation(mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean_t, std_t = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean_t) != 3 or len(std_t) != 3 or min(std_t) <= 0:
        raise UserError(f"mean {list(mean_t)} / std {list(std_t)}: need 3 values each, std > 0 (0..255 scale)")
    return mean_t, std_t


def _heads(net: nn.Module, num_classes: int) -> tuple[str, ...]:
    """Prefixes of the layers that output the class scores (a conv or linear layer with
    `num_classes` outputs): what `--init` replaces for another label set."""
    heads = tuple(
        f"{name}."
        for name, m in net.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        and getattr(m, "out_channels", getattr(m, "out_features", None)) == num_classes
    )
    if not heads:
        raise UserError(f"found no layer with {num_classes} outputs (the classifier) in {type(net).__name__}")
    return heads


class SmpConfigBuilder:
    """Any segmentation-models-pytorch model from the config `save_pretrained` writes
    (its class name, e.g. "Segformer", and the constructor's keyword arguments): how an
    smp-hub model is rebuilt without a download. The class count comes from num_classes;
    `activation` is dropped (urbanseg wants logits; argmax is unchanged)."""

    description = "a segmentation-models-pytorch model rebuilt from its hub config (imported)"

    def __call__(
        self,
        num_classes: int,
        pretrained: bool,
        *,
        arch: str,
        config: dict[str, Any],
        mean: Any = IMAGENET_MEAN,
        std: Any = IMAGENET_STD,
    ) -> Built:
        import segmentation_models_pytorch as smp
        from segmentation_models_pytorch.base import SegmentationModel as SmpModel

        _no_imagenet(pretrained, "smp hub")
        cls = getattr(smp, arch, None)
        if not (isinstance(cls, type) and issubclass(cls, SmpModel)):
            raise UserError(
                f"{arch!r} is not a segmentation-models-pytorch architecture "
                f"(smp {smp.__version__}); expected e.g. Segformer, Unet, FPN"
            )
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        kwargs.update(encoder_weights=None, classes=num_classes, activation=None)
        net = cls(**kwargs)
        heads = ("segmentation_head.",) + (("classification_head.",) if net.classification_head is not None else ())
        return Built(net, net.encoder.output_stride, net.encoder, heads, *_normalisation(mean, std))


class _HfLogits(nn.Module):
    """A transformers semantic-segmentation model as a plain logits network: its
    `.logits` (SegFormer: at 1/4 resolution) upsampled bilinearly to the input size with
    align_corners=False, as its image processor's post_process_semantic_segmentation does."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(pixel_values=x).logits
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


# Keys of a transformers config that are not architecture: the label names (urbanseg keeps
# them in the label set), the class count (num_classes) and bookkeeping.
_HF_DROP = (
    "id2label",
    "label2id",
    "num_labels",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "_commit_hash",
    "_attn_implementation_autoset",
)


def hf_architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture part of a transformers config dict (what HfConfigBuilder takes)."""
    return {k: v for k, v in config.items() if k not in _HF_DROP}


class HfConfigBuilder:
    """Any transformers `AutoModelForSemanticSegmentation` whose output is per-pixel logits,
    from its config dict (`AutoConfig.for_model(model_type, **config)`); needs the extra
    `pip install 'urbanseg[hf]'`. Stride 1: these models take any size themselves."""

    description = "a Hugging Face transformers semantic-segmentation model rebuilt from its config (imported)"

    def __call__(
        self,
        num_classes: int,
        pretrained: bool,
        *,
        config: dict[str, Any],
        mean: Any = IMAGENET_MEAN,
        std: Any = IMAGENET_STD,
    ) -> Built:
        _no_imagenet(pretrained, "Hugging Face")
        try:
            from transformers import AutoConfig, AutoModelForSemanticSegmentation
        except ImportError:
            raise UserError("this model needs Hugging Face transformers: pip install 'urbanseg[hf]'") from None
        if "model_type" not in config:
            raise UserError(f"a transformers config needs its model_type; got the keys {sorted(config)[:8]}")
        kwargs = {k: v for k, v in hf_architecture(config).items() if k != "model_type"}
        try:
            hf_config = AutoConfig.for_model(config["model_type"], num_labels=num_classes, **kwargs)
            net = AutoModelForSemanticSegmentation.from_config(hf_config)
        except (KeyError, ValueError) as e:
            raise UserError(
                f"transformers cannot build a semantic-segmentation {config['model_type']!r} model "
                f"({e}); update transformers or import another model"
            ) from None
        heads = tuple("net." + p for p in _heads(net, num_classes))  # inside _HfLogits
        return Built(_HfLogits(net), 1, net.base_model, heads, *_normalisation(mean, std))

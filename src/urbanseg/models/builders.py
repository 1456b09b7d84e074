"""The architectures behind the model names: each builder returns the bare network, its
output stride, its encoder and the prefixes of its classification head.

segmentation-models-pytorch and torchvision supply the networks; the original project's
plain U-Net is kept here for comparison.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from urbanseg.errors import UserError


class Built(NamedTuple):
    """What a builder returns: the bare network (normalised, stride-aligned input ->
    logits (N, C, H, W)), its stride, its encoder (for local weights files) and the
    prefixes of its classification head in `net.state_dict()` (replaced by `--init`)."""

    net: nn.Module
    stride: int
    encoder: nn.Module
    head_prefixes: tuple[str, ...]


class SmpBuilder:
    """A segmentation-models-pytorch architecture with a given encoder."""

    def __init__(self, arch: str, encoder: str, description: str) -> None:
        self.arch, self.encoder, self.description = arch, encoder, description

    def __call__(self, num_classes: int, pretrained: bool, **kwargs: Any) -> Built:
        import segmentation_models_pytorch as smp

        # timm-universal ("tu-") encoders take True; smp's own encoders take a tag.
        weights = (True if self.encoder.startswith("tu-") else "imagenet") if pretrained else None
        net = smp.create_model(self.arch, encoder_name=self.encoder, encoder_weights=weights,
                               classes=num_classes, **kwargs)
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
        # The backbone is dilated (output stride 16); the head upsamples to the input size.
        heads = ("net.classifier.low_classifier.", "net.classifier.high_classifier.")  # inside _LogitsOnly
        return Built(_LogitsOnly(net), 16, net.backbone, heads)


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
            raise UserError("unet-original has no pretrained weights; leave --encoder-weights unset "
                            "(or pass a local encoder weights file, or fine-tune with --init CHECKPOINT)")
        if base_channels < 1:
            raise UserError(f"unet-original: base_channels {base_channels} must be >= 1")
        net = UNetOriginal(num_classes, base_channels, batch_norm)
        return Built(net, 16, net.encoder, ("head.",))

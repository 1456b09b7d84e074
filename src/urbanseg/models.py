"""Segmentation models by name: `create_model(name, num_classes)` from the plain dict `MODELS`.

Every model is wrapped in `SegmentationModel`, which fixes the contract the rest of
urbanseg relies on: it takes float32 (N, 3, H, W) images with values 0..255 (a uint8
batch `.float()`), normalises them inside with ImageNet mean/std, pads H and W to the
network's stride, and returns float32 logits (N, num_classes, H, W) at the input size.
`model.model_args` ({"name", "kwargs"}) rebuilds the architecture; the weights come
from a state dict (see `urbanseg.checkpoint`).

`urbanseg models` (`list_models`) prints the names with parameters, FLOPs and the CPU
latency figures measured by `benchmarks/bench_models.py` (stored in model_figures.json).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from urbanseg.errors import UserError

# ImageNet statistics on the 0..255 scale, as used by every pretrained encoder here
# (torchvision, timm and smp all train their ImageNet weights with these).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
FIGURES_PATH = Path(__file__).with_name("model_figures.json")


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
    "deeplabv3plus-mobilenetv4": SmpBuilder("DeepLabV3Plus", _MBV4,
                                            "smp DeepLabV3+, timm MobileNetV4-Conv-Small encoder"),
    "segformer-mit_b0": SmpBuilder("Segformer", "mit_b0", "smp SegFormer, MiT-B0 encoder"),
    "lraspp-mobilenetv3": LrasppBuilder(),
}
# Chosen by measurement (see benchmarks/bench_models.py and the README): at least 20x
# faster than unet-original at 512x256 on the CPU.
DEFAULT_MODEL = "lraspp-mobilenetv3"


class SegmentationModel(nn.Module):
    """(N, 3, H, W) float images 0..255 -> (N, num_classes, H, W) float logits.

    Normalises with `mean`/`std` (buffers, 0..255 scale), pads the bottom and right
    edges to a multiple of `stride` with zeros *after* normalisation (i.e. with the mean
    colour, as mmsegmentation does), runs `net` and crops the logits back.
    """

    def __init__(self, name: str, built: Built, num_classes: int, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.net = built.net
        self.stride = built.stride
        self.head_prefixes = tuple("net." + p for p in built.head_prefixes)  # keys in self.state_dict()
        self.model_args = {"name": name, "kwargs": {"num_classes": num_classes, **kwargs}}
        self.encoder_weights: str | None = None  # provenance only, set by create_model
        self._encoder = [built.encoder]  # a list so it is not registered twice as a submodule
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

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
        x = (images - self.mean) / self.std
        pad_h, pad_w = (-h) % self.stride, (-w) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.net(x)[..., :h, :w]


def create_model(name: str, num_classes: int, *, encoder_weights: str | None = None,
                 **kwargs: Any) -> SegmentationModel:
    """Build model `name` (a key of `MODELS`) with a new `num_classes`-way head.

    encoder_weights: None (random init), "imagenet" (the libraries' own download, cached
    under ~/.cache), or the path of a local state dict for the encoder / backbone (see
    `save_encoder_weights`). Other kwargs go to the builder (e.g. `base_channels` for
    unet-original, `decoder_channels` for smp models) and are kept in `model_args`.
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    local = None
    if encoder_weights not in (None, "imagenet"):
        local = Path(encoder_weights)
        if not local.is_file():
            raise UserError(f"--encoder-weights {encoder_weights!r}: expected 'imagenet' or an existing "
                            f"weights file (a state dict saved with urbanseg.models.save_encoder_weights)")
    try:
        built = MODELS[name](num_classes, encoder_weights == "imagenet", **kwargs)
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


def _offline_message(name: str, error: Exception) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return (
        f"could not get the ImageNet weights for {name!r} ({type(error).__name__}: {first_line}). "
        f"The libraries download them on first use (into ~/.cache/huggingface or ~/.cache/torch), "
        f"which needs internet access. Offline: on a machine with internet run\n"
        f"  python -c \"from urbanseg.models import create_model, save_encoder_weights; "
        f"save_encoder_weights(create_model('{name}', 1, encoder_weights='imagenet'), '{name}-imagenet.pth')\"\n"
        f"copy {name}-imagenet.pth here and pass --encoder-weights {name}-imagenet.pth "
        f"(or copy the cache folder), or leave --encoder-weights unset to train from scratch."
    )


def save_encoder_weights(model: SegmentationModel, path: Path | str) -> None:
    """Save the encoder's state dict (the file `--encoder-weights PATH` reads), atomically."""
    from urbanseg.util import atomic_path

    with atomic_path(path) as tmp:
        torch.save(model.encoder.state_dict(), tmp)


# Prefixes under which an encoder's weights appear in common checkpoint files: ours, smp,
# torchvision (features./backbone.), timm inside smp (model.), DataParallel (module.).
_PREFIXES = ("", "net.encoder.", "net.backbone.", "net.net.backbone.", "encoder.", "backbone.",
             "features.", "model.", "module.")


def load_encoder_weights(model: SegmentationModel, path: Path | str) -> None:
    """Load a local state dict into `model.encoder`. Accepts the encoder's own keys or
    the keys of a whole-model file with a known prefix; keys of other parts (e.g. an
    ImageNet classifier) are ignored. Missing or mis-shaped encoder weights -> UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"encoder weights {path}: not a readable PyTorch state dict ({e})") from e
    for key in ("model_state", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"encoder weights {path}: expected a state dict, got {type(state).__name__}")
    target = model.encoder.state_dict()
    best: dict[str, Any] = {}
    for strip in _PREFIXES:
        for add in _PREFIXES:
            cand = {add + k[len(strip):]: v for k, v in state.items() if k.startswith(strip)}
            if len(cand.keys() & target.keys()) > len(best.keys() & target.keys()):
                best = cand
    missing = [k for k in target if k not in best and not k.endswith("num_batches_tracked")]
    wrong = [k for k in target if k in best and best[k].shape != target[k].shape]
    if missing or wrong:
        raise UserError(
            f"encoder weights {path} do not fit {model.model_args['name']}: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]}); "
            f"save them from the same model with urbanseg.models.save_encoder_weights")
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


def measure_latency(names: Iterable[str], size: tuple[int, int], *, repeats: int = 5, warmup: int = 1,
                    threads: int = 1, desc: str = "latency") -> dict[str, float]:
    """Median CPU latency in ms of a batch-1 forward pass at size (W, H) per model, with
    `threads` intra-op threads (1 by default: on a shared machine, multi-threaded
    small models spend most of their time waiting at thread barriers for a core).

    Each model lives in its own process (no model's memory or thread state can affect
    another's timing), and the models are timed round-robin, one pass each per round,
    so a slow spell on a shared machine hits them all alike and their ratios stay fair."""
    import multiprocessing

    from tqdm import tqdm

    names = list(names)
    ctx = multiprocessing.get_context("spawn")
    workers: dict[str, tuple[Any, Any]] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for n in names:
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_latency_worker, args=(n, size, threads, child), daemon=True)
            proc.start()
            workers[n] = (proc, conn)
            _receive(conn, n, size)  # started one after another: imports are heavy on a small machine
        with tqdm(total=(warmup + repeats) * len(names), desc=desc, dynamic_ncols=True) as bar:
            for r in range(warmup + repeats):
                for n in names:
                    workers[n][1].send(True)
                    ms = _receive(workers[n][1], n, size)
                    if r >= warmup:
                        times[n].append(ms)
                    bar.update()
    finally:
        for proc, conn in workers.values():
            with contextlib.suppress(OSError):
                conn.send(False)
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    return {n: statistics.median(t) for n, t in times.items()}


def _receive(conn: Any, name: str, size: tuple[int, int]) -> Any:
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(f"the latency worker for {name} at {size} died (out of memory?)") from None


def _latency_worker(name: str, size: tuple[int, int], threads: int, conn: Any) -> None:
    """Build `name`, then time one forward pass per request until told to stop."""
    torch.set_num_threads(threads)
    model = create_model(name, 8).eval()
    x = torch.randint(0, 256, (1, 3, size[1], size[0]), dtype=torch.uint8).float()
    conn.send(None)  # ready
    with torch.inference_mode():
        while conn.recv():
            start = time.perf_counter()
            model(x)
            conn.send((time.perf_counter() - start) * 1000)


def load_figures() -> dict[str, Any] | None:
    """The latency figures written by benchmarks/bench_models.py, or None if absent."""
    try:
        return json.loads(FIGURES_PATH.read_text())
    except FileNotFoundError:
        return None


def list_models(config: Any) -> int:
    """`urbanseg models`: print a table of the models (parameters, FLOPs, CPU latency)."""
    from urbanseg.config import parse_size

    size, base = parse_size(config.size), "unet-original"
    key = f"{size[0]}x{size[1]}"
    unknown = [n for n in config.only if n not in MODELS]
    if unknown:
        raise UserError(f"--only {' '.join(unknown)}: unknown model; valid names: {', '.join(MODELS)}")
    names = [n for n in MODELS if n in config.only or not config.only]
    if config.measure:  # the baseline is always timed: speed-ups are ratios within one run
        live = measure_latency(dict.fromkeys([base, *names]), size, repeats=config.repeats, threads=config.threads)
        latency = {n: (live[n], live[base] / live[n]) for n in names}
    else:
        figures = load_figures() or {"models": {}}
        latency = {n: (f[key]["ms"], f[key]["speedup"]) for n, f in figures["models"].items() if key in f}
    rows = [f"| model | params (M) | GFLOPs @ {key} | CPU ms @ {key} | x faster than {base} | description |",
            "|-|-|-|-|-|-|"]
    for name in names:
        params, flops = model_stats(name, size)
        ms, speedup = (f"{latency[name][0]:.0f}", f"{latency[name][1]:.1f}") if name in latency else ("-", "-")
        mark = " (default)" if name == DEFAULT_MODEL else ""
        rows.append(f"| {name}{mark} | {params / 1e6:.2f} | {flops / 1e9:.2f} | {ms} | {speedup} | "
                    f"{MODELS[name].description} |")
    print("\n".join(rows))
    if config.measure:
        print(f"\nlatency measured now: batch 1, median of {config.repeats} runs, {config.threads} thread(s)")
    elif latency:
        print(f"\nlatency from benchmarks/bench_models.py, measured {figures['measured']} on {figures['machine']} "
              f"(batch 1, models timed round-robin); re-measure here with --measure")
    else:
        print(f"\nno latency figures for {key}; measure them here with --measure")
    return 0

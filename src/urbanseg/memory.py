"""Will a command fit in memory? Each stage estimates its peak need from its sizes before any
work, and a size whose estimate exceeds what the machine has is refused with the estimate,
the machine's memory and the fix, instead of the kernel's OOM killer stopping it half-way.

The per-pixel figures are the peak resident-memory growth of one worker, measured by
`benchmarks/bench_checks.py` at 2048x1024 and 4096x2048 (docs/benchmarks.md#pre-flight-checks);
each constant is the highest measured value, rounded up. Training's activation memory depends on the
model and is not estimated: its check is a floor, the tensors no step can do without.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from urbanseg.config import parse_size
from urbanseg.errors import UserError
from urbanseg.util import default_workers

if TYPE_CHECKING:
    from urbanseg.config import PrepareConfig, SynthConfig

SYNTH_BYTES_PER_PIXEL = 50  # one scene: layout masks, render buffers, label/instance/colour images, PNGs
PREPARE_BYTES_PER_RAW_PIXEL = 7  # the decoded photo (BGR) and annotation, the class-index map
PREPARE_BYTES_PER_OUT_PIXEL = 17  # the resized photo, its RGB copy, the labels, the PNG encoders' buffers
# a training step, per pixel of a sample: the uint8 image, its float32 copy, the int64 labels
TRAIN_INPUT_BYTES_PER_PIXEL = 3 + 12 + 8
TRAIN_BYTES_PER_PIXEL_AND_CLASS = 8  # the float32 logits and their gradient


def available_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Memory a new allocation can get now: MemAvailable of /proc/meminfo (free memory plus
    reclaimable cache), capped by the container's limit (cgroup v2 memory.max minus
    memory.current); the physical memory where /proc/meminfo is missing (macOS)."""
    have = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if have is None:
        have = total_bytes()
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            have = min(have, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(have, 0)


def total_bytes() -> int:
    """The machine's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def require(need: int, what: str, fix: str, *, have: int | None = None, where: str = "this machine") -> None:
    """UserError unless `need` bytes fit in `have` (default: `available_bytes()`): "`what`
    needs about N GB of memory, but `where` has M GB available (T GB in all); `fix`"."""
    have = available_bytes() if have is None else have
    if need > have:
        total = f" ({gb(total_bytes())} in all)" if where == "this machine" else ""
        raise UserError(f"{what} needs about {gb(need)} of memory, but {where} has {gb(have)} available{total}; {fix}")


def fitting_size(size: tuple[int, int], pixels: float) -> tuple[int, int]:
    """The largest (width, height) with `size`'s aspect ratio and at most `pixels` pixels."""
    scale = math.sqrt(max(pixels, 0) / (size[0] * size[1]))
    return int(size[0] * scale), int(size[1] * scale)


def _scale_fix(
    flag: str, size: tuple[int, int], per_worker: int, fixed: int, per_pixel: int, workers: int, have: int
) -> str:
    """How to fit: fewer workers if one fits, and the largest size that fits `workers`."""
    fixes = []
    if 0 < per_worker <= have and workers > 1:
        fixes.append(f"--workers {have // per_worker}")
    pixels = (have / workers - fixed) / per_pixel
    if pixels >= 64:
        w, h = fitting_size(size, pixels)
        fixes.append(f"a smaller {flag} (about {w}x{h} at most with {workers} worker(s))")
    return "use " + " or ".join(fixes) if fixes else "free memory or use a machine with more"


def check_synth(config: SynthConfig) -> None:
    """`urbanseg synth`: one scene per worker in memory at once."""
    size = parse_size(config.size)
    scenes = config.train + config.val + config.test
    workers = max(1, min(config.workers or default_workers(), scenes))
    per_scene = SYNTH_BYTES_PER_PIXEL * size[0] * size[1]
    have = available_bytes()
    require(
        per_scene * workers,
        f"--size {config.size} with {workers} worker(s) ({gb(per_scene)} per scene)",
        _scale_fix("--size", size, per_scene, 0, SYNTH_BYTES_PER_PIXEL, workers, have),
        have=have,
    )


def check_prepare(config: PrepareConfig, raw: tuple[int, int], pairs: int) -> None:
    """`urbanseg prepare`: one pair per worker in memory at once, at the raw size `raw`
    (width, height: the first raw image's) and the output size, for `pairs` pairs."""
    size = parse_size(config.size)
    workers = max(1, min(config.workers or default_workers(), pairs))
    fixed = PREPARE_BYTES_PER_RAW_PIXEL * raw[0] * raw[1]
    per_pair = fixed + PREPARE_BYTES_PER_OUT_PIXEL * size[0] * size[1]
    have = available_bytes()
    require(
        per_pair * workers,
        f"--size {config.size} from {raw[0]}x{raw[1]} images with {workers} worker(s) ({gb(per_pair)} per pair)",
        _scale_fix("--size", size, per_pair, fixed, PREPARE_BYTES_PER_OUT_PIXEL, workers, have),
        have=have,
    )


def train_step_floor(batch: int, size: tuple[int, int], num_classes: int) -> int:
    """Bytes one training step holds at least for `batch` samples of `size` (width, height):
    the inputs and the logits with their gradient; the model's activations come on top."""
    per_pixel = TRAIN_INPUT_BYTES_PER_PIXEL + TRAIN_BYTES_PER_PIXEL_AND_CLASS * num_classes
    return batch * size[0] * size[1] * per_pixel

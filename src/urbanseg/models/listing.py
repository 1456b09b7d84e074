"""`urbanseg models`: the table of model names with parameters, FLOPs and CPU latency
(the figures measured by benchmarks/bench_models.py and shipped in model_figures.json,
or measured now with --measure).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from urbanseg.config import ModelsConfig, parse_size
from urbanseg.errors import UserError
from urbanseg.models.pretrained import pretrained_table, table_notes
from urbanseg.models.registry import DEFAULT_MODEL, MODELS, model_stats

FIGURES_PATH = Path(__file__).with_name("model_figures.json")


def load_figures() -> dict[str, Any] | None:
    """The latency figures written by benchmarks/bench_models.py, or None if absent."""
    try:
        return json.loads(FIGURES_PATH.read_text())
    except FileNotFoundError:
        return None


def list_models(config: ModelsConfig) -> int:
    """`urbanseg models`: print a table of the models (parameters, FLOPs, CPU latency), or
    with --pretrained the table of pretrained Cityscapes models."""
    from urbanseg.models.latency import measure_latency

    if config.pretrained:
        return list_pretrained()
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
    rows = [
        f"| model | params (M) | GFLOPs @ {key} | CPU ms @ {key} | x faster than {base} | description |",
        "|-|-|-|-|-|-|",
    ]
    for name in names:
        params, flops = model_stats(name, size)
        ms, speedup = (f"{latency[name][0]:.0f}", f"{latency[name][1]:.1f}") if name in latency else ("-", "-")
        mark = " (default)" if name == DEFAULT_MODEL else ""
        rows.append(
            f"| {name}{mark} | {params / 1e6:.2f} | {flops / 1e9:.2f} | {ms} | {speedup} | {MODELS[name].description} |"
        )
    print("\n".join(rows))
    if config.measure:
        print(f"\nlatency measured now: batch 1, median of {config.repeats} runs, {config.threads} thread(s)")
    elif latency:
        print(
            f"\nlatency from benchmarks/bench_models.py, measured {figures['measured']} on {figures['machine']} "
            f"(batch 1, models timed round-robin); re-measure here with --measure"
        )
    else:
        print(f"\nno latency figures for {key}; measure them here with --measure")
    return 0


def list_pretrained() -> int:
    """`urbanseg models --pretrained`: the table of `urbanseg.models.pretrained.PRETRAINED`."""

    print(pretrained_table())
    print()
    print(table_notes())
    print(
        "\nConvert one into a checkpoint (downloads on first use, into the Hugging Face cache):\n"
        "  urbanseg import smp-hub/segformer-b0-512x1024-city-160k --out segformer-b0.pt\n"
        "NOTE: NVIDIA's SegFormer weights are for NON-COMMERCIAL use only."
    )
    return 0

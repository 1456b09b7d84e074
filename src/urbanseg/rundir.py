"""A training run folder (``runs/NAME``): where its checkpoints are and which shards it
was trained on.
"""

from __future__ import annotations

from pathlib import Path

from urbanseg.errors import UserError


def run_data(run: Path) -> Path:
    """The shards folder a run was trained on (`data` in RUN/config.yaml)."""
    import yaml

    path = Path(run) / "config.yaml"
    try:
        return Path(yaml.safe_load(path.read_text())["data"])
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the shards folder (`data`) from {path} ({type(e).__name__}: {e}); "
                        "pass --data SHARDS") from None


def resolve_checkpoint(run: Path | None, checkpoint: str | None) -> Path:
    """`best`/`last` inside `run`, or a checkpoint path; UserError naming what is missing."""
    name = checkpoint or "best"
    if name in ("best", "last"):
        if run is None:
            raise UserError(f"--checkpoint {name} needs --run runs/NAME; or give a checkpoint path")
        path = Path(run) / f"{name}.pt"
    else:
        path = Path(name)
    if not path.is_file():
        hint = ""
        if run is not None and Path(run).is_dir():
            found = ", ".join(sorted(p.name for p in Path(run).glob("*.pt"))) or "no .pt files"
            hint = f" (run folder {run} has: {found})"
        raise UserError(
            f"checkpoint {path} does not exist{hint}; train with `urbanseg train` or pass --checkpoint PATH"
        )
    return path

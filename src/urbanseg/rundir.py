"""A training run folder (``runs/NAME``, written by `urbanseg train`): its config.yaml read
typed, its checkpoints, and the shards it was trained on. The one reader of config.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from urbanseg.config import TrainConfig, from_dict
from urbanseg.errors import UserError

if TYPE_CHECKING:
    from urbanseg.config import TrainConfig


class RunDir:
    """`RunDir("runs/NAME")`: `.config()` (the resolved TrainConfig of config.yaml),
    `.data` (the shards folder it was trained on), `.checkpoint("best" | "last" | path)`."""

    CONFIG = "config.yaml"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def config(self) -> TrainConfig:
        """config.yaml as a TrainConfig, every value checked by the config's own rules. A
        key missing from it takes the flag's default (an older urbanseg did not have that
        flag), `run` defaults to this folder; a missing or malformed file -> UserError
        naming it and the field."""
        import yaml

        path = self.path / self.CONFIG
        if not path.is_file():
            raise UserError(f"{path} not found: {self.path} is not a run folder written by `urbanseg train`")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(
                f"{path} cannot be read as YAML ({type(e).__name__}: {e}); restore it, or start a new run folder"
            ) from None
        if isinstance(data, dict):
            data = {"run": str(self.path), **data}
        try:
            return from_dict(TrainConfig, data)
        except UserError as e:
            raise UserError(
                f"{path} is not a urbanseg train config: {e}; restore it, or start a new run folder"
            ) from None

    @property
    def data(self) -> Path:
        """The shards folder the run was trained on (`data` in config.yaml; UserError if it
        is not there). Runs before it was saved absolute hold it relative to the folder
        `train` ran in: that folder is found from `run` (as typed) at the end of this path."""
        try:
            config = self.config()
        except UserError as e:
            raise UserError(f"{e} (or pass --data SHARDS)") from None
        data = Path(config.data)
        typed_run = Path(config.run)
        if not data.is_absolute() and not data.is_dir() and not typed_run.is_absolute():
            parts, tail = self.path.absolute().parts, typed_run.parts
            if tail and parts[-len(tail) :] == tail:
                data = Path(*parts[: -len(tail)]) / data
        if not data.is_dir():
            raise UserError(
                f"shards folder {config.data} (`data` in {self.path / self.CONFIG}) does not exist here; pass "
                "--data SHARDS (the folder `urbanseg pack` wrote)"
            )
        return data

    def checkpoint(self, name: str | None = None) -> Path:
        """`best` (default) or `last` inside this run, or a checkpoint path; UserError
        naming what is missing and what the folder has."""
        name = name or "best"
        path = self.path / f"{name}.pt" if name in ("best", "last") else Path(name)
        if not path.is_file():
            hint = ""
            if self.path.is_dir():
                found = ", ".join(sorted(p.name for p in self.path.glob("*.pt"))) or "no .pt files"
                hint = f" (run folder {self.path} has: {found})"
            raise UserError(
                f"checkpoint {path} does not exist{hint}; train with `urbanseg train` or pass --checkpoint PATH"
            )
        return path


def resolve_checkpoint(run: Path | None, checkpoint: str | None) -> Path:
    """For commands whose --run is optional: `RunDir(run).checkpoint(checkpoint)`, or a
    checkpoint path without a run."""
    if run is not None:
        return RunDir(run).checkpoint(checkpoint)
    name = checkpoint or "best"
    if name in ("best", "last"):
        raise UserError(f"--checkpoint {name} needs --run runs/NAME; or give a checkpoint path")
    if not Path(name).is_file():
        raise UserError(f"checkpoint {name} does not exist; train with `urbanseg train` or pass --checkpoint PATH")
    return Path(name)

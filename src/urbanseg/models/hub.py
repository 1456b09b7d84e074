"""The Hugging Face hub, where pretrained models live: snapshots in the usual cache, and a
fast, clear error offline.

huggingface_hub retries a failed connection for ~25 s before it gives up, and longer
when nothing is cached. urbanseg asks once, with a short timeout, whether the hub
answers (`hub_reachable`); when it does not, it uses only what is cached (the hub's own
offline mode) and otherwise stops at once with the command that fetches the model on
another machine. `HF_HUB_OFFLINE=1` skips the question.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from urbanseg.errors import UserError

# Seconds to wait for the hub to answer one request before treating it as offline.
HUB_TIMEOUT = 4.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files a conversion reads; weights in one format only (safetensors when published).
_CONFIG_FILES = ("config.json", "preprocessor_config.json", "albumentations_config_eval.json")


@dataclass(frozen=True)
class Snapshot:
    """A model repository's files at one commit: `folder` holds them, `revision` is the
    commit hash (the key of a cached conversion), `size` the bytes downloaded for it
    (None when it came from the cache without asking the hub)."""

    repo_id: str
    folder: Path
    revision: str
    size: int | None = None


def is_repo_id(text: str) -> bool:
    """'owner/name' as the hub spells repository ids."""
    return bool(_REPO_ID.match(text))


def hf_home() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME)


def hf_hub_cache() -> Path:
    """Where huggingface_hub keeps downloads ($HF_HUB_CACHE, default $HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline_mode() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) was set: never ask the hub."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """Whether the hub answers one request within `timeout` s (any HTTP status counts:
    the question is the network, not the page). Through huggingface_hub's own session, so
    HF_ENDPOINT and the proxy settings apply as they will to the download."""
    from huggingface_hub import constants, get_session

    if offline_mode():
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:
        return False
    return True


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The hub's offline mode for the calls inside (what HF_HUB_OFFLINE=1 gives a new
    process): cached files load, anything else fails at once. huggingface_hub reads
    `constants.HF_HUB_OFFLINE` at call time; it is restored on exit."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_info(repo_id: str) -> tuple[Any, str]:
    """(the hub's model info: commit `sha`, files and sizes; "") when the hub answers, or
    (None, why not) when it cannot be used. A missing, private or gated repo -> UserError."""
    from huggingface_hub import HfApi

    if offline_mode():
        return None, "HF_HUB_OFFLINE is set"
    try:
        return HfApi().model_info(repo_id, timeout=HUB_TIMEOUT, files_metadata=True), ""
    except Exception as e:
        return None, _hub_error(repo_id, e)


def fetch_snapshot(repo_id: str, info: Any, reason: str, *, source: str | None = None) -> Snapshot:
    """The files of model `repo_id` a conversion reads (configs and weights in one
    format), downloaded into the Hugging Face cache at the commit of `info` (from
    `hub_info`; only what is missing is fetched). Without `info` (offline, for `reason`):
    the cached snapshot of its main branch, or a UserError naming the id, the cache and
    how to fetch the model on another machine."""
    from huggingface_hub import snapshot_download

    if info is None:
        return _cached_snapshot(repo_id, reason, source or repo_id)
    names = {s.rfilename: s.size for s in info.siblings or []}
    patterns = _wanted(names)
    size = sum(v or 0 for k, v in names.items() if any(Path(k).match(p) for p in patterns))
    print(f"fetching {repo_id} at {str(info.sha)[:12]} ({size / 1e6:.1f} MB, nothing if cached) into {hf_hub_cache()}")
    try:
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=list(patterns))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"downloading {repo_id} failed ({type(e).__name__}: {first}); run the command again "
            f"(the download resumes), or see {hf_hub_cache()} for space and permissions"
        ) from None
    return Snapshot(repo_id, Path(folder), str(info.sha), size)


def _wanted(names: dict[str, int | None]) -> tuple[str, ...]:
    weights = (
        ("*.safetensors", "*.safetensors.index.json")
        if any(n.endswith(".safetensors") for n in names)
        else ("*.bin", "*.bin.index.json")
    )
    return _CONFIG_FILES + weights


def _hub_error(repo_id: str, error: Exception) -> str:
    """A missing, private or gated repository is the user's to fix (UserError now); any
    other failure means the hub cannot be used: its reason, for the offline path."""
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError  # also in huggingface_hub < 0.24

    if isinstance(error, GatedRepoError):
        raise UserError(
            f"{repo_id} is gated on the Hugging Face hub: accept its terms on "
            f"https://huggingface.co/{repo_id} and log in with `hf auth login`"
        ) from None
    if isinstance(error, RepositoryNotFoundError):
        raise UserError(
            f"no model {repo_id} on the Hugging Face hub (a typo? a private model needs "
            f"`hf auth login`); see `urbanseg models --pretrained` for the known ones"
        ) from None
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"the hub did not answer ({type(error).__name__}: {first})"


def _cached_snapshot(repo_id: str, reason: str, source: str) -> Snapshot:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise UserError(offline_message(repo_id, reason, source)) from None
    print(f"{reason}; using the cached snapshot {folder}")
    return Snapshot(repo_id, folder, folder.name)


def offline_message(repo_id: str, reason: str, source: str) -> str:
    """What to do when model `repo_id` (given as `source`) is needed, the hub cannot be
    reached and nothing is cached."""
    local = repo_id.split("/")[-1]
    return (
        f"cannot get {repo_id}: {reason}, and it is not in the Hugging Face cache {hf_hub_cache()}. "
        f"On a machine with internet run\n"
        f"  hf download {repo_id} --local-dir {local}\n"
        f"(`huggingface-cli download {repo_id} --local-dir {local}` with an older huggingface_hub), "
        f"copy the folder {local} here and convert it with\n"
        f"  urbanseg import {source} --folder {local}\n"
        f"(later commands then find the conversion); or copy that machine's $HF_HOME/hub folder here."
    )

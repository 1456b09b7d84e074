"""Moved to `helpers.training`: kept only so branches written before the move still import.
Remove once every branch is merged (new code imports from `helpers`)."""

from helpers.training import TINY_MODEL, make_shards, repack, run_cli, saved_step, subprocess_env, train_args

__all__ = ["TINY_MODEL", "make_shards", "repack", "run_cli", "saved_step", "subprocess_env", "train_args"]

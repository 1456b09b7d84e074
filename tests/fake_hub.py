"""Moved to `helpers.fake_hub`: kept only so branches written before the move still import.
Remove once every branch is merged (new code imports from `helpers`)."""

from helpers.fake_hub import FakeHub

__all__ = ["FakeHub"]

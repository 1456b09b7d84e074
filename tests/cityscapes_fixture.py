"""Moved to `helpers.cityscapes`: kept only so branches written before the move still import.
Remove once every branch is merged (new code imports from `helpers`)."""

from helpers.cityscapes import image_for, render, scene_objects, write_raw_cityscapes

__all__ = ["image_for", "render", "scene_objects", "write_raw_cityscapes"]

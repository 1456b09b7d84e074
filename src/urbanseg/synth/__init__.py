"""Stage 0, `urbanseg synth`: synthetic street scenes written in the exact Cityscapes layout.

`scene` holds the primitives (camera, shapes), `layout` composes a street in metres,
`render` draws and textures it, `writer` generates scenes and writes the dataset.
"""

from urbanseg.synth.writer import CITIES, CONFIG_NAME, SPLITS, generate, scene_paths, stem, synthesize

__all__ = ["CITIES", "CONFIG_NAME", "SPLITS", "generate", "scene_paths", "stem", "synthesize"]

"""urbanseg: street-scene semantic segmentation, from a Cityscapes-layout dataset to a
trained model, an evaluation report and pictures of its predictions.

Each pipeline stage is one module with one entry function; the command line
(`urbanseg --help`) calls exactly one of them. Heavy libraries (PyTorch, TensorFlow
references, ONNX Runtime) are imported inside the functions that need them.
"""

__version__ = "0.1.0"

from urbanseg.errors import UserError
from urbanseg.labels import LABELS, LabelSet, get_label_set

__all__ = ["LABELS", "LabelSet", "UserError", "__version__", "get_label_set"]

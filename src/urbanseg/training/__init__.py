"""Stage 4, `urbanseg train`: the loop (`train`), resumable state (`resume`), losses, torchrun
process groups (`distributed`) and the run log (metrics.csv, TensorBoard, curves.png)."""

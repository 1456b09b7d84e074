"""Stage 4, `urbanseg train`: the command (`train`: setup and the checks before the first
step), the `Trainer` and its checkpointed state (`trainer`), the loop and its stop signal
(`loop`), what makes a resume exact (`resume`: config merge, seeding, RNG states), losses,
torchrun process groups (`distributed`) and the run log (metrics.csv, TensorBoard, curves.png)."""

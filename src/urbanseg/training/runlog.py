"""What a training run leaves in its folder besides checkpoints: `metrics.csv` (one row per
logged training interval or validation), TensorBoard event files in `tb/`, and
`curves.png` (training loss and validation mIoU over steps).

Only the main process writes; after `--resume` the rows and events past the resumed step
are dropped, so the files read as if the run had never been interrupted.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import time
from pathlib import Path
from typing import Any

from urbanseg.util import atomic_write_bytes, atomic_write_text, name_the_file

COLUMNS = ("step", "epoch", "split", "loss", "lr", "images_per_s", "miou", "pixel_accuracy", "mean_accuracy")


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of a metrics.csv as dicts of strings (empty string = no value)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RunLog:
    """metrics.csv + TensorBoard for one run folder; a no-op when `enabled` is False
    (processes other than the main one)."""

    def __init__(self, run: Path, *, enabled: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.csv_path = run / "metrics.csv"
        self.writer: EventWriter | None = None  # None: disabled, or closed
        if not enabled:
            return
        rows = read_metrics(self.csv_path) if resume_step is not None else []
        keep = [r for r in rows if int(r["step"]) <= (resume_step or 0)]
        buf = io.StringIO()
        w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in COLUMNS} for r in keep)
        atomic_write_text(self.csv_path, buf.getvalue())
        if resume_step is None:  # a run started again (it had no checkpoint): drop its old events
            for old in (run / "tb").glob("events.out.tfevents.*"):
                old.unlink()
        # the purge event drops what the interrupted process logged after its checkpoint
        self.writer = EventWriter(run / "tb", purge_step=None if resume_step is None else resume_step + 1)

    def _row(self, values: dict[str, Any]) -> None:
        try:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, COLUMNS, lineterminator="\n").writerow(
                    {k: "" if values.get(k) is None else _fmt(values[k]) for k in COLUMNS}
                )
        except OSError as e:  # a full disk: say which file
            name_the_file(e, self.csv_path)
            raise

    def train(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None:
        if self.writer is None:
            return
        self._row(dict(step=step, epoch=epoch, split="train", loss=loss, lr=lr, images_per_s=images_per_s))
        for tag, value in (("train/loss", loss), ("train/lr", lr), ("train/images_per_s", images_per_s)):
            self.writer.add_scalar(tag, value, step)

    def val(self, step: int, epoch: int, loss: float, result: dict[str, Any], class_names: tuple[str, ...]) -> None:
        if self.writer is None:
            return
        keys = ("miou", "pixel_accuracy", "mean_accuracy")
        self._row(dict(step=step, epoch=epoch, split="val", loss=loss, **{k: result[k] for k in keys}))
        self.writer.add_scalar("val/loss", loss, step)
        for k in keys:
            if result[k] is not None:
                self.writer.add_scalar(f"val/{k}", result[k], step)
        for name, iou in zip(class_names, result["per_class"]["iou"], strict=True):
            if iou is not None:
                self.writer.add_scalar(f"val_iou/{name}", iou, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EventWriter:
    """Scalars in a TensorBoard event file, written with tensorboard's own protos and record
    writer. (torch.utils.tensorboard.SummaryWriter writes the same file but imports
    TensorFlow when it is installed, ~11 s here, only to create a folder and open a file.)"""

    def __init__(self, logdir: Path, *, purge_step: int | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter

        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self._file = open(logdir / name, "wb")  # noqa: SIM115 - open for the writer's lifetime; close() closes it
        self._records = RecordWriter(self._file)
        self._event = Event
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            # TensorBoard's reader discards earlier events with step >= purge_step
            self._write(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
        self._write(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def plot_curves(csv_path: Path, out: Path) -> None:
    """curves.png: training loss (left axis) and validation mIoU (right axis) over steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training box
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == "train" and r["loss"]]
    val = [(int(r["step"]), float(r["miou"])) for r in rows if r["split"] == "val" and r["miou"]]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    if val:
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation mIoU")
    ax2.set_ylabel("validation mIoU", color="tab:orange")
    ax2.set_ylim(0, 1)
    ax.set_title(f"{csv_path.parent.name}: loss and mIoU")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)

    atomic_write_bytes(out, buf.getvalue())

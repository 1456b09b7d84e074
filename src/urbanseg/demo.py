"""`urbanseg demo`: every stage once, on synthetic scenes, calling the same functions as
the commands (synth -> prepare -> pack -> train -> evaluate -> predict), then says what
was made and what to open.

Sizes are chosen so the full demo takes a few minutes on a 2-core laptop CPU and
`--quick` well under two; the folder is the demo's own and is reused on a rerun (scenes
and prepared pairs are kept when up to date, the training run starts again).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from urbanseg import outputs
from urbanseg.config import (
    DemoConfig,
    EvaluateConfig,
    PackConfig,
    PredictConfig,
    PrepareConfig,
    SynthConfig,
    TrainConfig,
)
from urbanseg.data.pack import pack
from urbanseg.data.prepare import prepare
from urbanseg.errors import UserError
from urbanseg.evaluation.evaluate import evaluate
from urbanseg.inference.export import is_urbanseg_onnx
from urbanseg.inference.predict import predict
from urbanseg.synth import synthesize


@dataclass(frozen=True)
class Plan:
    """How big the demo is: scenes per split, scene size, training size and steps."""

    train: int
    val: int
    scene_size: str
    size: str
    crop: str
    iters: int
    batch_size: int
    gallery: int
    pictures: int


# Training on 256x128 crops costs a quarter of whole 512x256 images per step, so the
# full demo affords ~4x more steps in the same minutes (and learns more from them).
FULL = Plan(
    train=96,
    val=24,
    scene_size="1024x512",
    size="512x256",
    crop="256x128",
    iters=600,
    batch_size=8,
    gallery=3,
    pictures=8,
)
QUICK = Plan(
    train=24,
    val=8,
    scene_size="512x256",
    size="256x128",
    crop="256x128",
    iters=150,
    batch_size=8,
    gallery=2,
    pictures=4,
)


_RUN_FILES = ("config.yaml", "best.pt", "last.pt", "metrics.csv", "curves.png")  # train's, besides tb/


def _remove_previous_run(run: Path) -> None:
    """A previous demo's run would be continued instead of trained anew: delete what
    urbanseg wrote into it (train's files, ONNX exports and engine caches, evaluate's and
    predict's marked folders) under the run's lock, so a training still writing there is
    named, not pulled from under it. Anything else in it (a user's notes) is kept."""
    if not run.exists():
        return
    with outputs.claim(run, "train", what="the demo's run folder"):
        for name in _RUN_FILES:
            (run / name).unlink(missing_ok=True)
        if (run / "tb").is_dir():
            shutil.rmtree(run / "tb")
        for model in run.glob("*.onnx"):  # (pathlib's glob lists hidden files too: the engine caches)
            if is_urbanseg_onnx(model):
                model.unlink()
        for command in ("evaluate", "predict"):
            kind = run / ("eval" if command == "evaluate" else "predict")
            for folder in kind.glob("*/"):
                if outputs.is_owned(folder, command):
                    shutil.rmtree(folder)
            if kind.is_dir() and not any(kind.iterdir()):
                kind.rmdir()


def _stage(number: int, title: str, what: str) -> float:
    print(f"\n== [{number}/6] {title}: {what}", flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def demo(config: DemoConfig) -> int:
    """Entry point of `urbanseg demo`; returns 0 when every stage succeeded. The demo
    writes only into a new folder or one it made before (`outputs.claim`)."""
    with outputs.claim(config.out, "demo"):
        _remove_previous_run(Path(config.out) / "run")
        return _run_stages(config)


def _run_stages(config: DemoConfig) -> int:
    from urbanseg.training.train import train

    plan = QUICK if config.quick else FULL
    iters = config.iters or plan.iters
    out = Path(config.out)
    data, prepared, shards, run = out / "data", out / "prepared", out / "shards", out / "run"
    begin = time.perf_counter()

    t = _stage(
        1,
        "synth",
        f"{plan.train} training and {plan.val} validation street scenes at {plan.scene_size}, "
        f"in Cityscapes layout, into {data}",
    )
    synthesize(
        SynthConfig(
            out=data,
            train=plan.train,
            val=plan.val,
            test=0,
            size=plan.scene_size,
            seed=config.seed,
            workers=config.workers,
        )
    )
    _done(t)
    t = _stage(
        2,
        "prepare",
        f"resize to {plan.size}, labelIds -> the 8 categories (void, flat, construction, "
        f"object, nature, sky, human, vehicle), into {prepared}",
    )
    prepare(PrepareConfig(data=data, out=prepared, size=plan.size, splits=["train", "val"], workers=config.workers))
    _done(t)
    t = _stage(3, "pack", f"image/label pairs -> sharded TFRecord files with spec.json, into {shards}")
    pack(PackConfig(prepared=prepared, out=shards, shards=2, splits=["train", "val"]))
    _done(t)
    t = _stage(
        4,
        "train",
        f"{config.model or 'the default model'} for {iters} steps of {plan.batch_size} "
        f"augmented {plan.crop} crops, validating as it goes, into {run}",
    )
    code = train(
        TrainConfig(
            data=shards,
            run=run,
            model=config.model,
            iters=iters,
            batch_size=plan.batch_size,
            crop=plan.crop,
            seed=config.seed,
            val_every=max(iters // 4, 1),
            workers=1,
        )
    )
    if code != 0:
        raise UserError(f"training stopped early (exit code {code}); see the messages above")
    _done(t)
    t = _stage(
        5,
        "evaluate",
        "the best checkpoint on the validation split at full resolution: per-class IoU, "
        "precision, recall, F1, the official Cityscapes category scores, pictures",
    )
    evaluate(EvaluateConfig(run=run, split="val", full_res=True, gallery=plan.gallery))
    _done(t)
    t = _stage(6, "predict", f"{plan.pictures} validation pictures, original | prediction, as the original project")
    predict(PredictConfig(run=run, split="val", num=plan.pictures))
    _done(t)
    _summary(run, time.perf_counter() - begin)
    return 0


def _summary(run: Path, seconds: float) -> None:
    report = run / "eval" / "val"
    print(f"\nDemo finished in {seconds / 60:.1f} min. Open next:")
    for path, what in (
        (report / "report.html", "the evaluation report in a browser: table, confusion matrix, best/worst pictures"),
        (report / "report.md", "the same table as Markdown (the original project's layout)"),
        (run / "predict" / "val", "original | prediction pictures"),
        (run / "curves.png", "training loss and validation mIoU over steps"),
        (run / "tb", "TensorBoard logs: tensorboard --logdir " + str(run / "tb")),
    ):
        print(f"  {path}  -- {what}")
    print(
        f"Try the model on your own images in a browser: urbanseg serve --run {run}  (then open http://127.0.0.1:8000/)"
    )
    print("On real Cityscapes, run the same stages by hand: see the README.")

"""Fine-tuning a classes19 model on categories8/7 data: validation mIoU at step 0 (before
any training) of the projected model and of the new head's starting points.

1. Data: `urbanseg synth` scenes -> `prepare` as classes19, categories8 and categories7 ->
   `pack` (cached in --work).
2. A tiny SegFormer (smp's own `Segformer`, MiT-B0 encoder, 32-channel decoder) saved with
   `save_pretrained`, converted with `urbanseg import`, then trained on the classes19
   shards for --steps steps (`train --init`): a stand-in for a Cityscapes model (no
   download here).
3. On each coarser val split, at step 0:
   - projected: the classes19 model, its predictions mapped class -> category after the
     argmax (what `evaluate` does with it);
   - train --init: what `train --init` starts from (`load_init_weights`): each category
     the row of its member the model predicts most on 16 training images;
   - head dominant: the same rule with the counts over the whole train split;
   - head mean: each category the mean of its member classes' rows + log(members);
   - fresh head: a new randomly initialised head (`--new-head`).

    python benchmarks/bench_init_head.py                 # ~5 min on 2 loaded cores
    python benchmarks/bench_init_head.py --steps 100 --size 128x64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from urbanseg.config import parse_size

SETS = ("classes19", "categories8", "categories7")


def make_data(work: Path, train: int, val: int, size: str) -> dict[str, Path]:
    from urbanseg.config import PackConfig, PrepareConfig, SynthConfig
    from urbanseg.data.pack import pack
    from urbanseg.data.prepare import prepare
    from urbanseg.synth import synthesize

    w, h = parse_size(size)
    if not (work / "raw").is_dir():
        synthesize(SynthConfig(out=work / "raw", train=train, val=val, size=f"{2 * w}x{2 * h}", seed=0))
    out = {}
    for labels in SETS:
        shards = work / f"shards-{labels}"
        if not (shards / "val" / "spec.json").is_file():
            prepared = work / f"prepared-{labels}"
            prepare(PrepareConfig(data=work / "raw", out=prepared, labels=labels, size=size, splits=["train", "val"]))
            pack(PackConfig(prepared=prepared, out=shards, shards=2, splits=["train", "val"]))
        out[labels] = shards
    return out


def tiny_segformer(work: Path, size: str) -> Path:
    """The tiny SegFormer, saved with smp's save_pretrained and converted by `urbanseg import`."""
    import segmentation_models_pytorch as smp

    path = work / "tiny-segformer.pt"
    if path.is_file():
        return path
    folder = work / "tiny-segformer"
    torch.manual_seed(0)
    smp.Segformer(
        encoder_name="mit_b0", encoder_weights=None, decoder_segmentation_channels=32, classes=19
    ).save_pretrained(str(folder))
    w, h = parse_size(size)
    steps = [
        {"__class_fullname__": "Resize", "height": h, "width": w, "p": 1.0},
        {"__class_fullname__": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    ]
    (folder / "albumentations_config_eval.json").write_text(
        json.dumps({"transform": {"__class_fullname__": "Compose", "transforms": steps}})
    )
    _cli(["import", str(folder), "--out", str(path)])
    return path


def _cli(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "urbanseg", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"urbanseg {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def pretrain(work: Path, shards: Path, init: Path, steps: int) -> Path:
    run = work / f"pretrained-{steps}"
    if not (run / "last.pt").is_file():
        _cli(["train", "--data", str(shards), "--run", str(run), "--init", str(init), "--iters", str(steps),
              "--batch-size", "8", "--workers", "0", "--lr", "0.002", "--val-every", str(steps)])  # fmt: skip
    return run / "last.pt"


def miou(model, shards: Path, labels: str, class_map=None) -> float:
    """Val mIoU of in-memory `model` on `labels` (predicted classes mapped by `class_map`
    first), scored by evaluate's own `run_evaluation`."""
    from urbanseg.data.loader import ShardDataset
    from urbanseg.evaluation.evaluate import run_evaluation
    from urbanseg.inference.predictor import Predictor
    from urbanseg.labels import get_label_set

    class ModulePredictor(Predictor):
        def logits(self, batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(batch)).numpy()

    model.eval()
    dataset = ShardDataset(shards, "val")
    label_set = get_label_set(labels)
    predictor = ModulePredictor(label_set, (dataset.spec.width, dataset.spec.height), Path("in-memory"))
    predictor.class_map = class_map
    state = run_evaluation(predictor, dataset, label_set, gallery=0)
    return float(state.confusion.compute()["miou"])


def step0_scores(checkpoint: Path, shards: dict[str, Path], target: str, counts: np.ndarray) -> dict[str, float]:
    """The step-0 val mIoU of each way to start on `target`; `counts`: how often the
    classes19 model predicts each class on its train split (for the dominant rule)."""
    from urbanseg.checkpoint import load_checkpoint, model_from_checkpoint
    from urbanseg.data.loader import ShardDataset
    from urbanseg.labels import get_label_set
    from urbanseg.models import create_model
    from urbanseg.projection import find_projection
    from urbanseg.training.finetune import dominant_members, project_head
    from urbanseg.training.train import init_sample, load_init_weights

    ckpt = load_checkpoint(checkpoint)
    model19 = model_from_checkpoint(ckpt)
    labels = get_label_set(target)
    projection = find_projection(get_label_set("classes19"), labels)
    assert projection is not None
    kwargs = {k: v for k, v in ckpt["model"]["kwargs"].items() if k != "num_classes"}
    out = {"projected": miou(model19, shards[target], target, projection.lut)}
    torch.manual_seed(0)
    head = create_model(ckpt["model"]["name"], labels.num_classes, **kwargs)
    load_init_weights(
        head, checkpoint, labels, new_head=False, sample=init_sample(ShardDataset(shards[target], "train"))
    )
    out["train --init"] = miou(head, shards[target], target)
    project_head(head, ckpt["model_state"], projection, rule="mean")
    out["head mean"] = miou(head, shards[target], target)
    project_head(head, ckpt["model_state"], projection, rule="dominant", dominant=dominant_members(projection, counts))
    out["head dominant"] = miou(head, shards[target], target)
    torch.manual_seed(0)
    fresh = create_model(ckpt["model"]["name"], labels.num_classes, **kwargs)
    load_init_weights(fresh, checkpoint, labels, new_head=True)
    out["fresh head"] = miou(fresh, shards[target], target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/urbanseg-bench-init-head"))
    parser.add_argument("--train", type=int, default=24, help="training scenes")
    parser.add_argument("--val", type=int, default=8, help="validation scenes")
    parser.add_argument("--size", default="128x64", help="prepared size WxH")
    parser.add_argument("--steps", type=int, default=300, help="classes19 training steps of the stand-in model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    shards = make_data(args.work, args.train, args.val, args.size)
    checkpoint = pretrain(args.work, shards["classes19"], tiny_segformer(args.work, args.size), args.steps)
    print(f"\nstep-0 val mIoU of a classes19 tiny SegFormer ({args.steps} steps on synthetic scenes), {args.size}")
    columns = ("projected", "train --init", "head dominant", "head mean", "fresh head")
    print("| data | " + " | ".join(columns) + " |")
    print("|-|" + "-|" * len(columns))
    from urbanseg.checkpoint import load_checkpoint, model_from_checkpoint
    from urbanseg.data.loader import ShardDataset
    from urbanseg.training.finetune import predicted_counts

    train19 = ShardDataset(shards["classes19"], "train")
    model19 = model_from_checkpoint(load_checkpoint(checkpoint))
    counts = predicted_counts(model19, [train19[i]["image"] for i in range(len(train19))], 19)  # once, for both
    for target in ("categories8", "categories7"):
        scores = step0_scores(checkpoint, shards, target, counts)
        print(f"| {target} | " + " | ".join(f"{scores[c]:.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()

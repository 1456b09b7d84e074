"""`urbanseg evaluate`: score a run's checkpoint (or an ONNX model, ``--model``) on one
split of its shards and write the report into ``RUN/eval/SPLIT/`` (report.md,
report.html, metrics.json, per_image.csv, confusion.png, gallery/).

The model runs through the engine `--engine` picks (`urbanseg.inference.engine`) and
each image becomes a label map through `urbanseg.inference.plan.label_maps`, the
function `urbanseg predict` uses: what is scored is what predict writes.

Two protocols:

- default: at the prepared size, against the labels stored in the shards (fast; the
  figures training reports);
- ``--full-res``: the official one. Logits are upsampled bilinearly to the raw ground
  truth's size (``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``, found through the
  shards' spec.json: ``data``, or ``prepared`` -> manifest.json ``data``) and scored there;
  for label sets derived from Cityscapes also the official class/category IoU and iIoU
  (`urbanseg.evaluation.official`). Other raw annotations (paired folders, the Cityscapes
  layout's trainIds and polygons) are found through the manifest
  (`urbanseg.data.sources.raw_annotations`) and read by `urbanseg.data.annotations.read_truth`;
  the official scores need label ids (labelIds, trainIds, polygons), the iIoU instance ids
  (Cityscapes' instanceIds, polygons): without them it is n/a.

Scores are dataset-level (`urbanseg.evaluation.metrics.ConfusionMatrix`); per-image mIoU ranks the
images for the gallery of best and worst examples.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from urbanseg import __version__
from urbanseg.config import EvaluateConfig
from urbanseg.data.annotations import ID_SOURCES, INSTANCE_SOURCES, read_truth
from urbanseg.data.formats import Manifest, ShardSpec
from urbanseg.data.sources import raw_annotations
from urbanseg.errors import UserError
from urbanseg.evaluation.metrics import ConfusionMatrix, format_table, image_scores
from urbanseg.evaluation.official import OfficialEvaluator, read_ground_truth
from urbanseg.evaluation.report import write_report
from urbanseg.imaging import IMAGE_SUFFIXES, read_image
from urbanseg.inference.engine import load_engine
from urbanseg.inference.export import is_onnx_file
from urbanseg.inference.plan import Plan, label_maps
from urbanseg.inference.predictor import Predictor, provenance
from urbanseg.inference.segment import TTA
from urbanseg.labels import LabelSet
from urbanseg.outputs import claim
from urbanseg.projection import Projection, require_projection
from urbanseg.rundir import RunDir, resolve_checkpoint
from urbanseg.util import default_workers


def evaluate(config: EvaluateConfig) -> int:
    """Entry point of `urbanseg evaluate`; returns 0. UserError for a missing run folder,
    checkpoint, ONNX model, shards, split or raw ground truth, or a label-set mismatch."""
    run = RunDir(config.run) if config.run is not None else None
    if run is not None and not run.path.is_dir():
        raise UserError(
            f"run folder {run.path} does not exist; train one with `urbanseg train --data SHARDS --run {run.path}`"
        )
    out = config.out or (run.path / "eval" / config.split if run is not None else Path("eval") / config.split)
    # Claimed before the model loads (seconds, maybe an ONNX export): a read-only or foreign
    # output folder, or one in use, is said at once.
    with claim(out, "evaluate", what="evaluation folder"):
        return _evaluate(config, run, out)


def _evaluate(config: EvaluateConfig, run: RunDir | None, out: Path) -> int:
    from urbanseg.data.loader import ShardDataset
    from urbanseg.models.convert import resolve_model_checkpoint

    if config.model is not None:
        model_path = Path(config.model)
    else:
        checkpoint = resolve_model_checkpoint(config.checkpoint)  # a pretrained source: its converted checkpoint
        model_path = resolve_checkpoint(config.run, checkpoint)
    predictor = load_engine(
        checkpoint=None if config.model else model_path, model=config.model, engine=config.engine, device=config.device
    )
    is_onnx = config.model is not None or is_onnx_file(model_path)
    summary, training = _model_summary(predictor, model_path, is_onnx)
    shards = Path(config.data) if config.data is not None else run.data if run is not None else Path()
    dataset = ShardDataset(shards, config.split)
    label_set = dataset.label_set  # what is scored: the model's own, or a coarser one it projects onto
    projection = _check_label_sets(predictor.label_set, label_set, model_path, shards / config.split)
    if projection is not None:
        predictor.project_to(label_set)  # segment maps the predicted classes after the argmax
    raw = _raw_ground_truth(dataset, shards, config.split, label_set) if config.full_res else None
    device = getattr(predictor, "device", "cpu")
    print(
        f"evaluating {model_path} (step {summary['step']}) on {len(dataset)} {config.split} images from {shards} "
        f"at {'full resolution (raw ground truth)' if raw else 'the prepared size'}, "
        f"engine {predictor.info.get('engine', type(predictor).__name__)} on {device}"
    )
    for label, value in provenance(predictor.info.get("source"), predictor.info.get("metrics")):
        print(f"{label}: {value}")
    plan = Plan.from_config(config, predictor.info)
    print(f"resolution: {plan.why}")
    if raw is not None and plan.tta.scales != (1.0,):
        # A scaled view of the shard's image (the raw one resized) upsampled again is not the
        # view predict makes of the raw picture: make them from the raw images.
        raw = dataclasses.replace(raw, images=_raw_images(dataset, shards, config.split))
        print(f"scaled views: made from the raw images under {raw.root}, as predict makes them")
    if projection is not None:
        print(f"labels: {projection.describe()}")
    if not plan.tta.plain:
        print(f"test-time augmentation: {plan.tta.describe()}, softmax probabilities averaged at the label size")
    start = time.perf_counter()
    state = run_evaluation(
        predictor,
        dataset,
        label_set,
        plan=plan,
        workers=config.workers,
        gallery=config.gallery,
        raw=raw,
    )
    seconds = time.perf_counter() - start
    result = state.confusion.compute()
    official = state.official.compute() if state.official is not None else None
    if official and raw is not None and not raw.has_instances:
        official = _without_iiou(official)
    info = _info(config, plan, summary, training, model_path, shards, dataset, predictor, seconds, state, raw)
    info["projection"] = projection.describe() if projection is not None else None
    info["pretrained"] = dict(provenance(predictor.info.get("source"), predictor.info.get("metrics"))) or None
    name = run.path.name if run is not None else (predictor.info.get("source") or {}).get("id", model_path.stem)
    title = f"Evaluation of {name} on {config.split}" + (" (full resolution)" if raw else "")
    paths = write_report(
        out,
        result=result,
        matrix=state.confusion.matrix,
        label_set=label_set,
        title=title,
        header=_header(info, summary),
        per_image=state.per_image,
        picks=state.picks(),
        info=info,
        official=official,
    )
    print(format_table(result, label_set.classes))
    scores = [f"pixel accuracy {_fmt(result['pixel_accuracy'])}", f"mean accuracy {_fmt(result['mean_accuracy'])}"]
    for key in ("mean_class_iou", "mean_category_iou"):
        if official and key in official:
            scores.append(f"official {key.replace('_', ' ')} {_fmt(official[key])}")
    print(", ".join(scores))
    print(
        f"{len(dataset)} images in {seconds:.1f} s; report: {paths['html']} (open it in a browser), "
        f"{paths['markdown']}; every figure in {paths['metrics']}"
    )
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _without_iiou(official: dict[str, Any]) -> dict[str, Any]:
    """The official scores with every iIoU n/a: ground truth without instance ids has no
    instances to weigh (the evaluator would report 0 wherever there are false positives)."""
    out = dict(official)
    for level in ("class", "category"):
        if f"{level}_iiou" in out:
            out[f"{level}_iiou"] = dict.fromkeys(out[f"{level}_iiou"])
            out[f"mean_{level}_iiou"] = None
    return out


def _check_label_sets(model_set: LabelSet, data_set: LabelSet, ckpt: Path, split_dir: Path) -> Projection | None:
    """None when the model predicts the data's classes; the projection onto them of a finer
    Cityscapes set (classes19 model, categories8/7 data); else UserError naming both."""
    return require_projection(model_set, data_set, f"checkpoint {ckpt}", str(split_dir))


# --------------------------------------------------------------------------- raw ground truth


@dataclass(frozen=True)
class RawTruth:
    """The raw dataset's ground truth for one split: stem -> *_gtFine_labelIds.png (or
    *_gtFine_color.png for a colour-only label set); with `source`, stem -> an annotation
    the manifest names, of that kind (`urbanseg.data.annotations`)."""

    root: Path
    files: dict[str, Path]
    kind: str  # "labelIds" or "color", or the source
    source: str | None = None
    images: dict[str, Path] | None = None  # stem -> raw image, when the views are made from them

    @property
    def has_ids(self) -> bool:
        return self.kind == "labelIds" if self.source is None else self.source in ID_SOURCES

    @property
    def has_instances(self) -> bool:
        return self.kind == "labelIds" if self.source is None else self.source in INSTANCE_SOURCES

    def path_for(self, name: str) -> Path:
        stem = _stem(name)
        if stem not in self.files:
            what = f"*_gtFine_{self.kind}.png" if self.source is None else "annotation"
            where = self.root / "gtFine" if self.source is None else self.root
            raise UserError(
                f"no {what} for image {name!r} under {where}; "
                "--full-res needs the raw dataset the shards were prepared from"
            )
        return self.files[stem]

    def image_for(self, name: str) -> Path:
        stem = _stem(name)
        if self.images is None or stem not in self.images:
            raise UserError(
                f"no raw image for {name!r}: --full-res with --scales makes its views from the raw images "
                "(as predict does); restore them, or drop --scales"
            )
        return self.images[stem]


def _stem(name: str) -> str:
    """A record name ("<stem>", "<city>/<stem>" or with "_leftImg8bit") -> the bare Cityscapes stem."""
    return Path(str(name)).name.removesuffix("_leftImg8bit")


def raw_data_root(spec: ShardSpec, split_dir: Path, manifest: Manifest | None) -> Path:
    """The raw dataset folder behind the shards: spec.json `data`, else spec.json
    `prepared` -> manifest.json `data` (`manifest`: that prepared folder's, None when it
    is gone). UserError naming each place looked at."""
    data = spec.data
    if not data and spec.prepared:
        if manifest is None:
            raise UserError(
                f"--full-res: cannot find {Path(spec.prepared) / 'manifest.json'} (named by "
                f"{split_dir / 'spec.json'}) to find the raw dataset; it needs the prepared folder, or "
                "shards packed with a newer urbanseg"
            )
        data = manifest.data
    if not data:
        raise UserError(
            f"--full-res: neither {split_dir / 'spec.json'} nor the prepared manifest names the raw "
            "dataset (`data`); evaluate at the prepared size (drop --full-res)"
        )
    root = Path(data)
    if not (root / "gtFine").is_dir():
        raise UserError(
            f"--full-res needs the raw dataset's ground truth, but {root / 'gtFine'} does not exist (the "
            f"shards were prepared from {root}); restore it there or drop --full-res"
        )
    return root


def _raw_ground_truth(dataset: Any, shards: Path, split: str, label_set: LabelSet) -> RawTruth:
    """Index the raw split's ground-truth files and check every image of the split has one."""
    manifest = _prepared_manifest(dataset.spec)
    recorded = raw_annotations(manifest, split) if manifest is not None else None
    if recorded is not None and manifest is not None:
        return _recorded_truth(*recorded, manifest.source or "labelIds")
    root = raw_data_root(dataset.spec, shards / split, manifest)
    kind = "labelIds" if label_set.from_cityscapes else "color"
    suffix = f"_gtFine_{kind}.png"
    files = {p.name[: -len(suffix)]: p for p in (root / "gtFine" / split).glob(f"*/*{suffix}")}
    if not files:
        raise UserError(
            f"--full-res: no *{suffix} files under {root / 'gtFine' / split}; "
            "restore the raw dataset's gtFine folder or drop --full-res"
        )
    entry = manifest.splits.get(split) if manifest is not None else None
    # Without the manifest each image is checked as it is read.
    stems = list(entry.stems) if entry is not None else []
    missing = [s for s in stems if _stem(s) not in files]
    if missing:
        raise UserError(
            f"--full-res: {len(missing)} of the {len(stems)} {split} images have no *{suffix} under "
            f"{root / 'gtFine' / split}, e.g. {missing[:3]}; restore the raw dataset or drop --full-res"
        )
    return RawTruth(root, files, kind)


def _raw_images(dataset: Any, shards: Path, split: str) -> dict[str, Path]:
    """{stem: raw image} of the split: the Cityscapes layout's leftImg8bit/SPLIT/*/, or the
    images folder of paired folders (its SPLIT/ sub-folder when it has one)."""
    manifest = _prepared_manifest(dataset.spec)
    if manifest is not None and manifest.layout == "pairs" and manifest.data:
        root = Path(manifest.data)
        folder = root / split if (root / split).is_dir() else root
        return {p.stem: p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    folder = raw_data_root(dataset.spec, shards / split, manifest) / "leftImg8bit" / split
    suffix = "_leftImg8bit.png"
    return {p.name[: -len(suffix)]: p for p in folder.glob(f"*/*{suffix}")}


def _recorded_truth(root: Path, files: dict[str, Path], source: str) -> RawTruth:
    """The raw annotations a manifest lists, checked to exist."""
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise UserError(
            f"--full-res: {len(missing)} of the {len(files)} raw annotations the shards were prepared from "
            f"are gone, e.g. {missing[:3]}; restore them or drop --full-res"
        )
    return RawTruth(root, files, source, source)


def _prepared_manifest(spec: ShardSpec) -> Manifest | None:
    """The manifest of the prepared folder the shards were packed from, None when it is gone
    (a manifest that is there but malformed is an error naming it)."""
    path = Path(spec.prepared) / Manifest.FILE if spec.prepared else None
    return Manifest.load(path) if path is not None and path.is_file() else None


class FullResDataset:
    """Shard items plus their raw ground truth: "gt" (H, W) uint8 class indices at the raw
    size, and for Cityscapes-derived label sets "gt_ids" (H, W) uint8 label ids and
    "gt_inst" (H, W) int32 instance ids (for the official scores). Reading happens in the
    DataLoader's workers."""

    def __init__(self, dataset: Any, raw: RawTruth, label_set: LabelSet) -> None:
        self.dataset, self.raw, self.label_set = dataset, raw, label_set

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:

        item = dict(self.dataset[index])
        path = self.raw.path_for(item["name"])
        try:
            if self.raw.source is not None:
                truth = read_truth(path, self.raw.source, self.label_set)
                item["gt"] = truth.classes
                if truth.ids is not None:  # no instance ids: none above 1000, no instance is scored
                    item["gt_ids"] = truth.ids
                    item["gt_inst"] = truth.instances if truth.instances is not None else truth.ids.astype(np.int32)
            elif self.raw.kind == "labelIds":
                item["gt_ids"], item["gt_inst"] = read_ground_truth(path)
                item["gt"] = self.label_set.labels_from_ids(item["gt_ids"])
            else:
                from PIL import Image

                with Image.open(path) as im:
                    item["gt"] = self.label_set.labels_from_colors(np.asarray(im.convert("RGB")))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot use ground truth {path}: {e}") from None
        if self.raw.images is not None:
            image = self.raw.image_for(item["name"])
            try:
                item["raw_image"] = read_image(image)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot use raw image {image}: {e}") from None
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the equal-size shard tensors; keep names and raw ground truth (sizes may differ) as lists."""
    import torch

    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "name": [str(it["name"]) for it in items],
    }
    for key in ("gt", "gt_ids", "gt_inst", "raw_image"):
        if key in items[0]:
            batch[key] = [it[key] for it in items]
    return batch


# --------------------------------------------------------------------------- the loop


@dataclass
class EvalState:
    """What one pass over a split accumulates: the confusion matrix, the official
    evaluator (full resolution, Cityscapes label sets), per-image scores, and the best
    and worst `k` images kept as pictures (min-heaps; memory stays at 2k images)."""

    confusion: Any
    official: Any
    k_best: int
    k_worst: int
    per_image: list[dict[str, Any]] = field(default_factory=list)
    best: list[tuple] = field(default_factory=list)
    worst: list[tuple] = field(default_factory=list)

    def offer(self, row: dict[str, Any], make_pick: Any) -> None:
        """Record an image's scores; keep its arrays (from `make_pick()`, called at most
        once) if it ranks among the best or worst. Ties go to the earlier image."""
        index = len(self.per_image)
        self.per_image.append(row)
        if row["miou"] is None:  # no scored pixel: nothing to rank
            return
        pick = None
        for heap, key, k in ((self.best, row["miou"], self.k_best), (self.worst, -row["miou"], self.k_worst)):
            entry = (key, -index)
            if k and (len(heap) < k or entry > heap[0][:2]):
                pick = pick or make_pick()
                heapq.heappush(heap, (*entry, pick))
                if len(heap) > k:
                    heapq.heappop(heap)

    def picks(self) -> dict[str, list[dict[str, Any]]]:
        """{"best": highest mIoU first, "worst": lowest first}, no image in both."""
        best = [e[2] for e in sorted(self.best, reverse=True)]
        names = {p["name"] for p in best}
        worst = [e[2] for e in sorted(self.worst, reverse=True) if e[2]["name"] not in names]
        return {"best": best, "worst": worst}


def run_evaluation(
    predictor: Predictor,
    dataset: Any,
    label_set: LabelSet,
    *,
    plan: Plan | None = None,
    workers: int = 0,
    gallery: int = 4,
    raw: RawTruth | None = None,
) -> EvalState:
    """One pass of `predictor` over `dataset` (ShardDataset items), each image segmented
    by `urbanseg.inference.plan.label_maps` exactly as `urbanseg predict` segments it;
    with `raw`, the logits are upsampled bilinearly (align_corners=False) to each raw
    ground truth's size and scored there. A predictor projected onto `label_set`
    (`Predictor.project_to`: a classes19 model scored on categories8) has its predicted
    classes mapped after the argmax."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    plan = plan or Plan()
    official = None
    if raw is not None and raw.has_ids and label_set.from_cityscapes:
        official = OfficialEvaluator(label_set)
    n = len(dataset)
    state = EvalState(
        ConfusionMatrix(label_set.num_classes, label_set.ignore_index),
        official,
        k_best=min(gallery, math.ceil(n / 2)),
        k_worst=min(gallery, n // 2),
    )
    source: Any = FullResDataset(dataset, raw, label_set) if raw is not None else dataset  # map-style
    loader = DataLoader(source, batch_size=plan.batch_size, shuffle=False, num_workers=workers, collate_fn=_collate)
    for batch in tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True):
        images = [np.ascontiguousarray(im.permute(1, 2, 0).numpy()) for im in batch["image"]]
        if raw is None:
            preds = label_maps(predictor, images, plan)
            _score(state, batch, images, preds, [lab.numpy() for lab in batch["label"]], label_set)
        elif "raw_image" in batch:  # views made from the raw picture, at its size: predict's output
            images = batch["raw_image"]
            preds = label_maps(predictor, images, plan)
            _score(state, batch, images, preds, batch["gt"], label_set)
        else:
            sizes = [(gt.shape[1], gt.shape[0]) for gt in batch["gt"]]
            preds = label_maps(predictor, images, plan, sizes)
            _score(state, batch, images, preds, batch["gt"], label_set)
    return state


def _score(
    state: EvalState,
    batch: dict[str, Any],
    images: list[np.ndarray],
    preds: list[np.ndarray],
    truths: list[np.ndarray],
    label_set: LabelSet,
) -> None:
    """Score each (H, W) prediction against its ground truth of the same size (the
    prepared label, or the raw one at full resolution, with the official scores)."""
    for i, (name, pred, gt) in enumerate(zip(batch["name"], preds, truths, strict=True)):
        state.confusion.update(pred, gt)
        if state.official is not None:
            state.official.update_classes(pred, batch["gt_ids"][i], batch["gt_inst"][i], name=name)
        row = image_scores(pred[None], gt[None], label_set.num_classes, label_set.ignore_index)[0]

        def make_pick(name: str = name, row: dict = row, gt: np.ndarray = gt, pred: np.ndarray = pred, i: int = i):
            image = images[i]
            if image.shape[:2] != gt.shape:
                import cv2

                image = cv2.resize(image, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR)
            return {
                "name": name,
                "miou": row["miou"],
                "pixel_accuracy": row["pixel_accuracy"],
                "image": image.copy(),
                "label": np.asarray(gt, np.uint8),
                "pred": pred,
            }

        state.offer({"name": name, **row}, make_pick)


def _model_summary(predictor: Predictor, path: Path, is_onnx: bool) -> tuple[dict[str, Any], dict | None]:
    """(`checkpoint.summarize_checkpoint`'s facts, the training config) for a checkpoint;
    for an ONNX model the same facts from its metadata (parameters: the graph's weights)."""
    from urbanseg.checkpoint import load_checkpoint, summarize_checkpoint

    if "summary" in predictor.info:  # a TorchPredictor read them from the checkpoint already
        return predictor.info["summary"], predictor.info["training_config"]
    if not is_onnx:  # the checkpoint behind a cached ONNX export
        ckpt = load_checkpoint(path)
        return summarize_checkpoint(ckpt), ckpt.get("config")
    info, label_set = predictor.info, predictor.label_set
    model = info.get("model") or {}
    return {
        "model": model.get("name", path.stem),
        "model_kwargs": model.get("kwargs", {}),
        "parameters": _onnx_parameters(path),
        "label_set": label_set.name,
        "classes": list(label_set.classes),
        "input_size": list(predictor.input_size),
        "step": info.get("step"),
        "epoch": info.get("epoch"),
        "metrics": info.get("metrics") or {},
        "urbanseg_version": info.get("urbanseg_version"),
        "resumable": False,
    }, None


def _onnx_parameters(path: Path) -> int:
    """Elements of an ONNX graph's weight tensors (initializers of more than one element)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return sum(n for t in proto.graph.initializer if (n := math.prod(t.dims)) > 1)


# --------------------------------------------------------------------------- context


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any) -> dict[str, Any]:
    """Hardware and versions for the report header: CPU model and cores, GPU name."""

    import torch

    gpu = torch.cuda.get_device_name(device) if getattr(device, "type", "") == "cuda" else None
    return {
        "cpu": _cpu_name(),
        "cpu_cores": default_workers(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": gpu,
        "urbanseg": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def _info(
    config: EvaluateConfig,
    plan: Plan,
    summary: dict[str, Any],
    training: dict | None,
    ckpt_path: Path,
    shards: Path,
    dataset: Any,
    predictor: Predictor,
    seconds: float,
    state: EvalState,
    raw: RawTruth | None,
) -> dict[str, Any]:
    """Everything metrics.json records about how the figures were made; `summary` is
    `checkpoint.summarize_checkpoint`, `training` the checkpoint's training config."""

    spec = dataset.spec
    return {
        "format_version": 1,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "split": config.split,
        "protocol": "full-res" if config.full_res else "prepared",
        "tta": {"flip": plan.tta.flip, "scales": list(plan.tta.scales)},
        "views_from": "raw images" if raw is not None and raw.images is not None else "shard images",
        "prepared_size": [spec.width, spec.height],
        "num_images": len(state.per_image),
        "seconds": round(seconds, 3),
        "label_set": dataset.label_set.name,
        "data": {"shards": str(shards), "raw": raw.root.as_posix() if raw else None},
        "checkpoint": {
            "path": str(ckpt_path),
            "step": summary["step"],
            "epoch": summary["epoch"],
            "model": {"name": summary["model"], "kwargs": summary["model_kwargs"]},
            "parameters": summary["parameters"],
            "input_size": summary["input_size"],
            "metrics_at_save": summary["metrics"],
            "urbanseg_version": summary["urbanseg_version"],
        },
        "engine": predictor.info.get("engine", type(predictor).__name__),
        "environment": environment(getattr(predictor, "device", "cpu")),
        "training_config": training,
        "model_run": plan.why,
    }


_TRAINING_KEYS = (
    "epochs",
    "iters",
    "batch_size",
    "crop",
    "optimizer",
    "lr",
    "schedule",
    "loss",
    "class_weights",
    "augment",
    "seed",
)


def _header(info: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the report header, from `_info` and the checkpoint's summary."""
    from urbanseg.checkpoint import summary_rows

    env, facts = info["environment"], dict(summary_rows(summary))
    train = info.get("training_config") or {}
    training = ", ".join(f"{k}={train[k]}" for k in _TRAINING_KEYS if train.get(k) is not None)
    w, h = info["prepared_size"]
    n, s = info["num_images"], info["seconds"]
    tta = TTA(tuple(info["tta"]["scales"]), info["tta"]["flip"])
    protocol = (
        f"full resolution: logits upsampled bilinearly to the raw ground truth in {info['data']['raw']}"
        if info["protocol"] == "full-res"
        else f"prepared size {w}x{h}, against the labels in the shards"
    )
    hardware = f"{env['cpu']} ({env['cpu_cores']} cores), device {env['device']}" + (
        f" ({env['gpu']})" if env["gpu"] else ""
    )
    pretrained = list((info.get("pretrained") or {}).items())
    scoring = [("model run", info["model_run"])] if info.get("model_run") else []
    scoring += [("labels", info["projection"])] if info.get("projection") else []
    return [
        ("date", info["date"]),
        ("checkpoint", f"{info['checkpoint']['path']} ({facts['progress']}; written by {facts['written by']})"),
        *pretrained,
        ("model", f"{facts['model']}, trained at {facts['input size']}"),
        ("training", training or "config not recorded in the checkpoint"),
        ("data", f"{info['data']['shards']}, split {info['split']}: {n} images, label set {info['label_set']}"),
        ("protocol", protocol + ("" if tta.plain else f"; test-time augmentation: {tta.describe()}")),
        *scoring,
        ("hardware", hardware),
        ("engine", info["engine"]),
        ("versions", f"urbanseg {env['urbanseg']}, torch {env['torch']}, python {env['python']}"),
        ("time", f"{s:.1f} s ({1000 * s / max(n, 1):.0f} ms per image, data loading included)"),
    ]

"""The files of an evaluation report, from numbers and arrays alone (no model, no data).

- `confusion_figure`: the row-normalised confusion matrix as a heatmap with class names.
- `gallery_picture`: image | ground truth | prediction | error map, titled, with a legend
  (the original project's success and failure examples).
- `markdown_report`: report.md in the original's layout plus a header telling how the
  figures were made; `html_report`: one page bringing the figures and pictures
  together, with relative links to the PNGs beside it (opens from file://, no server).

Figures are drawn with matplotlib's Agg backend on a private `Figure` (no pyplot state),
so this works headless and in worker threads.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from urbanseg.evaluation.metrics import format_table
from urbanseg.labels import LabelSet
from urbanseg.util import atomic_path, atomic_write_text

# Error map colours: wrong pixels stand out over a dimmed copy of the image; ignored
# ground truth (not scored) is flat grey so it reads as "no verdict".
ERROR_COLOR = (255, 32, 32)
IGNORE_COLOR = (128, 128, 128)
NA_FOOTNOTE = (
    "n/a: the class is absent from both the ground truth and the predictions of this split, "
    "so its scores are undefined; it is left out of the averages."
)


# --------------------------------------------------------------------------- figures


def _rgb01(rgb: Sequence[int]) -> tuple[float, float, float]:
    """An 8-bit colour as matplotlib's 0..1 floats."""
    r, g, b = (v / 255 for v in rgb)
    return r, g, b


def _figure(
    width_px: float, height_px: float, dpi: int = 100, layout: Literal["constrained", "tight"] | None = None
) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout=layout)


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor="white")


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """(C, C) int64 counts (rows = ground truth) -> (C, C) float64 fractions of each row;
    a row with no ground-truth pixels is NaN (drawn blank), not 0 (which would read as
    "never right")."""
    m = np.asarray(matrix, dtype=np.float64)
    totals = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, m / np.where(totals > 0, totals, 1), np.nan)


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], path: Path, *, title: str = "") -> None:
    """Write the (C, C) confusion matrix (rows = ground truth) as a row-normalised
    heatmap PNG: cell (i, j) is the share of class i's pixels predicted as class j."""
    norm = normalize_rows(matrix)
    c = len(class_names)
    side = max(4.0, 0.36 * c + 2.0)  # inches: room for the names and a readable cell
    fig = _figure(side * 100 + 90, side * 100, layout="constrained")
    ax = fig.add_subplot()
    img = ax.imshow(np.ma.masked_invalid(norm), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(img, ax=ax, label="share of the ground-truth class's pixels", shrink=0.8)
    ax.set_xticks(range(c), labels=class_names, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(c), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    ax.set_title(title or "confusion matrix (% of each ground-truth row)")
    if c <= 20:  # numbers in the cells stay legible up to Cityscapes' 19 classes
        size = 9 if c <= 10 else 7
        for i, j in zip(*np.nonzero(np.isfinite(norm)), strict=True):
            v = norm[i, j]
            ax.text(
                j,
                i,
                f"{100 * v:.0f}" if v >= 0.005 else "",
                ha="center",
                va="center",
                fontsize=size,
                color="white" if v > 0.6 else "black",
            )
    _save_figure(fig, path)


def error_map(image: np.ndarray, label: np.ndarray, pred: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) ground truth and prediction -> (H, W, 3) uint8:
    wrong pixels in ERROR_COLOR, ignored ground truth in IGNORE_COLOR, correct pixels a
    dimmed grey copy of the image (context for where the errors are)."""
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    out = np.repeat((grey * 0.35 + 20.0).astype(np.uint8)[..., None], 3, axis=2)
    ignore = label == ignore_index
    out[(label != pred) & ~ignore] = ERROR_COLOR
    out[ignore] = IGNORE_COLOR
    return out


def _shrink(array: np.ndarray, max_width: int, nearest: bool) -> np.ndarray:
    """Downscale so the width is at most max_width: area averaging for photos, nearest
    neighbour for label maps (their colours must stay palette colours)."""
    import cv2

    h, w = array.shape[:2]
    if w <= max_width:
        return array
    size = (max_width, max(1, round(h * max_width / w)))
    return cv2.resize(array, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def gallery_picture(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    label_set: LabelSet,
    path: Path,
    *,
    title: str,
    max_panel_width: int = 512,
) -> None:
    """Write one PNG: image | ground truth | prediction | error map, titled, with a
    legend of the classes and of the error colours.

    image: (H, W, 3) uint8; label, pred: (H, W) uint8/int class indices, 255 = ignore.
    Panels wider than `max_panel_width` are shrunk (full-resolution evaluations)."""
    from matplotlib.patches import Patch

    ignore = label_set.ignore_index
    panels = [
        ("image", _shrink(image, max_panel_width, nearest=False)),
        ("ground truth", _shrink(label_set.colorize(label, IGNORE_COLOR), max_panel_width, nearest=True)),
        ("prediction", _shrink(label_set.colorize(pred, IGNORE_COLOR), max_panel_width, nearest=True)),
        ("errors", _shrink(error_map(image, label, pred, ignore), max_panel_width, nearest=True)),
    ]
    h, w = panels[0][1].shape[:2]
    # Text scales with the panels so it stays legible when a browser fits the picture
    # to its width; sizes in points, 1 pt = 100/72 px at dpi 100.
    fs = float(np.clip(w / 40, 8, 14))
    px = 100 / 72
    names = [*label_set.classes, "wrong", "ignored"]
    entry = 0.85 * fs * px * (0.6 * max(map(len, names)) + 3.5)  # a legend entry's width in px, roughly
    ncol = int(np.clip((4 * w + 50) // entry, 1, 10))
    legend_rows = math.ceil(len(names) / ncol)
    head, foot = 2.9 * fs * px + 12, legend_rows * 1.9 * 0.85 * fs * px + 10
    fig = _figure(4 * w + 50, h + head + foot)
    top, bottom = 1 - head / fig.bbox.height, foot / fig.bbox.height
    for k, (name, panel) in enumerate(panels):
        ax = fig.add_axes((0.01 + k * 0.245, bottom, 0.235, top - bottom))
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(name, fontsize=fs)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=1.2 * fs, y=1 - 6 / fig.bbox.height, va="top")
    handles = [
        Patch(facecolor=_rgb01(c), edgecolor="black", label=n)
        for n, c in zip(label_set.classes, label_set.palette, strict=True)
    ]
    handles += [
        Patch(facecolor=_rgb01(ERROR_COLOR), label="wrong"),
        Patch(facecolor=_rgb01(IGNORE_COLOR), label="ignored"),
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=ncol,
        fontsize=0.85 * fs,
        frameon=False,
        handlelength=1.2,
        columnspacing=1.0,
        borderaxespad=0.3,
    )
    _save_figure(fig, path)


# --------------------------------------------------------------------------- markdown


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def gallery_sections(gallery: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(key, heading, entries) for the non-empty gallery groups, best first."""
    headings = {"best": "Best images (highest per-image mIoU)", "worst": "Worst images (lowest per-image mIoU)"}
    return [(k, headings.get(k, k), gallery[k]) for k in ("best", "worst") if gallery.get(k)]


def markdown_report(
    result: dict[str, Any],
    class_names: Sequence[str],
    *,
    title: str,
    header: Sequence[tuple[str, str]],
    official_md: str = "",
    gallery: dict[str, list[dict[str, Any]]] | None = None,
) -> str:
    """report.md: a header (what was evaluated, where, with what), the original project's
    table (a row per class: iou | precision | recall | f1_score, then average, via
    `metrics.format_table`), overall accuracies, optional official Cityscapes scores and
    links to the figures.

    result: `ConfusionMatrix.compute()`; header: (label, value) rows; gallery: {"best"|
    "worst": [{"file", "name", "miou", "pixel_accuracy"}, ...]} with paths relative to
    the report."""

    lines = [f"# {title}", ""]
    lines += [f"- **{k}:** {v}" for k, v in header]
    lines += ["", "## Scores", "", format_table(result, list(class_names)).rstrip("\n"), ""]
    lines += [
        f"- pixel accuracy: {_cell(result['pixel_accuracy'])}",
        f"- mean accuracy (mean recall over classes with ground truth): {_cell(result['mean_accuracy'])}",
        f"- scored pixels: {result['pixels']:,}",
    ]
    if result.get("invalid_predictions"):
        lines.append(f"- pixels predicted outside the classes (counted as misses): {result['invalid_predictions']:,}")
    lines.append("")
    if official_md:
        lines += [official_md.rstrip("\n"), ""]
    lines += ["## Figures", "", "![confusion matrix](confusion.png)", ""]
    for _, heading, entries in gallery_sections(gallery or {}):
        lines += [f"### {heading}", ""]
        for e in entries:
            lines += [
                f"{e['name']}: mIoU {_cell(e['miou'])}, pixel accuracy {_cell(e['pixel_accuracy'])}",
                "",
                f"![{e['name']}]({e['file']})",
                "",
            ]
    lines += ["Every figure: `metrics.json`; per-image scores: `per_image.csv`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- html

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1280px;
  padding:24px;color:#1d232a;background:#fff}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #d8dee4;
  padding-bottom:4px} h3{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{padding:4px 10px;border-bottom:1px solid #e4e8ec;text-align:right} th{background:#f4f6f8}
td:first-child,th:first-child{text-align:left}
.meta td,.meta th{text-align:left;border:0;padding:2px 12px 2px 0;vertical-align:top} .meta th{background:none;
  color:#57606a;font-weight:600;white-space:nowrap}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #d8dee4;border-radius:8px;padding:10px 16px;min-width:130px}
.card b{display:block;font-size:24px} .card span{color:#57606a;font-size:13px}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #333;margin-right:6px;vertical-align:-1px}
.bar{display:inline-block;height:9px;background:#3b82c4;margin-left:8px;vertical-align:0}
tr.avg td{font-weight:600;border-top:2px solid #8c959f} .na{color:#8c959f}
.note{color:#57606a;font-size:13px;max-width:900px}
figure{margin:0 0 18px} figure img{max-width:100%;border:1px solid #e4e8ec}
figcaption{font-size:13px;color:#57606a}
#img-warning{display:none;background:#fff4d6;border:1px solid #d4a72c;padding:8px 12px;border-radius:6px}
"""

# Marks the page with how many of its images loaded (data-images-loaded="n/total") and
# shows a warning when some did not: report.html links to the PNGs beside it, so a copy
# moved on its own loses them. Headless-browser tests read the same attribute.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
  if (ok < imgs.length) { document.getElementById("img-warning").style.display = "block"; }
});
"""


def _html_cell(value: float | None) -> str:
    return '<td class="na">n/a</td>' if value is None else f"<td>{value:.4f}</td>"


def _class_table(result: dict[str, Any], label_set: LabelSet) -> str:
    pc, esc = result["per_class"], html.escape
    total = max(1, sum(pc["gt_pixels"]))
    rows = [
        "<tr><th>class</th><th>iou</th><th>precision</th><th>recall</th><th>f1_score</th>"
        "<th>share of ground truth</th></tr>"
    ]
    for i, (name, rgb) in enumerate(zip(label_set.classes, label_set.palette, strict=True)):
        iou = pc["iou"][i]
        swatch = f'<span class="sw" style="background:rgb{tuple(rgb)}"></span>'
        # iou with a bar whose length is the score: the weak classes stand out at a glance
        cells = (
            _html_cell(iou)
            if iou is None
            else (f'<td>{iou:.4f}<span class="bar" style="width:{round(80 * iou)}px"></span></td>')
        )
        cells += "".join(_html_cell(pc[k][i]) for k in ("precision", "recall", "f1"))
        rows.append(f"<tr><td>{swatch}{esc(name)}</td>{cells}<td>{100 * pc['gt_pixels'][i] / total:.2f}%</td></tr>")
    means = "".join(_html_cell(result[k]) for k in ("miou", "mean_precision", "mean_recall", "mean_f1"))
    rows.append(f'<tr class="avg"><td>average</td>{means}<td></td></tr>')
    return "<table>" + "\n".join(rows) + "</table>"


def _cards(result: dict[str, Any], num_images: int) -> str:
    cards = [
        ("mIoU", _cell(result["miou"])),
        ("pixel accuracy", _cell(result["pixel_accuracy"])),
        ("mean accuracy", _cell(result["mean_accuracy"])),
        ("images", f"{num_images:,}"),
        ("scored classes", f"{result['scored_classes']} of {result['num_classes']}"),
    ]
    return (
        '<div class="cards">'
        + "".join(f'<div class="card"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>' for k, v in cards)
        + "</div>"
    )


def _gallery_html(gallery: dict[str, list[dict[str, Any]]]) -> str:
    parts = []
    for _, heading, entries in gallery_sections(gallery):
        parts.append(f"<h3>{html.escape(heading)}</h3>")
        for e in entries:
            src = html.escape(e["file"], quote=True)
            parts.append(
                f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(e["name"], quote=True)}" loading="eager">'
                f"</a><figcaption>{html.escape(e['name'])}: mIoU {_cell(e['miou'])}, pixel accuracy "
                f"{_cell(e['pixel_accuracy'])}</figcaption></figure>"
            )
    return "\n".join(parts) or '<p class="note">No gallery (--gallery 0).</p>'


def html_report(
    result: dict[str, Any],
    label_set: LabelSet,
    *,
    title: str,
    header: Sequence[tuple[str, str]],
    num_images: int,
    official_html: str = "",
    gallery: dict[str, list[dict[str, Any]]] | None = None,
) -> str:
    """report.html: one page with no external resources (inline CSS, relative links to
    confusion.png and the gallery PNGs beside it), readable from file:// in any browser.
    Same inputs as `markdown_report`; `official_html` is an optional ready-made section."""
    esc = html.escape
    meta = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in header)
    invalid = result.get("invalid_predictions") or 0
    invalid_note = f" {invalid:,} pixels were predicted outside the classes and count as misses." if invalid else ""
    body = f"""<h1>{esc(title)}</h1>
<div id="img-warning">Some pictures did not load: keep report.html in its folder, beside confusion.png and
gallery/.</div>
<table class="meta">{meta}</table>
{_cards(result, num_images)}
<h2>Scores per class</h2>
{_class_table(result, label_set)}
<p class="note">Dataset-level scores: pixel counts are summed over all {num_images:,} images before the ratios are
taken. Pixel accuracy is the share of the {result["pixels"]:,} scored pixels predicted right; mean accuracy is
the mean recall over the classes with ground truth. {esc(NA_FOOTNOTE)}{esc(invalid_note)}</p>
{official_html}
<h2>Confusion matrix</h2>
<p class="note">Each row is a ground-truth class; a cell is the share of its pixels predicted as the column's class
(the diagonal is the recall).</p>
<figure><a href="confusion.png"><img src="confusion.png" alt="confusion matrix" style="max-width:760px"></a></figure>
<h2>Examples</h2>
<p class="note">Each picture: image | ground truth | prediction | error map (red: wrong; grey: ignored, not scored).
Click a picture for full size.</p>
{_gallery_html(gallery or {})}
<h2>Files</h2>
<p><a href="metrics.json">metrics.json</a> (every figure) &middot; <a href="per_image.csv">per_image.csv</a>
(per-image mIoU and pixel accuracy) &middot; <a href="report.md">report.md</a></p>"""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<style>{_CSS}</style>\n'
        f"<script>{_SCRIPT}</script></head>\n<body>\n{body}\n</body></html>\n"
    )


# --------------------------------------------------------------------------- official scores

_OFFICIAL_LEVELS = (("class", "classes"), ("category", "categories"))


def _official_rows(official: dict[str, Any], level: str) -> list[tuple[str, str, str]]:
    """(name, iou, iiou) rows of one level ("class" or "category"), then the average;
    "-" where the official script has no iIoU (labels without instances)."""
    iou, iiou = official[f"{level}_iou"], official[f"{level}_iiou"]
    rows = [(name, _cell(v), _cell(iiou[name]) if name in iiou else "-") for name, v in iou.items()]
    rows.append(("average", _cell(official[f"mean_{level}_iou"]), _cell(official[f"mean_{level}_iiou"])))
    return rows


def official_tables(official: dict[str, Any]) -> tuple[str, str]:
    """Markdown and HTML sections for the official Cityscapes scores
    (`cityscapes_eval.OfficialEvaluator.compute()`), at each level present in it."""
    intro = (
        f"Computed as cityscapesscripts' evalPixelLevelSemanticLabeling does, on {official['images']:,} images "
        f"at the raw ground truth's resolution ({official['pixels']:,} pixels); iIoU weighs each instance as "
        "an average-sized one; n/a = no ground truth and no false positive (the script's nan)."
    )
    md = ["## Official Cityscapes scores", "", intro, ""]
    parts = ["<h2>Official Cityscapes scores</h2>", f'<p class="note">{html.escape(intro)}</p>']
    for level, plural in _OFFICIAL_LEVELS:
        if f"{level}_iou" not in official:
            continue
        rows = _official_rows(official, level)
        md += [f"| {level} | IoU | iIoU |", "|-|-|-|", *(f"| {n} | {a} | {b} |" for n, a, b in rows), ""]
        body = "".join(
            f"<tr{' class=avg' if n == 'average' else ''}><td>{html.escape(n)}</td>"
            + "".join('<td class="na">n/a</td>' if v == "n/a" else f"<td>{v}</td>" for v in (a, b))
            + "</tr>"
            for n, a, b in rows
        )
        parts.append(
            f"<div><h3>{plural}</h3><table><tr><th>{level}</th><th>IoU</th><th>iIoU</th></tr>{body}</table></div>"
        )
    # The class and category tables side by side: both fit the page width.
    return "\n".join(md), parts[0] + parts[1] + '<div class="cards">' + "".join(parts[2:]) + "</div>"


# --------------------------------------------------------------------------- all files


def per_image_csv(rows: Sequence[dict[str, Any]]) -> str:
    """per_image.csv text: name, miou, pixel_accuracy, pixels (empty cell for None)."""

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "miou", "pixel_accuracy", "pixels"])
    for r in rows:
        writer.writerow(
            [r["name"], *("" if r[k] is None else f"{r[k]:.6f}" for k in ("miou", "pixel_accuracy")), r["pixels"]]
        )
    return buf.getvalue()


def write_gallery(
    out: Path, picks: dict[str, list[dict[str, Any]]], label_set: LabelSet, *, max_panel_width: int = 512
) -> dict[str, list[dict[str, Any]]]:
    """Draw each pick into out/gallery/<group>_<rank>_<stem>.png; old pictures there are removed.

    picks: {"best"|"worst": [{"name", "miou", "pixel_accuracy", "image" (H, W, 3) uint8,
    "label" (H, W), "pred" (H, W)}, ...]} in rank order. Returns the same groups without
    the arrays and with "file" (relative to `out`)."""
    folder = out / "gallery"
    for old in folder.glob("*.png") if folder.is_dir() else ():
        old.unlink()
    entries: dict[str, list[dict[str, Any]]] = {}
    for group, items in picks.items():
        entries[group] = []
        for rank, item in enumerate(items, 1):
            stem = Path(str(item["name"])).name
            rel = f"gallery/{group}_{rank:02d}_{stem}.png"
            title = (
                f"{group} #{rank}: {item['name']}  (mIoU {_cell(item['miou'])}, "
                f"pixel accuracy {_cell(item['pixel_accuracy'])})"
            )
            gallery_picture(
                item["image"],
                item["label"],
                item["pred"],
                label_set,
                out / rel,
                title=title,
                max_panel_width=max_panel_width,
            )
            entries[group].append({"file": rel, **{k: item[k] for k in ("name", "miou", "pixel_accuracy")}})
    return entries


def write_report(
    out: Path,
    *,
    result: dict[str, Any],
    matrix: np.ndarray,
    label_set: LabelSet,
    title: str,
    header: Sequence[tuple[str, str]],
    per_image: Sequence[dict[str, Any]],
    picks: dict[str, list[dict[str, Any]]],
    info: dict[str, Any],
    official: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write every report file into `out` and return their paths by name.

    Pictures first and the pages last, each file atomically, so a page never links to a
    picture that is not there. metrics.json holds `info` (what was evaluated), the
    scores (`result` from `ConfusionMatrix.compute`), the (C, C) int64 confusion
    `matrix`, the official scores if any, and the gallery entries."""

    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "confusion": out / "confusion.png",
        "metrics": out / "metrics.json",
        "per_image": out / "per_image.csv",
        "markdown": out / "report.md",
        "html": out / "report.html",
    }
    confusion_figure(matrix, label_set.classes, paths["confusion"])
    gallery = write_gallery(out, picks, label_set)
    doc = {
        **info,
        "classes": list(label_set.classes),
        "metrics": result,
        "confusion_matrix": np.asarray(matrix).tolist(),
        "official": official,
        "gallery": gallery,
    }
    atomic_write_text(paths["metrics"], json.dumps(doc, indent=2) + "\n")
    atomic_write_text(paths["per_image"], per_image_csv(per_image))
    official_md, official_html = official_tables(official) if official else ("", "")
    atomic_write_text(
        paths["markdown"],
        markdown_report(
            result, label_set.classes, title=title, header=header, official_md=official_md, gallery=gallery
        ),
    )
    atomic_write_text(
        paths["html"],
        html_report(
            result,
            label_set,
            title=title,
            header=header,
            num_images=len(per_image),
            official_html=official_html,
            gallery=gallery,
        ),
    )
    return paths

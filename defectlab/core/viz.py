"""Static figures: one style, image grids, real-vs-generated, datasets, sweeps, saving at print
quality, and showing them inline. Run-specific figures and tables are ``report.py``'s, the
interactive explorer is ``explorer.py``.

Figures are built on ``matplotlib.figure.Figure`` directly instead of ``pyplot``: no global
figure list to leak in loops, no backend needed, and Jupyter still shows a returned figure
once (pyplot would show it a second time at the end of the cell). Neither pyplot nor
ipywidgets is imported, so stages can draw their figures without notebook extras.
"""
from __future__ import annotations

import io
import re
import textwrap
from pathlib import Path
from typing import Iterable

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from ..base.errors import DefectlabError
from ..base.images import to_numpy
from ..base.runs import atomic_write
from ..data import dataset, sources as data_mod

DPI = 200                               # raster figures are saved at this resolution
FORMATS = ("png", "pdf", "svg")         # what save_figure writes
CELL = 1.1                              # inches per image cell: readable at 4-16 columns
STYLE = {                               # shared rcParams: every figure looks the same in a report
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "figure.titlesize": 11,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.05,
    "pdf.fonttype": 42,                 # TrueType (Type 42) fonts in PDF, as journals ask
    "ps.fonttype": 42,
    "svg.fonttype": "none",             # SVG text stays text (editable), not outlined paths
}


def style():
    """``with viz.style(): ...`` — the shared look, without touching the global rcParams."""
    return matplotlib.rc_context(STYLE)


def _label(name: str, width: int = 14) -> str:
    # class folder names use underscores (MVTec "thread_side"); wrap so long names fit a cell
    return "\n".join(textwrap.wrap(str(name).replace("_", " "), width)) or str(name)


PHRASE_BREAKS = (" · ", " — ", "; ", ": ")   # where a title may wrap: between its phrases


def _wrap(title: str | None, width_in: float) -> str | None:
    """Wrap a figure title to the figure's width (about 11 characters per inch at 11 pt), so a
    long sampler tag over a 2-column grid is not cut off: between phrases (``PHRASE_BREAKS``),
    inside a phrase only when it alone is wider than the figure."""
    if not title:
        return None
    width = max(16, int(width_in * 11))
    phrases = re.split("|".join(f"(?<={re.escape(sep)})" for sep in PHRASE_BREAKS), title)  # separators kept
    lines = [""]
    for ph in phrases:
        if lines[-1] and len((lines[-1] + ph).rstrip()) > width:
            lines.append("")
        lines[-1] += ph
    return "\n".join(w for line in lines for w in (textwrap.wrap(line.strip(), width) or [""]))


def _grid(fig, images: list[list[np.ndarray | None]], col_titles: list[str], row_labels: list[str] | None = None):
    """Fill ``fig`` (a Figure or SubFigure) with a rows × cols image grid; ``None`` = empty cell;
    ``row_labels`` beside the first column."""
    rows, cols = len(images), len(col_titles)
    shape = next((img.shape for row in images for img in row if img is not None), (1, 1, 3))
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            img = images[r][c]
            # a missing image is a light grey cell of the same size, so columns stay aligned
            ax.imshow(img if img is not None else np.full(shape, 0.94), interpolation="nearest", vmin=0, vmax=1)
            if r == 0:
                ax.set_title(_label(col_titles[c]), pad=3)
        if row_labels:
            axes[r, 0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center")
    return axes


def grid_figure(images: torch.Tensor, class_names: list[str], rows: int | None = None,
                title: str | None = None, row_labels: list[str] | None = None) -> Figure:
    """Columns = classes, rows = samples (the original experiments' grid).

    ``images`` are [N,3,H,W] in [-1, 1], ordered class by class: ``images[c * rows + r]`` is
    sample ``r`` of ``class_names[c]``. ``rows`` defaults to ``N // len(class_names)``;
    ``row_labels`` default to the sample index (``#r``, the index that seeds the image) when
    there is more than one row.
    """
    cols = len(class_names)
    if cols == 0:
        raise DefectlabError("grid_figure needs at least one class name")
    rows = rows or len(images) // cols
    if rows < 1 or len(images) != rows * cols:
        raise DefectlabError(f"grid_figure: {len(images)} images do not fill {cols} classes × {rows} rows")
    arr = to_numpy(images)
    cells = [[arr[c * rows + r] for c in range(cols)] for r in range(rows)]
    row_labels = row_labels or ([f"#{r}" for r in range(rows)] if rows > 1 else None)
    if row_labels is not None and len(row_labels) != rows:
        raise DefectlabError(f"grid_figure: {len(row_labels)} row labels for {rows} rows")
    with style():
        title = _wrap(title, CELL * cols)
        extra = 0.3 * (title.count("\n") + 1) if title else 0
        fig = Figure(figsize=(CELL * cols, CELL * rows + 0.45 + extra), layout="constrained")
        fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.02, hspace=0.02)
        _grid(fig, cells, class_names, row_labels)
        if title:
            fig.suptitle(title)
    return fig


def real_vs_generated_figure(real: dict[str, torch.Tensor], gen: dict[str, torch.Tensor],
                             rows: int = 4, title: str | None = None) -> Figure:
    """Two stacked grids sharing columns (classes): real images on top, generated below
    (``stacked_figure`` with those two groups)."""
    return stacked_figure({"real": real, "generated": gen}, rows, title)


def stacked_figure(groups: dict[str, dict[str, torch.Tensor]], rows: int = 4, title: str | None = None) -> Figure:
    """Stacked grids sharing columns (classes), one per group (e.g. real / generated / cut-paste),
    each labelled on its left. Each group maps a class name to [n,3,H,W] in [-1, 1]; up to
    ``rows`` of each are shown and a class missing from a group leaves its cells empty."""
    names = list(dict.fromkeys(c for group in groups.values() for c in group))
    if not names:
        raise DefectlabError("stacked_figure: no classes given")

    def cells(d: dict[str, torch.Tensor]) -> list[list[np.ndarray | None]]:
        arrs = {k: to_numpy(v)[:rows] for k, v in d.items() if len(v)}
        n = max([len(a) for a in arrs.values()], default=1)
        return [[arrs[k][r] if k in arrs and r < len(arrs[k]) else None for k in names] for r in range(n)]

    grids = {label: cells(group) for label, group in groups.items()}
    with style():
        title = _wrap(title, CELL * len(names) + 0.4)
        extra = 0.3 * (title.count("\n") + 1) if title else 0
        fig = Figure(figsize=(CELL * len(names) + 0.4, CELL * sum(map(len, grids.values())) + 0.55 * len(grids) + extra),
                     layout="constrained")
        subs = fig.subfigures(len(grids), 1, height_ratios=[len(g) + 0.5 for g in grids.values()], squeeze=False)[:, 0]
        for sub, (label, grid) in zip(subs, grids.items()):
            _grid(sub, grid, names)
            sub.supylabel(label, fontsize=STYLE["figure.titlesize"])
        if title:
            fig.suptitle(title)
    return fig


def save_figure(fig: Figure, folder: str | Path, name: str, formats: str | Iterable[str] = ("png",)) -> list[Path]:
    """Write ``<folder>/<name>.<fmt>`` for each format (png at 200 dpi; pdf/svg on request),
    each atomically so a report never picks up a half-written file."""
    fmts = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise DefectlabError(f"unknown figure format {', '.join(bad) or '(none)'}; use {', '.join(FORMATS)}")
    out = []
    for fmt in fmts:
        path = Path(folder) / f"{name}.{fmt}"
        # the temp file has no image suffix, so the format is given explicitly; font embedding
        # (STYLE: Type 42 in PDF, text in SVG) is read at save time, so the style holds here too
        with style():
            out.append(atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=DPI)))
    return out


# ----------------------------------------------------------------------------- display
def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure (screen resolution by default; ``save_figure`` writes the print copy)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(*objs, dpi: int = 100) -> None:
    """Show figures, saved image files, or ``(name, figure)`` pairs inline as images. Works
    whatever the matplotlib backend (papermill kernels may inherit ``MPLBACKEND=Agg``, where a
    returned Figure prints as text); files saved at ``DPI`` are shown at half size, so they look
    like the on-screen figures."""
    try:
        from IPython.display import SVG, Image, display
    except ImportError:  # plain Python: nothing to show inline
        print(*objs)
        return
    for obj in objs:
        if isinstance(obj, tuple):
            obj = obj[-1]
        if isinstance(obj, (str, Path)) and Path(obj).suffix.lower() in (".svg", ".pdf"):
            display(SVG(filename=str(obj)) if Path(obj).suffix.lower() == ".svg" else f"saved: {obj}")
        elif isinstance(obj, (str, Path)):
            display(Image(filename=str(obj), retina=True))
        else:
            display(Image(data=figure_png(obj, dpi)))


# ----------------------------------------------------------------------------- datasets
MASK_RGB = np.array([1.0, 0.1, 0.1])    # mask overlay colour (red)


def _overlay(img: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    m = mask[..., None] * alpha
    return np.clip(img * (1 - m) + MASK_RGB * m, 0, 1)  # float rounding of the blend: up to 1 + 3e-8


def dataset_figure(data, per_class: int = 6, with_masks: bool = True, size: int = 96,
                   title: str | None = None) -> Figure:
    """One row per defect class (plus ``good`` when there are defect-free images), ``per_class``
    examples per row from train + test, masks tinted red with an outline. ``data`` is a
    ``data.DefectData`` (``data.load``)."""
    if per_class < 1:
        raise DefectlabError(f"per_class must be ≥ 1 (got {per_class})")
    by_class = {c: [s for s in [*data.train, *data.test] if s.defect == c] for c in data.classes}
    rows = ([("good", [(g, None) for g in data.good[:per_class]], len(data.good))] if data.good else []) + \
        [(c, [(s.image, s.mask) for s in sorted(v, key=lambda s: s.image)[:per_class]], len(v)) for c, v in by_class.items()]
    cols = max(len(items) for _, items, _ in rows)
    with style():
        fig = Figure(figsize=(0.9 * CELL * cols + 0.9, 0.9 * CELL * len(rows) + 0.5 + (0.3 if title else 0)),
                     layout="constrained")
        fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.02, hspace=0.02)
        axes = fig.subplots(len(rows), cols, squeeze=False)
        for r, (name, items, count) in enumerate(rows):
            for c in range(cols):
                ax = axes[r, c]
                ax.set_xticks([]), ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_visible(False)
                if c >= len(items):
                    ax.set_visible(False)
                    continue
                image_path, mask_path = items[c]
                img = to_numpy(dataset.load_image(image_path, size))[0]
                if with_masks and mask_path is not None:
                    mask = dataset.load_mask(mask_path, size)[0].numpy()
                    ax.imshow(_overlay(img, mask), interpolation="nearest", vmin=0, vmax=1)
                    if mask.any():
                        ax.contour(mask, levels=[0.5], colors=[tuple(MASK_RGB)], linewidths=0.6)
                else:
                    ax.imshow(img, interpolation="nearest", vmin=0, vmax=1)
            axes[r, 0].set_ylabel(f"{_label(name)}\n(n={count})", rotation=0, ha="right", va="center")
        fig.suptitle(title or f"{data.product} ({data_mod.LAYOUTS.get(data.layout, data.layout)} layout): "
                     f"{len(data.classes)} defect classes"
                     + (", masks in red" if with_masks else ""))
    return fig


def counts_figure(data, title: str | None = None) -> Figure:
    """Images per defect class, fine-tuning (train) and held-out (test) split, and the defect-free
    (``good``) images, which are not fine-tuned on."""
    names = list(data.classes)
    train = [sum(s.defect == c for s in data.train) for c in names]
    test = [sum(s.defect == c for s in data.test) for c in names]
    with style():
        fig = Figure(figsize=(5.5, 0.35 * (len(names) + bool(data.good)) + 1.0), layout="constrained")
        ax = fig.subplots()
        y = np.arange(len(names))[::-1]
        ax.barh(y, train, color="#4c72b0", label="train (fine-tuning)")
        ax.barh(y, test, left=train, color="#dd8452", label="test (held out)")
        for yi, a, b in zip(y, train, test):
            ax.text(a + b, yi, f" {a}+{b}", va="center", fontsize=8)
        labels = [_label(n, 24).replace("\n", " ") for n in names]
        if data.good:
            ax.barh([len(names)], [len(data.good)], color="0.7", label="defect-free (good)")
            ax.text(len(data.good), len(names), f" {len(data.good)}", va="center", fontsize=8)
            y, labels = np.r_[len(names), y], ["good", *labels]
        ax.set_yticks(y, labels)
        ax.set_xlabel("images")
        ax.set_xlim(0, max([a + b for a, b in zip(train, test)] + [len(data.good)]) * 1.2 + 1)
        fig.legend(frameon=False, fontsize=8, loc="outside lower center", ncols=3)
        fig.suptitle(title or f"{data.product}: images per class")
    return fig


# ----------------------------------------------------------------------------- sweeps
_TARGETS = {"epsilon": "ε", "v_prediction": "v"}   # what the output's first half predicts (diffusion.Objective)


def loss_figure(records: list[dict], title: str = "") -> Figure | None:
    """Training loss (raw and a moving mean) and fixed-noise validation loss against optimizer
    steps, from a run's ``log.jsonl`` records; None when nothing trained yet."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    target = next((_TARGETS.get(r["objective"], r["objective"]) for r in records if "objective" in r), None)
    mse = f"{target}-MSE" if target else "MSE"
    with style():
        fig = Figure(figsize=(6.5, 3.2))
        ax = fig.subplots()
        xs, ys = zip(*train)
        w = max(5, len(ys) // 25) if len(ys) >= 10 else 1
        smooth = np.convolve(ys, np.ones(w) / w, mode="valid") if w > 1 else np.asarray(ys)
        ax.plot(xs, ys, color="0.75", lw=0.8, label=f"train, {mse} + vb (per step)")
        if w > 1:
            ax.plot(xs[w - 1:], smooth, color="C0", lw=1.6, label=f"train, moving mean of {w} steps")
        if val:
            vx, vy = zip(*val)
            ax.plot(vx, vy, "o-", color="C3", lw=1.5, ms=3, label=f"validation, {mse} (fixed noise)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the data
        return fig


def sweep_figure(rows: list[dict], keys: list[str], total: int | None = None) -> Figure:
    """Best validation loss and downstream accuracy per condition, one bar group per sweep point
    (``rows``: the finished points' summary rows; ``keys``: the grid parameters that label the
    points; ``total``: points in the sweep, for "k of n"). Accuracy bars carry ± one standard
    deviation over classifier seeds where a row has it (``acc_std[<condition>]``)."""
    def fmt(v):
        return format(v, "g") if isinstance(v, float) else str(v)

    labels = [" · ".join(fmt(r.get(k)) for k in keys) for r in rows]
    x = np.arange(len(rows))
    accs = [k for k in rows[0] if k.startswith("acc[")]
    with style():
        fig = Figure(figsize=(min(max(4.5, 2.5 + 0.45 * len(rows)), 24), 5.2), layout="constrained")
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        losses = np.array([r.get("best_val_loss") or np.nan for r in rows], dtype=float)
        ax1.bar(x, losses, color="#4c72b0")
        ax1.set_ylabel("best validation loss")
        finite = losses[np.isfinite(losses) & (losses > 0)]
        if len(finite) and finite.max() > 20 * finite.min():  # one diverged point would flatten the rest
            ax1.set_yscale("log")
        width = 0.8 / max(len(accs), 1)
        for i, k in enumerate(accs):
            std = [r.get(f"acc_std{k[3:]}") for r in rows]
            ax2.bar(x + (i - (len(accs) - 1) / 2) * width, [r.get(k) if r.get(k) is not None else np.nan for r in rows],
                    width, label=k[4:-1], yerr=[s if s is not None else np.nan for s in std]
                    if any(s is not None for s in std) else None, capsize=2, error_kw={"lw": 0.8})
        ax2.set_ylabel("downstream accuracy" + (" (± sd over seeds)" if any(
            r.get(f"acc_std{k[3:]}") is not None for r in rows for k in accs) else ""))
        ax2.set_ylim(0, 1.05)
        if accs:
            ax2.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="trained on",
                       title_fontsize=7)
        ax2.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax2.set_xlabel(" · ".join(keys))
        fig.suptitle(f"sweep: {len(rows)} of {total or len(rows)} points")
    return fig

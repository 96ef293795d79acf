"""PNG figures for evaluation and benchmark reports (``fewshot.eval`` and ``fewshot.bench`` both draw here).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through
pyplot, so plotting holds no global state and needs no display (safe inside a server or a thread).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

logger = logging.getLogger(__name__)

DPI = 120
# Label colours are assigned in sorted label order, so one label keeps its colour across panels.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324")
OVERLAY_ALPHA = 0.45


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    logger.info("wrote %s", out)
    return out


def _field(row: Any, name: str, default: Any = None) -> Any:
    """Rows may be mappings or objects (e.g. ``metrics.CaseLabelScore``)."""
    if isinstance(row, Mapping):
        return row.get(name, default)
    return getattr(row, name, default)


def _label_text(label: Any, label_names: Mapping[Any, str] | None, fallback: str = "") -> str:
    if label_names and label in label_names:
        return str(label_names[label])
    return fallback or str(label)


def box_plot_per_label(
    per_case_rows: Sequence[Any],
    out_png: str | Path,
    title: str = "Per-case scores by label",
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """Dice per label as box plots (one point per case on top); HD95 on a second panel when present.

    Rows carry ``label``, ``dice``, optionally ``hd95`` (mm) and ``label_name``. HD95 values that
    are nan (prediction or reference empty) are left out and counted in the tick label.
    """
    if not per_case_rows:
        raise ValueError("no rows to plot")
    labels = sorted({_field(r, "label") for r in per_case_rows}, key=lambda x: (isinstance(x, str), x))
    names = {}
    for r in per_case_rows:
        names.setdefault(_field(r, "label"), _field(r, "label_name", "") or "")
    dice_by = {lb: [float(_field(r, "dice")) for r in per_case_rows if _field(r, "label") == lb] for lb in labels}
    hd_by = {lb: [float(v) for r in per_case_rows if _field(r, "label") == lb
                  for v in [_field(r, "hd95")] if v is not None] for lb in labels}
    has_hd = any(math.isfinite(v) for vals in hd_by.values() for v in vals)

    fig = _new_figure(max(5.0, 1.3 * len(labels) + 2.5) * (2 if has_hd else 1), 4.5)
    axes = fig.subplots(1, 2 if has_hd else 1, squeeze=False)[0]
    fig.suptitle(title)
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(labels))]
    panels = [("Dice", "Dice (1 = perfect overlap)", dice_by)]
    if has_hd:
        panels.append(("HD95", "HD95 (mm, lower is better)", hd_by))
    rng = np.random.default_rng(0)  # jitter of the case points only
    for ax, (name, ylabel, by_label) in zip(axes, panels):
        data, ticks = [], []
        for lb in labels:
            values = np.asarray(by_label[lb], dtype=float)
            finite = values[np.isfinite(values)]
            data.append(finite)
            text = f"{_label_text(lb, label_names, names.get(lb, ''))}\n(n={finite.size}"
            missing = values.size - finite.size
            ticks.append(text + (f", {missing} n/a)" if missing else ")"))
        positions = np.arange(1, len(labels) + 1)
        boxes = ax.boxplot([d if d.size else [np.nan] for d in data], positions=positions, widths=0.55,
                           patch_artist=True, showmeans=True, showfliers=False,
                           meanprops=dict(marker="D", markerfacecolor="white", markeredgecolor="black"))
        for patch, colour in zip(boxes["boxes"], colours):
            patch.set_facecolor(to_rgba(colour, 0.35))
            patch.set_edgecolor(colour)
        for pos, d, colour in zip(positions, data, colours):
            ax.scatter(pos + rng.uniform(-0.15, 0.15, d.size), d, s=14, color=colour, alpha=0.9, zorder=3)
        ax.set_xticks(positions)
        ax.set_xticklabels(ticks)
        ax.set_xlabel("label")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
        if name == "Dice":
            ax.set_ylim(-0.02, 1.02)
        ax.legend(handles=[Patch(facecolor="white", edgecolor="black", label="box: quartiles, line: median"),
                           Line2D([], [], marker="D", linestyle="", markerfacecolor="white",
                                  markeredgecolor="black", label="mean"),
                           Line2D([], [], marker="o", linestyle="", markersize=4, color="grey", label="one case")],
                  loc="best", fontsize="small")
    return _save(fig, out_png)


def growth_curve(
    curves: Mapping[str, Sequence[tuple[float, float, float]]],
    out_png: str | Path,
    title: str = "Dice as labelled scans are added",
    xlabel: str = "labelled support scans",
    ylabel: str = "mean Dice over query scans",
) -> Path:
    """One line per strategy: mean Dice (± std as error bars) against the number of labelled scans."""
    if not curves:
        raise ValueError("no curves to plot")
    fig = _new_figure(6.5, 4.5)
    ax = fig.subplots()
    xs_all: set[float] = set()
    for i, (strategy, points) in enumerate(curves.items()):
        pts = sorted(points)
        xs = [p[0] for p in pts]
        xs_all.update(xs)
        ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=4,
                    color=PALETTE[i % len(PALETTE)], label=strategy)
    # Steps double (1, 2, 4, 8), so a log2 axis spaces them evenly.
    if xs_all and min(xs_all) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(xs_all))
    ax.set_xticklabels([f"{x:g}" for x in sorted(xs_all)])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="strategy (error bar: ±1 std)", fontsize="small")
    return _save(fig, out_png)


def _display_range(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def _overlay(ax, image: np.ndarray, mask: np.ndarray | None, colour_of: Mapping[int, str]) -> None:
    vmin, vmax = _display_range(image)
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    if mask is not None:
        rgba = np.zeros(mask.shape + (4,), dtype=float)
        for label, colour in colour_of.items():
            inside = mask == label
            if inside.any():
                rgba[inside] = to_rgba(colour, OVERLAY_ALPHA)
                ax.contour(inside.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)
        ax.imshow(rgba, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def overlay_montage(
    cases: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    out_png: str | Path,
    title: str = "Reference and prediction overlays",
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """Rows = cases (e.g. best and worst), columns = image, reference overlay, prediction overlay.

    ``cases`` holds (row title, image2d, truth2d label map, pred2d label map). Each label value
    has one colour throughout the figure, named in the legend.
    """
    if not cases:
        raise ValueError("no cases to plot")
    present = set()
    for _, _, truth, pred in cases:
        present.update(np.unique(truth).tolist())
        present.update(np.unique(pred).tolist())
    labels = sorted(int(v) for v in present if v != 0)
    colour_of = {lb: PALETTE[i % len(PALETTE)] for i, lb in enumerate(labels)}

    fig = _new_figure(9.0, 3.0 * len(cases) + 0.8)
    axes = fig.subplots(len(cases), 3, squeeze=False)
    fig.suptitle(title)
    for row, (case_title, image, truth, pred) in enumerate(cases):
        image = np.asarray(image, dtype=float)
        for col, (mask, heading) in enumerate([(None, "image"), (np.asarray(truth), "reference"),
                                                (np.asarray(pred), "prediction")]):
            ax = axes[row, col]
            _overlay(ax, image, mask, colour_of)
            if row == 0:
                ax.set_title(heading)
        axes[row, 0].set_ylabel(case_title, fontsize="medium")
    if labels:
        handles = [Patch(facecolor=to_rgba(colour_of[lb], 0.7), edgecolor=colour_of[lb],
                         label=_label_text(lb, label_names)) for lb in labels]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), title="label")
    return _save(fig, out_png)


def bar_chart(values: Mapping[str, float], title: str, ylabel: str, out: str | Path,
              xlabel: str = "") -> Path:
    """One bar per named value (e.g. seconds per pipeline stage), each annotated with its value."""
    if not values:
        raise ValueError("no values to plot")
    names = list(values)
    heights = [float(values[n]) for n in names]
    fig = _new_figure(max(5.0, 0.9 * len(names) + 2.0), 4.2)
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), heights, color=[PALETTE[i % len(PALETTE)] for i in range(len(names))])
    ax.bar_label(bars, labels=[f"{h:.3g}" for h in heights], padding=2, fontsize="small")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if max(len(n) for n in names) > 8 else 0, ha="right"
                       if max(len(n) for n in names) > 8 else "center")
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               out: str | Path, logx: bool = False, logy: bool = False) -> Path:
    """One marked line per named series of (x, y) points, optionally on log axes."""
    if not series:
        raise ValueError("no series to plot")
    fig = _new_figure(6.5, 4.5)
    ax = fig.subplots()
    for i, (name, points) in enumerate(series.items()):
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=PALETTE[i % len(PALETTE)], label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save(fig, out)

"""Figures for the experiment scripts (matplotlib, Agg, PNG files from plain data)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kn_lens.viz.figures import DPI, _new, _save

__all__ = ["plot_curves", "plot_violins"]


def plot_violins(data: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, *,
                 hlines: Mapping[str, float] | None = None, title: str = "",
                 ylabel: str = "CS2", dpi: int = DPI) -> Path:
    """Violin plot per category, one violin colour per series: ``data[category][series]`` -> values
    (QL Fig. 3: CS2 per relation, one series per locator). Categories with < 2 values in a series
    are drawn as dots. ``hlines`` draws reference lines (e.g. ``{"static": 0.1}``)."""
    if not data:
        raise ValueError("no data to plot")
    cats = list(data)
    series: list[str] = []
    for c in cats:
        for s in data[c]:
            if s not in series:
                series.append(s)
    width = 0.8 / max(len(series), 1)
    fig, axes = _new(min(12.0, max(6.0, 0.35 * len(cats) * max(len(series), 1) + 2)), 4.6)
    ax = axes[0, 0]
    colours = [f"C{i}" for i in range(len(series))]
    for j, s in enumerate(series):
        for i, c in enumerate(cats):
            v = np.asarray([x for x in data[c].get(s, ()) if x is not None and math.isfinite(x)],
                           dtype=float)
            x = i + (j - (len(series) - 1) / 2) * width
            if v.size >= 2 and np.ptp(v) > 0:
                parts = ax.violinplot(v, positions=[x], widths=width * 0.95, showmeans=True,
                                      showextrema=False)
                for b in parts["bodies"]:
                    b.set_facecolor(colours[j])
                    b.set_alpha(0.6)
                parts["cmeans"].set_color(colours[j])
            elif v.size:
                ax.scatter(np.full(v.size, x), v, color=colours[j], s=12)
        ax.plot([], [], color=colours[j], lw=6, alpha=0.6, label=s)
    for k, (name, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color="black", ls=["--", ":", "-."][k % 3], lw=1, label=f"{name} = {y:.3g}")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def plot_curves(panels: Mapping[str, Mapping[str, Sequence[Sequence[float | None]]]],
                path: str | Path, *, xlabel: str, log_x: bool = False, title: str = "",
                symlog_y: Sequence[str] = (), linthresh: float = 1e-2, dpi: int = DPI) -> Path:
    """One panel per metric, one line per series: ``panels[metric][series]`` is a list of
    ``(x, y)`` or ``(x, y, lo, hi)`` points (None / NaN are skipped; lo/hi draw a band).
    Sequential-editing curves (metric against edits applied) and batch-size curves. Panels named
    in ``symlog_y`` get a symmetric-log y axis, linear within +-``linthresh`` (values that span
    many orders of magnitude and may be slightly negative, such as dPPL)."""
    if not panels or not any(panels.values()):
        raise ValueError("no curves to plot")
    names = list(panels)
    unknown = [s for s in symlog_y if s not in panels]
    if unknown:
        raise ValueError(f"symlog_y names no panel: {unknown} (panels: {names})")
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = _new(4.0 * ncols, 3.2 * nrows, nrows, ncols)
    series: list[str] = []
    for name in names:
        for s in panels[name]:
            if s not in series:
                series.append(s)
    colour = {s: f"C{i % 10}" for i, s in enumerate(series)}
    for k, name in enumerate(names):
        ax = axes[k // ncols, k % ncols]
        y_min = math.inf  # of the points drawn
        for s, pts in panels[name].items():
            pts = sorted((p for p in pts if p[1] is not None and math.isfinite(p[1])),
                         key=lambda p: p[0])
            if not pts:
                continue
            x = np.array([p[0] for p in pts], dtype=float)
            y = np.array([p[1] for p in pts], dtype=float)
            y_min = min(y_min, float(y.min()))
            ax.plot(x, y, "o-", color=colour[s], ms=3, lw=1.2, label=s)
            band = [p for p in pts if len(p) >= 4 and p[2] is not None and p[3] is not None]
            if len(band) == len(pts) and len(pts) > 1:
                ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], color=colour[s],
                                alpha=0.15, lw=0)
        if log_x:
            ax.set_xscale("log")
            xs = sorted({p[0] for pts in panels[name].values() for p in pts})
            if 0 < len(xs) <= 8:  # the checkpoints / batch sizes themselves, in plain numbers
                ax.set_xticks(xs, [f"{v:g}" for v in xs])
                ax.minorticks_off()
        if name in symlog_y:
            ax.set_yscale("symlog", linthresh=linthresh)
            if -linthresh < y_min < math.inf:  # no empty negative decades below the data
                ax.set_ylim(bottom=-linthresh)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_title(f"{name} (symlog)" if name in symlog_y else name, fontsize=10)
        ax.grid(alpha=0.3)
    for k in range(len(names), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 7),
                   fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path, dpi)

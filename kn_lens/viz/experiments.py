"""Figures for the experiment scripts (matplotlib, Agg, PNG files from plain data)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kn_lens.viz.figures import DPI, _new, _save

__all__ = ["plot_violins"]


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

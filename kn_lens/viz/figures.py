"""Matplotlib figures for the experiment scripts.

Every function takes plain data (lists, numpy arrays or tensors, dicts as loaded from a results
JSON) and an output path, writes one small labelled PNG (dpi 110 by default) and returns the path.
Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly: no pyplot, no
global backend switch, nothing is ever shown, and no figure stays open after an error.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from kn_lens.errors import ConfigError, NumericalError

__all__ = [
    "plot_activation_heatmaps", "plot_score_heatmap", "plot_layer_distribution",
    "plot_cumulative_share", "plot_cs_histogram", "plot_grouped_bars", "plot_synapse_effects",
    "plot_table",
]

DPI = 110


# --------------------------------------------------------------------------- helpers


def _array(x: Any, ndim: int | None = None, what: str = "data") -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=float)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.isfinite(a).all():
        raise NumericalError(f"{what} contains NaN or inf")
    return a


def _new(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", metadata={"Software": None})
    return path


def _norm_cmap(vmin: float, vmax: float, cmap: str | None):
    """Diverging colours centred at 0 for signed data, sequential otherwise."""
    if vmin < 0 < vmax:
        return TwoSlopeNorm(vcenter=0.0, vmin=vmin, vmax=vmax), cmap or "RdBu_r"
    return None, cmap or "Blues"


def _pool_columns(a: np.ndarray, max_columns: int) -> np.ndarray:
    """Shrink the neuron axis to at most ``max_columns`` bins, keeping in each bin the value with
    the largest magnitude (so single strong neurons stay visible and keep their sign)."""
    n = a.shape[1]
    if max_columns <= 0 or n <= max_columns:
        return a
    edges = np.linspace(0, n, max_columns + 1).astype(int)
    out = np.empty((a.shape[0], max_columns))
    for j in range(max_columns):
        block = a[:, edges[j]:edges[j + 1]]
        idx = np.abs(block).argmax(axis=1)
        out[:, j] = block[np.arange(a.shape[0]), idx]
    return out


def _heat(ax, a: np.ndarray, vmin: float, vmax: float, cmap: str | None, max_columns: int = 384):
    norm, cm = _norm_cmap(vmin, vmax, cmap)
    kw = dict(norm=norm) if norm is not None else dict(vmin=vmin, vmax=vmax)
    shown = _pool_columns(a, max_columns)
    # nearest: blocks of identical pixels (exact colours, small PNGs); x keeps true neuron indices
    im = ax.imshow(shown, aspect="auto", origin="lower", cmap=cm, interpolation="nearest",
                   extent=(-0.5, a.shape[1] - 0.5, -0.5, a.shape[0] - 0.5), **kw)
    ax.set_xlabel("neuron index")
    ax.set_ylabel("layer")
    return im


def _colorbar(fig: Figure, im, ax, label: str) -> None:
    cb = fig.colorbar(im, ax=ax, label=label, shrink=0.9)
    norm = im.norm
    if isinstance(norm, TwoSlopeNorm):  # evenly spaced ticks on both sides of 0
        cb.set_ticks(np.unique(np.r_[np.linspace(norm.vmin, 0, 3), np.linspace(0, norm.vmax, 5)]))


def _mark(ax, neurons: Sequence[Sequence[int]] | None, label: str = "KNs") -> None:
    if not neurons:
        return
    pts = np.asarray([[int(n[0]), int(n[1])] for n in neurons])
    ax.scatter(pts[:, 1], pts[:, 0], s=28, facecolors="none", edgecolors="black", linewidths=1.0,
               label=label)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)


# --------------------------------------------------------------------------- heatmaps


def plot_activation_heatmaps(maps: Mapping[str, Any], path: str | Path, *, title: str = "",
                             kns: Sequence[Sequence[int]] | None = None, cmap: str | None = None,
                             max_columns: int = 384, clip_quantile: float | None = None,
                             dpi: int = DPI) -> Path:
    """Neuron activations (layer x neuron index), one panel per condition (e.g. "none",
    "suppressed", "enhanced": QL Fig. 1 / 7 / 10), on one shared colour scale. ``kns`` (a list of
    ``[layer, index]``) are circled in every panel. Wide maps are shown with the neuron axis pooled
    to at most ``max_columns`` bins (each bin shows its largest-magnitude value). ``clip_quantile``
    (e.g. 0.999) limits the colour scale to that quantile of |activation| so a few huge last-layer
    values do not wash out the rest (the colour bar says so); None uses the full range."""
    if not maps:
        raise ValueError("no activation maps to plot")
    arrays = {k: _array(v, 2, f"map {k!r}") for k, v in maps.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"activation maps differ in shape: {sorted(shapes)}")
    vmin = min(float(a.min()) for a in arrays.values())
    vmax = max(float(a.max()) for a in arrays.values())
    label = "activation (mlp.hook_post)"
    if clip_quantile is not None:
        if not 0 < clip_quantile <= 1:
            raise ConfigError(f"clip_quantile must be in (0, 1], got {clip_quantile!r}")
        lim = float(np.quantile(np.abs(np.concatenate([a.ravel() for a in arrays.values()])),
                                clip_quantile))
        vmin, vmax = max(vmin, -lim), min(vmax, lim)
        label += f", clipped at |a| <= {lim:.3g} ({clip_quantile:.1%} quantile)"
    if vmin == vmax:
        vmax = vmin + 1e-12
    n = len(arrays)
    fig, axes = _new(9.0, 2.3 * n + 0.6, n, 1)
    im = None
    for ax, (name, a) in zip(axes[:, 0], arrays.items()):
        im = _heat(ax, a, vmin, vmax, cmap, max_columns)
        ax.set_title(name, fontsize=10)
        _mark(ax, kns)
    _colorbar(fig, im, axes[:, 0].tolist(), label)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path, dpi)


def plot_score_heatmap(scores: Any, path: str | Path, *, title: str = "",
                       label: str = "score", highlight: Sequence[Sequence[int]] | None = None,
                       cmap: str | None = None, max_columns: int = 384, dpi: int = DPI) -> Path:
    """A ``[layer, d_mlp]`` score map (e.g. a locator's NeuronScores), selected neurons circled
    (neuron axis pooled to ``max_columns`` bins by largest magnitude, as in the activation maps)."""
    a = _array(scores, 2, "scores")
    vmin, vmax = float(a.min()), float(a.max())
    if vmin == vmax:
        vmax = vmin + 1e-12
    fig, axes = _new(9.0, 3.4)
    ax = axes[0, 0]
    im = _heat(ax, a, vmin, vmax, cmap, max_columns)
    _mark(ax, highlight, "selected")
    _colorbar(fig, im, ax, label)
    ax.set_title(title or "neuron scores", fontsize=11)
    return _save(fig, path, dpi)


# --------------------------------------------------------------------------- bars / curves


def plot_layer_distribution(counts: Mapping[str, Sequence[float]] | Sequence[float], path: str | Path,
                            *, normalize: bool = True, title: str = "", xlabel: str = "layer",
                            dpi: int = DPI) -> Path:
    """Share (or count) of selected neurons per layer, one bar colour per method (FiNE Fig. 4)."""
    series = dict(counts) if isinstance(counts, Mapping) else {"neurons": counts}
    if not series:
        raise ValueError("no layer counts to plot")
    arrays = {k: _array(v, 1, f"counts {k!r}") for k, v in series.items()}
    n_layers = max(len(a) for a in arrays.values())
    fig, axes = _new(max(6.0, 0.28 * n_layers + 2), 3.4)
    ax = axes[0, 0]
    width = 0.8 / len(arrays)
    x = np.arange(n_layers)
    for i, (name, a) in enumerate(arrays.items()):
        a = np.pad(a, (0, n_layers - len(a)))
        if normalize:
            total = a.sum()
            a = a / total if total > 0 else a
        ax.bar(x + (i - (len(arrays) - 1) / 2) * width, a, width, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of selected neurons" if normalize else "number of neurons")
    ax.set_xticks(x[:: max(1, n_layers // 15)])
    ax.set_title(title or "layer distribution of selected neurons", fontsize=11)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, dpi)


def plot_cumulative_share(values: Mapping[str, Any] | Any, path: str | Path, *, mark: float = 0.01,
                          absolute: bool = True, log_x: bool = True, title: str = "",
                          dpi: int = DPI) -> Path:
    """Cumulative share of the total effect (e.g. indirect effect) held by the top fraction of
    neurons, sorted by effect (TNF-DA Fig. 3), with the share at the top ``mark`` (1 %) marked."""
    if not 0 < mark < 1:
        raise ConfigError(f"mark must be a fraction in (0, 1), got {mark!r}")
    series = dict(values) if isinstance(values, Mapping) else {"neurons": values}
    fig, axes = _new(6.0, 3.8)
    ax = axes[0, 0]
    for name, v in series.items():
        a = _array(v, None, f"values {name!r}").ravel()
        a = np.abs(a) if absolute else a
        total = a.sum()
        if total <= 0:
            raise NumericalError(f"values {name!r} have no positive total to take shares of")
        cum = np.cumsum(np.sort(a)[::-1]) / total
        frac = np.arange(1, len(a) + 1) / len(a)
        k = max(1, int(math.ceil(mark * len(a))))
        line = ax.plot(frac, cum, label=f"{name} (top {mark:.0%}: {cum[k - 1]:.1%})")[0]
        ax.plot([frac[k - 1]], [cum[k - 1]], "o", color=line.get_color())
    ax.axvline(mark, color="grey", ls="--", lw=1, label=f"{mark:.0%} of neurons")
    if log_x:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of neurons (sorted by " + ("|effect|" if absolute else "effect") + ")")
    ax.set_ylabel("cumulative share of total effect")
    ax.set_title(title or "concentration of the effect", fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi)


def plot_cs_histogram(scores: Mapping[str, Any] | Any, path: str | Path, *,
                      thresholds: Mapping[str, float] | None = None, bins: int = 20,
                      title: str = "", xlabel: str = "consistency score (CS)",
                      dpi: int = DPI) -> Path:
    """Histogram of per-fact KN-consistency scores with the K_I / K_II thresholds drawn
    (``thresholds`` e.g. ``{"static": 0.1, "Otsu": 0.146}``, QL Table 4; facts above a threshold
    are K_I, at or below it K_II, as in ``analysis.consistency``). Pass several groups (e.g. per
    locator) as a dict."""
    series = dict(scores) if isinstance(scores, Mapping) else {"facts": scores}
    thresholds = dict(thresholds or {})
    arrays = {k: _array(v, None, f"scores {k!r}").ravel() for k, v in series.items()}
    lo = min(0.0, min(float(a.min()) for a in arrays.values()))
    hi = max(1.0, max(float(a.max()) for a in arrays.values()))
    edges = np.linspace(lo, hi, bins + 1)
    fig, axes = _new(6.0, 3.6)
    ax = axes[0, 0]
    alpha = 0.85 if len(arrays) == 1 else 0.55
    for name, a in arrays.items():
        ax.hist(a, bins=edges, alpha=alpha, label=f"{name} (n={len(a)})", edgecolor="white")
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (name, t) in enumerate(thresholds.items()):
        if not math.isfinite(t):
            raise NumericalError(f"threshold {name!r} is not finite")
        shares = ", ".join(f"{float((a <= t).mean()):.0%}" for a in arrays.values())
        ax.axvline(t, color="black", ls=styles[i % len(styles)], lw=1.2,
                   label=f"{name} = {t:.3g} (K_II share: {shares})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("number of facts")
    ax.set_title(title or "KN consistency: K_I (> threshold) vs K_II (<= threshold)", fontsize=11)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def plot_grouped_bars(data: Mapping[str, Mapping[str, float]], path: str | Path, *,
                      errors: Mapping[str, Mapping[str, float]] | None = None,
                      title: str = "", ylabel: str = "value", dpi: int = DPI,
                      size: tuple[float, float] = (6.0, 3.8), decimals: int = 2) -> Path:
    """Grouped bar chart: ``data[group][series]`` (e.g. groups "Self"/"Irrelevant", series
    "Enh"/"Sup"/"Avg"), optional error bars in the same layout. Values are written on the bars
    with ``decimals`` decimals; ``size`` is the figure's (width, height) in inches."""
    fig, axes = _new(*size)
    _grouped(axes[0, 0], data, errors, ylabel, title, decimals)
    return _save(fig, path, dpi)


def _num(x) -> float:
    """A bar value from a results file: None (JSON's NaN / missing) becomes NaN."""
    return float("nan") if x is None else float(x)


def _grouped(ax, data, errors, ylabel, title, decimals: int = 2) -> None:
    if not data:
        raise ValueError("no bars to plot")
    groups = list(data)
    series: list[str] = []
    for g in groups:
        for s in data[g]:
            if s not in series:
                series.append(s)
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    value_size = 6 if len(groups) * len(series) > 12 else 7  # crowded: keep neighbours' labels apart
    for i, s in enumerate(series):
        vals = np.array([_num(data[g].get(s)) for g in groups])
        err = None
        if errors is not None:
            err = np.array([_num(errors.get(g, {}).get(s)) for g in groups])
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, np.nan_to_num(vals), width,
                      yerr=err, capsize=3, label=s)
        for b, v in zip(bars, vals):
            txt = "n/a" if not np.isfinite(v) else f"{v:.{decimals}f}"
            ax.annotate(txt, (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom" if b.get_height() >= 0 else "top",
                        fontsize=value_size)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    if len(series) > 2:  # room above the bars for a legend in two columns
        lo, hi = ax.get_ylim()
        if hi > 0:
            ax.set_ylim(lo, hi + 0.25 * (hi - lo))
        ax.legend(fontsize=8, ncol=2, loc="upper center")
    else:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_synapse_effects(summary: Mapping[str, Mapping[str, float]], path: str | Path, *,
                         title: str = "", dpi: int = DPI) -> Path:
    """QL Fig. 6: dValue and dProb for Self (S) and Irrelevant (S_ir) synapses, bars Enh / Sup /
    Avg. ``summary`` is ``SynapseManipulationResult.summary()`` (or its JSON)."""
    fig, axes = _new(9.5, 3.8, 1, 2)
    for ax, (metric, label) in zip(axes[0], (("delta_value", "ΔValue (KN mean activation)"),
                                             ("delta_prob", "ΔProb (answer probability)"))):
        if metric not in summary:
            raise ValueError(f"summary has no {metric!r} (keys: {sorted(summary)})")
        row = summary[metric]
        data = {who_label: {"Enh": row[f"{who}_enhance"], "Sup": row[f"{who}_suppress"],
                            "Avg": row[f"{who}_avg"]}
                for who, who_label in (("self", "Self (S)"), ("irrelevant", "Irrelevant (S_ir)"))}
        _grouped(ax, data, None, "signed relative change", label)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path, dpi)


# --------------------------------------------------------------------------- tables


def plot_table(rows: Sequence[Sequence[Any]], columns: Sequence[str], path: str | Path, *,
               title: str = "", fmt: str = "{:.3g}", dpi: int = DPI) -> Path:
    """A small table rendered as a figure (numbers formatted with ``fmt``)."""
    if not rows:
        raise ValueError("no rows to tabulate")
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"row {list(r)!r} has {len(r)} cells for {len(columns)} columns")

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "n/a" if not math.isfinite(float(v)) else fmt.format(float(v))
        return str(v)

    text = [[cell(v) for v in r] for r in rows]
    chars = [max(len(c), *(len(t[i]) for t in text)) + 2 for i, c in enumerate(columns)]
    width = max(4.0, 0.085 * sum(chars))
    fig, axes = _new(min(width, 16.0), 0.32 * (len(rows) + 1) + (0.5 if title else 0.2))
    ax = axes[0, 0]
    ax.axis("off")
    tab = ax.table(cellText=text, colLabels=list(columns), loc="center", cellLoc="center",
                   colWidths=[c / sum(chars) for c in chars])  # each column as wide as its text
    tab.auto_set_font_size(False)
    tab.set_fontsize(9)
    for (r, _c), c in tab.get_celld().items():
        if r == 0:
            c.set_text_props(fontweight="bold")
            c.set_facecolor("#e8e8e8")
    if title:
        ax.set_title(title, fontsize=11)
    return _save(fig, path, dpi)


def _place_labels(ax, points: Sequence[tuple[str, float, float]], *, fontsize: int = 8,
                  marker_px: float = 4.0,
                  lines: Sequence[tuple[float, float, float, float]] = ()) -> list:
    """Annotate each ``(name, x, y)`` of ``ax`` where the label's box overlaps no placed label, no
    other point's marker, no segment of ``lines`` (``(x0, y0, x1, y1)`` in data coordinates,
    horizontal or vertical: interval bars) and stays inside the axes: candidate offsets at
    growing distance around the point (right of it first), the first free one taken, else the
    one overlapping least; a thin leader line joins a label set away from its point. Freezes the
    figure's layout (the placement is in display coordinates). Returns the annotations, in
    ``points`` order."""
    fig = ax.figure
    fig.canvas.draw()  # runs the layout: axes positions are final from here
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px = fig.dpi / 72.0  # display pixels per point
    marks = [ax.transData.transform((x, y)) for _, x, y in points]
    bars = []
    for x0, y0, x1, y1 in lines:  # thin display boxes around the segments
        (a0, b0), (a1, b1) = ax.transData.transform([(x0, y0), (x1, y1)])
        bars.append((min(a0, a1) - 1.5, min(b0, b1) - 1.5, max(a0, a1) + 1.5, max(b0, b1) + 1.5))
    sizes = []
    for name, _, _ in points:
        t = ax.text(0, 0, name, fontsize=fontsize)
        bb = t.get_window_extent(renderer)
        sizes.append((bb.width, bb.height))
        t.remove()

    def overlap(a, b) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    placed: list[tuple[float, float, float, float]] = []
    out: list = [None] * len(points)
    order = sorted(range(len(points)), key=lambda i: (-points[i][2], points[i][1]))
    angles = (0, 30, -30, 60, -60, 90, -90, 150, -150, 180, 120, -120)
    for i in order:
        (mx, my), (w, h) = marks[i], sizes[i]
        best = None
        for dist in (6, 12, 20, 30, 42, 56, 72, 90):
            for deg in angles:
                c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
                ax_, ay = mx + dist * c * px, my + dist * s * px
                ha = "left" if c > 0.3 else "right" if c < -0.3 else "center"
                va = "bottom" if s > 0.3 else "top" if s < -0.3 else "center"
                x0 = ax_ if ha == "left" else ax_ - w if ha == "right" else ax_ - w / 2
                y0 = ay if va == "bottom" else ay - h if va == "top" else ay - h / 2
                box = (x0, y0, x0 + w, y0 + h)
                cost = sum(overlap(box, b) for b in placed)
                cost += sum(overlap(box, (qx - marker_px * px, qy - marker_px * px,
                                          qx + marker_px * px, qy + marker_px * px))
                            for j, (qx, qy) in enumerate(marks) if j != i)
                cost += 0.5 * sum(overlap(box, b) for b in bars)
                inside = overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))
                cost += 4 * max(0.0, w * h - inside - 1e-6)  # outside the axes counts more
                if best is None or cost < best[0]:
                    best = (cost, dist, c, s, ha, va, box)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, dist, c, s, ha, va, box = best
        placed.append((box[0] - 3, box[1] - 1, box[2] + 3, box[3] + 1))  # a gap between labels
        name, x, y = points[i]
        line = dict(arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0,
                                    shrinkB=3)) if dist > 6 else {}
        out[i] = ax.annotate(name, (x, y), xytext=(dist * c, dist * s),
                             textcoords="offset points", ha=ha, va=va, fontsize=fontsize, **line)
    return out


def plot_tradeoff(points: Mapping[str, Sequence[float]], path: str | Path, *, xlabel: str,
                  ylabel: str, title: str = "", dpi: int = DPI) -> Path:
    """One labelled point per method: ``points[method] = (x, y)`` or ``(x, y, x_lo, x_hi, y_lo,
    y_hi)`` with interval bars (e.g. edit success against locality, the trade-off at a glance).
    Labels are placed where they cover no other label or point (:func:`_place_labels`), with a
    leader line when moved away from their point."""
    if not points:
        raise ValueError("no points to plot")
    fig, axes = _new(7.0, 5.4)
    ax = axes[0, 0]
    shown, lines = [], []
    for name, p in points.items():
        p = [_num(v) for v in p]
        x, y = p[0], p[1]
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        xerr = yerr = None
        if len(p) >= 6 and all(np.isfinite(p[2:6])):
            xerr = [[x - p[2]], [p[3] - x]]
            yerr = [[y - p[4]], [p[5] - y]]
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=name)
        shown.append((name, x, y))
        if xerr is not None:
            lines += [(p[2], y, p[3], y), (x, p[4], x, p[5])]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=11)
    _place_labels(ax, shown, lines=lines)
    return _save(fig, path, dpi)

"""Every figure function writes a small, non-empty PNG from synthetic data; views return HTML."""
import numpy as np
import pytest
import torch

from kn_lens import viz
from kn_lens.errors import NumericalError

PNG = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG
    assert 3_000 < len(data) < 300_000, len(data)
    # width/height from the IHDR chunk: readable, not huge
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 300 <= w <= 2000 and 100 <= h <= 2000


def _smooth_map(rng, layers=30, d=1536):
    base = rng.normal(size=(layers, d)) * 0.05
    base[rng.integers(0, layers, 12), rng.integers(0, d, 12)] += 3.0
    return base


def test_activation_heatmaps(tmp_path):
    rng = np.random.default_rng(0)
    m = _smooth_map(rng)
    maps = {"none": m, "suppressed": m * 0.5, "enhanced": torch.tensor(m * 1.5)}
    p = viz.plot_activation_heatmaps(maps, tmp_path / "sub" / "act.png", title="Eiffel Tower",
                                     kns=[[3, 10], [20, 1000]])
    _check_png(p)
    _check_png(viz.plot_activation_heatmaps(maps, tmp_path / "clipped.png", clip_quantile=0.99))
    with pytest.raises(ValueError):
        viz.plot_activation_heatmaps({"a": m, "b": m[:2]}, tmp_path / "bad.png")


def test_score_heatmap(tmp_path):
    rng = np.random.default_rng(1)
    s = np.abs(_smooth_map(rng, 18, 2048))
    _check_png(viz.plot_score_heatmap(s, tmp_path / "scores.png", title="IG", highlight=[[5, 7]]))
    bad = s.copy()
    bad[0, 0] = np.nan
    with pytest.raises(NumericalError):
        viz.plot_score_heatmap(bad, tmp_path / "nan.png")
    assert not (tmp_path / "nan.png").exists()


def test_layer_distribution(tmp_path):
    counts = {"IG": [0, 1, 5, 9, 3] + [0] * 25, "FiNE": list(range(30))}
    _check_png(viz.plot_layer_distribution(counts, tmp_path / "layers.png"))
    _check_png(viz.plot_layer_distribution([1, 2, 3, 0, 1, 2], tmp_path / "layers1.png",
                                           normalize=False))


def test_cumulative_share(tmp_path):
    rng = np.random.default_rng(2)
    ie = {"SmolLM2": rng.pareto(1.5, 30 * 1536), "uniform": rng.random(5000)}
    _check_png(viz.plot_cumulative_share(ie, tmp_path / "cum.png", mark=0.01))
    with pytest.raises(NumericalError):
        viz.plot_cumulative_share(np.zeros(10), tmp_path / "zero.png")


def test_cs_histogram(tmp_path):
    rng = np.random.default_rng(3)
    cs = {"IG": rng.beta(1, 5, 200), "AtP": rng.beta(2, 4, 200)}
    _check_png(viz.plot_cs_histogram(cs, tmp_path / "cs.png",
                                     thresholds={"static": 0.1, "Otsu": 0.146}))
    _check_png(viz.plot_cs_histogram(rng.random(50), tmp_path / "cs1.png"))


def test_grouped_bars_and_synapse_effects(tmp_path):
    data = {"Self": {"Enh": 0.4, "Sup": 0.6, "Avg": 0.5},
            "Irrelevant": {"Enh": 0.05, "Sup": float("nan"), "Avg": None}}  # None: NaN read from JSON
    err = {"Self": {"Enh": 0.1, "Sup": None, "Avg": 0.1}}
    _check_png(viz.plot_grouped_bars(data, tmp_path / "bars.png", errors=err, ylabel="ΔProb"))
    row = {"self_suppress": 0.5, "self_enhance": 0.2, "irrelevant_suppress": 0.1,
           "irrelevant_enhance": -0.05, "self_avg": 0.35, "irrelevant_avg": 0.025}
    _check_png(viz.plot_synapse_effects({"delta_value": row, "delta_prob": row},
                                        tmp_path / "syn.png", title="SmolLM2"))
    with pytest.raises(ValueError):
        viz.plot_synapse_effects({"delta_value": row}, tmp_path / "bad.png")


def test_table(tmp_path):
    rows = [["K_I", 0.55, 0.47, 12], ["K_II", 0.5, float("nan"), 30]]
    _check_png(viz.plot_table(rows, ["set", "Rel", "Gen", "n"], tmp_path / "t.png", title="erasure"))
    with pytest.raises(ValueError):
        viz.plot_table([[1, 2]], ["a"], tmp_path / "bad.png")


def test_synapse_view():
    tokens = ["The", " capital", " of", " France"]
    pats = torch.softmax(torch.randn(3, 2, 4, 4), -1)
    mask = torch.zeros(3, 2, 4, dtype=torch.bool)
    mask[:, :, 0] = True
    html = viz.synapse_view(tokens, pats, mask)
    assert hasattr(html, "_repr_html_") and len(str(html)) > 100
    # offline: notebook display and str() are the inlined bundle, never the CDN page
    assert isinstance(html, viz.OfflineView) and html._repr_html_() == str(html)
    assert "CircuitsVis.render(" in str(html) and "unpkg" not in str(html)
    html2 = viz.synapse_view(tokens, pats, layer=1)
    assert " capital" in str(html2) or "capital" in str(html2)
    with pytest.raises(ValueError):
        viz.synapse_view(tokens, pats, layer=5)
    with pytest.raises(ValueError):
        viz.attention_view(tokens[:3], pats[0])


def test_curves(tmp_path):
    panels = {"ES": {"rome": [(1, 1.0, 0.9, 1.0), (10, 0.8, 0.7, 0.9), (100, 0.3, 0.2, 0.4)],
                     "fine": [(1, 1.0), (10, None), (100, float("nan"))]},  # gaps are skipped
              "dppl": {"rome": [(100, 2.5, None, None), (1, 0.01, None, None)]}}  # unsorted
    _check_png(viz.plot_curves(panels, tmp_path / "c.png", xlabel="edits", log_x=True,
                               title="sequential"))
    # dPPL from -1e-4 to 1e46 (a broken model) on one axis: symmetric-log
    panels["dppl"]["kn"] = [(1, -1e-4), (10, 1e11), (100, 7e46)]
    _check_png(viz.plot_curves(panels, tmp_path / "s.png", xlabel="edits", symlog_y=("dppl",)))
    with pytest.raises(ValueError, match="symlog_y names no panel"):
        viz.plot_curves(panels, tmp_path / "bad.png", xlabel="x", symlog_y=("PPL",))
    assert not (tmp_path / "bad.png").exists()
    with pytest.raises(ValueError):
        viz.plot_curves({}, tmp_path / "bad.png", xlabel="x")


def test_tradeoff_labels_do_not_overlap(tmp_path):
    """A crowded trade-off figure (the benchmark's 25 methods cluster near ES = 1): every label
    is placed clear of the other labels and of the other points' markers, inside the axes."""
    from kn_lens.viz import figures as F

    rng = np.random.default_rng(0)
    pts = [(f"method_{i}", float(x), float(y)) for i, (x, y) in
           enumerate(zip(rng.uniform(0.3, 0.6, 14), rng.uniform(0.9, 1.0, 14)))]
    pts += [("far_away", 0.9, 0.1), ("corner", 1.0, 1.0)]
    fig, axes = F._new(7.0, 5.4)
    ax = axes[0, 0]
    for _, x, y in pts:
        ax.plot([x], [y], "o")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    anns = F._place_labels(ax, pts)
    from matplotlib.text import Text

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(a, r) for a in anns]  # the text, without its leader line
    assert [a.get_text() for a in anns] == [n for n, _, _ in pts]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
        for j, (_, x, y) in enumerate(pts):  # no label covers another point
            if j != i:
                mx, my = ax.transData.transform((x, y))
                assert not (a.x0 < mx < a.x1 and a.y0 < my < a.y1)
        frame = ax.get_window_extent(r)
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
    assert anns[-2].xyann == (6.0, 0.0)  # a lone point keeps its label right next to it
    png = viz.plot_tradeoff({n: (x, y, x - 0.05, x + 0.05, y - 0.02, y + 0.02) for n, x, y in pts},
                            tmp_path / "t.png", xlabel="NS", ylabel="ES")
    assert png.stat().st_size > 1000

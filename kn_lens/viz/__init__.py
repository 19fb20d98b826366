"""Figures (matplotlib, Agg, PNG files from plain data) and circuitsvis views."""
from kn_lens.viz.attention import OfflineView, attention_view, save_html, synapse_view, token_view
from kn_lens.viz.facts import fact_views
from kn_lens.viz.experiments import plot_curves, plot_violins
from kn_lens.viz.figures import (
    plot_activation_heatmaps,
    plot_cs_histogram,
    plot_cumulative_share,
    plot_grouped_bars,
    plot_layer_distribution,
    plot_score_heatmap,
    plot_synapse_effects,
    plot_table,
    plot_tradeoff,
)

__all__ = [
    "OfflineView", "fact_views", "attention_view", "synapse_view", "token_view", "save_html", "plot_activation_heatmaps", "plot_cs_histogram",
    "plot_cumulative_share", "plot_grouped_bars", "plot_layer_distribution", "plot_score_heatmap",
    "plot_synapse_effects", "plot_table", "plot_tradeoff", "plot_curves", "plot_violins",
]

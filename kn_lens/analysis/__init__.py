"""Analyses of located neurons: any locator's NeuronScores / NeuronSets in, frozen results out.

- :mod:`~kn_lens.analysis.consistency` — QL §2.1: CS1/CS2 (eq. 1), K_I/K_II split (static 0.1 and
  Otsu thresholds on CS2), Welch's t-test (Table 1).
- :mod:`~kn_lens.analysis.mapping` — QL §3.1: query-KN mapping (eq. 3, Fig. 4).
- :mod:`~kn_lens.analysis.synapses` — QL §3.2: knowledge synapses (eq. 4-6).
- :mod:`~kn_lens.analysis.cas` — QL §3.3: consistency-aware score (eq. 7) and KN selection for edits.
- :mod:`~kn_lens.analysis.tnf_da` — TNF-DA: IE concentration ("1 %"), targeted-neuron repetition
  (Table 1), overlap between semantically similar relations.
- :mod:`~kn_lens.analysis.fine` — FiNE: layer distribution (Fig. 4), neuron top tokens (Table 6).
- :mod:`~kn_lens.analysis.tracing` — ROME §2.1: causal tracing (indirect effect of restoring MLP /
  attention outputs or the residual stream at the subject's last token), layer sweeps.
"""
from kn_lens.analysis.cas import (CASConfig, CASResult, CompareConfig, SelectionComparison,
                                  cas_neurons, cas_neurons_by_fact,
                                  compare_kn_selections, consistency_aware_score,
                                  kn_selection_edits)
from kn_lens.analysis.consistency import (ConsistencyConfig, ConsistencyResult, FactConsistency,
                                          GroupRow, KNSelection, consistency_analysis,
                                          consistency_by_method, cs1, cs2, default_selection,
                                          kn_sets_from_scores, otsu_threshold, select_kns,
                                          shared_k2_ratio, welch_t_test)
from kn_lens.analysis.fine import (LayerDistribution, NeuronTokens, layer_distribution,
                                   neuron_top_tokens, neuron_vocab_logits)
from kn_lens.analysis.mapping import (MappingConfig, MappingResult, MappingSummary, QueryMapping,
                                      neighbour_sets, queries_and_sets_from_scores,
                                      query_kn_mapping)
from kn_lens.analysis.tnf_da import (IEConcentration, RelationOverlapResult, RepetitionResult,
                                     ie_concentration, mean_ie_concentration, relation_level_sets,
                                     relation_overlap, targeted_neuron_repetition,
                                     targeted_neurons)
from kn_lens.analysis.tracing import (LayerSweep, TraceConfig, TraceResult, causal_trace,
                                      layer_sweep, summarize_traces)

__all__ = [
    "CASConfig", "CASResult", "CompareConfig", "SelectionComparison", "cas_neurons", "cas_neurons_by_fact", "compare_kn_selections",
    "consistency_aware_score", "kn_selection_edits",
    "ConsistencyConfig", "ConsistencyResult", "FactConsistency", "GroupRow", "KNSelection",
    "consistency_analysis", "consistency_by_method", "cs1", "cs2", "default_selection", "kn_sets_from_scores", "otsu_threshold", "select_kns",
    "shared_k2_ratio", "welch_t_test",
    "LayerDistribution", "NeuronTokens", "layer_distribution", "neuron_top_tokens",
    "neuron_vocab_logits",
    "MappingConfig", "MappingResult", "MappingSummary", "QueryMapping", "neighbour_sets",
    "queries_and_sets_from_scores", "query_kn_mapping",
    "IEConcentration", "RelationOverlapResult", "RepetitionResult", "ie_concentration",
    "mean_ie_concentration", "relation_level_sets", "relation_overlap",
    "targeted_neuron_repetition", "targeted_neurons",
    "LayerSweep", "TraceConfig", "TraceResult", "causal_trace", "layer_sweep", "summarize_traces",
]

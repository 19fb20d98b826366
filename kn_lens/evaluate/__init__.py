"""Judging edits.

- :mod:`~kn_lens.evaluate.scoring` -- the one batched scorer (log-prob, argmax, rank at the
  answer positions) behind every metric and loss
- :mod:`~kn_lens.evaluate.probes` / :mod:`~kn_lens.evaluate.harness` -- probe sets from edit
  requests and the three-protocol harness (CounterFact, token accuracy, generation); sequential and
  batch modes
- :mod:`~kn_lens.evaluate.metrics` -- QL's reliability / generalisation / locality (its tables)
- :mod:`~kn_lens.evaluate.perplexity` -- dPPL on reference prose
"""
from kn_lens.evaluate.harness import (EditReport, HarnessConfig, edit_and_evaluate, evaluate,
                                      sequential)
from kn_lens.evaluate.metrics import (EditMetrics, QueryOutcome, edit_active, evaluate_edit,
                                      hook_supported, retarget)
from kn_lens.evaluate.perplexity import (PreparedReference, perplexity, prepare_reference,
                                         reference_slices, reference_tokens, relative_ppl_change,
                                         token_nll)
from kn_lens.evaluate.reference import reference_text

__all__ = [
    "EditReport", "HarnessConfig", "edit_and_evaluate", "evaluate", "sequential",
    "EditMetrics", "QueryOutcome", "edit_active", "evaluate_edit", "hook_supported", "retarget",
    "PreparedReference", "perplexity", "prepare_reference", "reference_slices", "reference_tokens", "relative_ppl_change", "token_nll",
    "reference_text",
]

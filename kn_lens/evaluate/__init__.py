"""Judging edits: QL's reliability / generalisation / locality, and perplexity on reference prose."""
from kn_lens.evaluate.metrics import (EditMetrics, QueryOutcome, edit_active, evaluate_edit,
                                      hook_supported, retarget)
from kn_lens.evaluate.perplexity import (PreparedReference, perplexity, prepare_reference,
                                         reference_slices, reference_tokens, relative_ppl_change,
                                         token_nll)
from kn_lens.evaluate.reference import reference_text

__all__ = [
    "EditMetrics", "QueryOutcome", "edit_active", "evaluate_edit", "hook_supported", "retarget",
    "PreparedReference", "perplexity", "prepare_reference", "reference_slices", "reference_tokens", "relative_ppl_change", "token_nll",
    "reference_text",
]

"""Edits as data (weight deltas) and the editing methods that produce them.

- :func:`edit` (``edit(model, requests, method="rome")``) -- the one driver over the editor
  registry (:func:`available_editors`): FT-L, ROME, MEMIT, QL's KN erasure / update
- :class:`Edit` -- slice, dense and low-rank deltas; hooks / materialise / undo / save / compose
- :mod:`kn_lens.edit.optimise` -- the shared optimisation loop (targets + loss terms)
"""
from kn_lens.edit.delta import (Edit, LowRankDelta, WeightDelta, compose, delta_hooks, dense,
                                head_slices, low_rank, param_name, parse_param, w_in_columns,
                                w_out_rows)
from kn_lens.edit.kn import (KNEditConfig, KNEditorConfig, answer_embedding, erase, kn_erase,
                             kn_sets, kn_update, token_of, update)
from kn_lens.edit.registry import (available_editors, edit, editor_version, get_editor,
                                   register_editor)

__all__ = [
    "Edit", "LowRankDelta", "WeightDelta", "compose", "delta_hooks", "dense", "head_slices",
    "low_rank", "param_name", "parse_param", "w_in_columns", "w_out_rows",
    "KNEditConfig", "KNEditorConfig", "answer_embedding", "erase", "kn_erase", "kn_sets",
    "kn_update", "token_of", "update",
    "available_editors", "edit", "editor_version", "get_editor", "register_editor",
]

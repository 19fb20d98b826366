"""Edits as data (sparse weight deltas) and the editing methods that produce them."""
from kn_lens.edit.delta import (Edit, WeightDelta, compose, head_slices, param_name, parse_param,
                                w_in_columns, w_out_rows)
from kn_lens.edit.kn import KNEditConfig, answer_embedding, erase, kn_sets, token_of, update

__all__ = [
    "Edit", "WeightDelta", "compose", "head_slices", "param_name", "parse_param", "w_in_columns",
    "w_out_rows", "KNEditConfig", "answer_embedding", "erase", "kn_sets", "token_of", "update",
]

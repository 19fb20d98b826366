"""Exact fast forward for activation-delta optimisation (ROME's v*, MEMIT's z).

A vector added at block L's output at each row's edit site (the subject's last token, position
``p_b``) changes nothing at positions ``< p_b`` nor anything below block L. So the residual stream
entering block L at positions ``>= p_b`` and every block's keys / values at positions ``< p_b`` are
computed once; each optimisation step runs blocks L.. on the suffix positions only, attending to
the frozen prefix keys / values. Rows have different prefix lengths: each row's suffix is placed
at the common offset ``P = max_b p_b`` and its prefix keys right-aligned before it (left-padded
and masked). Rotary attention depends only on relative positions, so the shift is exact; absolute
(learned) positions are already in the cached residual stream and keys.

The blocks are :func:`kn_lens._fast.prefix_block` (per-row prefixes), used when :func:`supported`
(:func:`kn_lens._fast.prefix_block_ok`, as for the mediation locator and integrated gradients);
otherwise the loop runs blocks L.. on every position. Tests compare the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kn_lens import _fast, hooks as H

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def supported(model: "HookedTransformer") -> bool:
    return _fast.prefix_block_ok(model)


@dataclass
class FrozenPrefix:
    """Per-row frozen state for blocks ``start..``: suffix residuals entering block ``start``
    (right-padded to ``S``), prefix keys/values (rotated once for rotary models) right-aligned in
    ``P`` slots with a validity mask, and each row's prefix length."""

    start: int
    P: int
    resid: Float[Tensor, "batch S d_model"]
    keys: list[Tensor]  # per block >= start: [batch, P, kv_head, d_head], relative (see _fast)
    values: list[Tensor]
    valid: Bool[Tensor, "batch P"]
    prefix_len: tuple[int, ...]
    clean_final: Tensor | None = None  # the unedited residual after the last block, all positions

    @classmethod
    @torch.no_grad()
    def build(cls, model: "HookedTransformer", ids: Sequence[Sequence[int]],
              sites: Sequence[int], start: int) -> "FrozenPrefix":
        from kn_lens.evaluate.scoring import pad_ids

        toks = pad_ids(model, ids)
        n_layers = model.cfg.n_layers
        store: dict[str, Tensor] = {}
        # keys as attention uses them (after q/k norms and rotary), values
        k_hook = "rot_k" if model.cfg.positional_embedding_type == "rotary" else "k"
        names = [H.resid_pre(start)] + [f"blocks.{i}.attn.hook_{kv}" for i in range(start, n_layers)
                                        for kv in (k_hook, "v")] + [H.resid_post(n_layers - 1)]
        fwd = [h for n in names for h in H.cache_hook(n, store)]
        with model.hooks(fwd_hooks=fwd):
            model(toks, stop_at_layer=n_layers)
        b = len(ids)
        P = max(sites)
        S = max(len(r) - p for r, p in zip(ids, sites))
        d = model.cfg.d_model
        resid = torch.zeros(b, S, d, dtype=store[names[0]].dtype, device=toks.device)
        valid = torch.zeros(b, P, dtype=torch.bool, device=toks.device)
        for i, (r, p) in enumerate(zip(ids, sites)):
            resid[i, :len(r) - p] = store[names[0]][i, p:len(r)]
            valid[i, P - p:] = True
        keys, values = [], []
        for layer in range(start, n_layers):
            attn = model.blocks[layer].attn
            k_all = store[f"blocks.{layer}.attn.hook_{k_hook}"]
            v_all = store[f"blocks.{layer}.attn.hook_v"]
            k = torch.zeros(b, P, *k_all.shape[2:], dtype=k_all.dtype, device=k_all.device)
            v = torch.zeros_like(k)
            for i, p in enumerate(sites):
                if p:  # right-aligned; rotary: relative to the row's own suffix start p_b
                    k[i, P - p:] = _fast.relative_prefix_keys(attn, k_all[i, :p], rotated=True)
                    v[i, P - p:] = v_all[i, :p]
            keys.append(k)
            values.append(v)
        return cls(start, P, resid, keys, values, valid, tuple(int(p) for p in sites),
                   store[H.resid_post(n_layers - 1)])

    def final_resid(self, model: "HookedTransformer") -> Float[Tensor, "batch S d_model"]:
        """Blocks ``start..`` on the suffixes (hooks fire as in TransformerLens' blocks)."""
        x = self.resid
        masks: dict = {}  # one per attention type (global / local window), not one per block
        for j, layer in enumerate(range(self.start, model.cfg.n_layers)):
            attn = model.blocks[layer].attn
            if attn.attn_type not in masks:
                masks[attn.attn_type] = _fast.prefix_mask(attn, x.shape[1], self.P, self.valid,
                                                          x.device)
            x = _fast.prefix_block(model.blocks[layer], x, self.keys[j], self.values[j],
                                   valid=self.valid, mask=masks[attn.attn_type])
        return x

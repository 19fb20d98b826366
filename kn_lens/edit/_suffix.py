"""Exact fast forward for activation-delta optimisation (ROME's v*, MEMIT's z).

A vector added at block L's output at each row's edit site (the subject's last token, position
``p_b``) changes nothing at positions ``< p_b`` nor anything below block L. So the residual stream
entering block L at positions ``>= p_b`` and every block's keys / values at positions ``< p_b`` are
computed once; each optimisation step runs blocks L.. on the suffix positions only, attending to
the frozen prefix keys / values. Rows have different prefix lengths: each row's suffix is placed
at the common offset ``P = max_b p_b`` and its prefix keys right-aligned before it (left-padded
and masked). Rotary attention depends only on relative positions, so the shift is exact; absolute
(learned) positions are already in the cached residual stream and keys.

Used when :func:`supported` (plain pre-norm blocks with standard or rotary positions, the same
condition as the mediation locator's shared-prefix path); otherwise the loop runs blocks L.. on
every position. Tests compare the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kn_lens import hooks as H

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def supported(model: "HookedTransformer") -> bool:
    from kn_lens.locate.mediation import _shared_prefix_ok

    return _shared_prefix_ok(model)


@dataclass
class FrozenPrefix:
    """Per-row frozen state for blocks ``start..``: suffix residuals entering block ``start``
    (right-padded to ``S``), prefix keys/values (rotated once for rotary models) right-aligned in
    ``P`` slots with a validity mask, and each row's prefix length."""

    start: int
    P: int
    resid: Float[Tensor, "batch S d_model"]
    keys: list[Tensor]  # per block >= start: [batch, P, kv_head, d_head] (rotated if rotary)
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
        names = [H.resid_pre(start)] + [f"blocks.{i}.attn.hook_{kv}" for i in range(start, n_layers)
                                        for kv in ("k", "v")] + [H.resid_post(n_layers - 1)]
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
            k_all = store[f"blocks.{layer}.attn.hook_k"]
            v_all = store[f"blocks.{layer}.attn.hook_v"]
            k = torch.zeros(b, P, *k_all.shape[2:], dtype=k_all.dtype, device=k_all.device)
            v = torch.zeros_like(k)
            for i, p in enumerate(sites):
                if p:
                    k[i, P - p:] = k_all[i, :p]
                    v[i, P - p:] = v_all[i, :p]
            if model.cfg.positional_embedding_type == "rotary" and P:
                # rotated at their slots P - p_b + j: the suffix sits at P, so every relative
                # distance (P + i) - (P - p_b + j) = p_b + i - j is the true one
                k = attn.apply_rotary(k, 0)
            keys.append(k)
            values.append(v)
        return cls(start, P, resid, keys, values, valid, tuple(int(p) for p in sites),
                   store[H.resid_post(n_layers - 1)])

    def final_resid(self, model: "HookedTransformer") -> Float[Tensor, "batch S d_model"]:
        """Blocks ``start..`` on the suffixes (hooks fire as in TransformerLens' blocks)."""
        x = self.resid
        for j, layer in enumerate(range(self.start, model.cfg.n_layers)):
            x = _block(model.blocks[layer], x, self.keys[j], self.values[j], self.valid, self.P,
                       model.cfg.positional_embedding_type == "rotary")
        return x


def _block(block, x: Float[Tensor, "batch s d_model"], pk: Tensor, pv: Tensor,
           valid: Bool[Tensor, "batch P"], P: int, rotary: bool) -> Float[Tensor, "batch s d_model"]:
    from transformer_lens.utils import apply_softcap

    from kn_lens._fast import mlp_forward as _mlp_forward

    attn, cfg = block.attn, block.cfg
    b, s, _ = x.shape
    resid_pre = block.hook_resid_pre(x)
    h_in = block.ln1(resid_pre)
    q, k, v = attn.calculate_qkv_matrices(h_in, h_in, h_in)  # hook_q/k/v fire here
    if rotary:
        q = attn.apply_rotary(q, P)
        k = attn.apply_rotary(k, P)
    n_q, n_kv, dh = q.shape[2], k.shape[2], q.shape[3]
    g = n_q // n_kv
    qg = q.reshape(b, s, n_kv, g, dh)
    sc_new = torch.einsum("bsngd,btnd->bngst", qg, k) / attn.attn_scale
    sc_old = torch.einsum("bsngd,bpnd->bngsp", qg, pk.to(q.dtype)) / attn.attn_scale
    scores = apply_softcap(torch.cat([sc_old, sc_new], dim=-1), cfg.attn_scores_soft_cap)
    causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    mask = torch.cat([valid[:, None, :].expand(b, s, P), causal[None].expand(b, s, s)], dim=-1)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    pattern = torch.softmax(scores, dim=-1).to(v.dtype)
    z = torch.einsum("bngst,btnd->bsngd", pattern[..., P:], v)
    z = z + torch.einsum("bngsp,bpnd->bsngd", pattern[..., :P], pv.to(v.dtype))
    z = attn.hook_z(z.reshape(b, s, n_q, dh))
    attn_out = block.hook_attn_out(z.reshape(b, s, n_q * dh) @ attn.W_O.reshape(n_q * dh, -1)
                                   + attn.b_O)
    resid_mid = block.hook_resid_mid(resid_pre + attn_out)
    mlp_out = block.hook_mlp_out(_mlp_forward(block.mlp, block.ln2(resid_mid)))
    return block.hook_resid_post(resid_mid + mlp_out)

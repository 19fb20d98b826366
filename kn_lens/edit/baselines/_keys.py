"""Activations at edit sites, shared by ROME and MEMIT: keys (what ``W_out`` reads) and
residual / MLP outputs at each query's subject-last token."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens import hooks as H
from kn_lens.backend import stop_before
from kn_lens.evaluate.scoring import pad_ids
from kn_lens.facts import Query

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@torch.no_grad()
def at_sites(model: "HookedTransformer", queries: Sequence[Query], sites: Sequence[int],
             names: Sequence[str], *, batch_size: int = 64) -> dict[str, Float[Tensor, "n d"]]:
    """The activations of hook points ``names`` at ``(query, site)``, one row per query (prompt
    tokens only: the site precedes the answer, so the answer cannot influence it)."""
    rows = [tuple(q.prompt_ids) for q in queries]
    stop = max(H.layer_of(n) for n in names) + 1
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        store: dict[str, Tensor] = {}
        fwd = [h for n in names for h in H.cache_hook(n, store)]  # keyed by the name asked for
        with model.hooks(fwd_hooks=fwd):
            model(pad_ids(model, chunk), **stop_before(model, stop))
        dev = store[names[0]].device
        idx = torch.arange(len(chunk), device=dev)
        pos = torch.tensor(list(sites[s:s + batch_size]), device=dev)
        for n in names:
            out[n].append(store[n][idx, pos].float().cpu())
    return {n: torch.cat(v) for n, v in out.items()}


def keys(model: "HookedTransformer", queries: Sequence[Query], sites: Sequence[int], layer: int
         ) -> Float[Tensor, "n d_mlp"]:
    """``blocks.{layer}.mlp.hook_post`` (W_out's input) at each query's site."""
    return at_sites(model, queries, sites, [H.mlp_post(layer)])[H.mlp_post(layer)]


def mlp_output(model: "HookedTransformer", k: Float[Tensor, "n d_mlp"], layer: int
               ) -> Float[Tensor, "n d_model"]:
    """What the MLP of ``layer`` writes for keys ``k`` (before any post-MLP norm): k W_out + b."""
    mlp = model.blocks[layer].mlp
    w = mlp.W_out.detach().float().cpu()
    b = getattr(mlp, "b_out", None)
    out = k @ w
    return out + b.detach().float().cpu() if isinstance(b, Tensor) else out

"""The offline views of one fact on a model (runs the model; the other view functions take plain
data): the attention of the layer with the most knowledge synapses off the attention sink (QL eq.
5-6; the layer with the most synapses when all sit on key 0), that layer's full attention, and the
fact's KNs' activations along the prompt."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from kn_lens.viz.attention import OfflineView, attention_view, synapse_view, token_view

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from kn_lens.facts import Query
    from kn_lens.neurons import Neuron

__all__ = ["fact_views"]


def fact_views(model: "HookedTransformer", query: "Query", kns: Sequence["Neuron"] = (), *,
               label: str = "", full_attention: bool = False) -> dict[str, OfflineView]:
    """Titled views of ``query`` (for :func:`kn_lens.viz.save_html`): its synapse layer's
    synapse columns, optionally that layer's full attention, and ``kns`` (sorted by layer)
    along the prompt. Every hook is scoped; the model is left as it was."""
    from kn_lens import hooks
    from kn_lens.analysis.synapses import attention_patterns, synapses_from_patterns

    tokens = [model.tokenizer.decode([t]) for t in query.prompt_ids]
    pats = attention_patterns(model, query)
    mask, _, _ = synapses_from_patterns(pats)  # the paper's eq. 6, the sink column included
    off_sink = mask[..., 1:].flatten(1).sum(1)
    layer = int(off_sink.argmax()) if off_sink.any() else int(mask.flatten(1).sum(1).argmax())
    head = f"{label}: " if label else ""
    views = {f"{head}knowledge synapses of layer {layer} ({int(mask[layer].sum())} head-key "
             f"pairs, {int(mask[layer, :, 1:].sum())} off the sink)":
             synapse_view(tokens, pats, mask, layer=layer)}
    if full_attention:
        views[f"{head}layer {layer}: full attention"] = attention_view(tokens, pats[layer])
    kns = sorted(kns, key=lambda n: (n.layer, n.index))
    if kns:
        store: dict = {}
        fwd = [h for l in sorted({n.layer for n in kns})
               for h in hooks.cache_hook(hooks.mlp_post(l), store)]
        with torch.no_grad(), model.hooks(fwd_hooks=fwd):
            model(torch.tensor([query.prompt_ids], device=model.cfg.device), return_type=None)
        acts = torch.stack([store[hooks.mlp_post(n.layer)][0, :, n.index] for n in kns], dim=1)
        views[f"{head}{len(kns)} knowledge neurons: activation along the prompt"] = \
            token_view(tokens, acts, labels=[str(n) for n in kns])
    return views

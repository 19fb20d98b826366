"""FiNE contribution scores (Pan et al. 2025, "Precise Localization...", eq. 3).

For answer token ``t`` and neuron ``i`` of layer ``l``:

    c[t, l, i] = q^l_i(p_t) * (W_U W_out^l)[t, i] = q^l_i(p_t) * (W_out^l[i, :] . W_U[:, t])

where ``q^l`` is the neuron activation (``hook_post``, what ``W_out`` reads) at the position
``p_t`` that predicts ``t`` (the prompt's last token for the first answer token, teacher-forced
positions for the following ones). It is the direct logit effect of the neuron on the answer token,
ignoring everything downstream of it (attention, later MLPs) and the final norm's per-position
scale. It depends on weight processing: kn-lens loads models with the final norm's weight folded
into ``W_U`` (and, for LayerNorm models, centred writing weights / unembedding), which the result
records in ``NeuronScores.model``. Models that normalise each MLP output before the residual
(Gemma's ``ln2_post``) get that norm with its scale frozen, as the final norm's: the score is
``q / s^l(p_t) * (W_U diag(g^l) W_out^l)[t, i]`` (``s`` the norm's RMS scale, ``g`` its weight),
so that, summed over a layer's neurons (plus its bias), it is that layer's direct logit effect.
Without it, layers whose MLP output is large before the norm (Gemma's first layers) dominate.

Selection (FiNE §3.2, §4.3, App. C): the top ``k = 5`` neurons per answer token, excluding the last
``l_f = 3`` layers (layer freezing), united over tokens: :func:`select_contribution_neurons`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens import hooks
from kn_lens._fast import fast_forward
from kn_lens.backend import has_post_norms, norm_weight, stop_before
from kn_lens.errors import ConfigError
from kn_lens.facts import Query
from kn_lens.locate.integrated_gradients import _check_query
from kn_lens.models import model_info
from kn_lens.neurons import NeuronScores, NeuronSet, top_k_per_token


@dataclass(frozen=True, kw_only=True)
class ContributionConfig:
    """FiNE's contribution scores and their selection defaults."""

    k: int = 5  # top-k neurons per answer token: FiNE App. C ("k = 5 for all LLMs")
    freeze_last: int = 3  # l_f, layers excluded from selection: FiNE §4.3 / App. C
    by: Literal["value", "abs"] = "value"  # FiNE ranks scores in descending order

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"ContributionConfig.k must be a positive integer, got {self.k!r}")
        if not isinstance(self.freeze_last, int) or self.freeze_last < 0:
            raise ConfigError("ContributionConfig.freeze_last must be a non-negative integer, "
                              f"got {self.freeze_last!r}")
        if self.by not in ("value", "abs"):
            raise ConfigError(f"ContributionConfig.by must be 'value' or 'abs', got {self.by!r}")


def _post_norm(model) -> bool:
    """Whether the model normalises each MLP output before adding it to the residual (Gemma 2/3)."""
    return has_post_norms(model)


def unembed_directions(model, answer_ids: tuple[int, ...]) -> Float[Tensor, "layer answer d_mlp"]:
    """(W_U W_out^l)[t, :] for every layer and answer token: each neuron's direct logit weight.

    For models with a norm after the MLP (``ln2_post``, Gemma), its weight is included:
    (W_U diag(g) W_out^l)[t, :]; the norm's per-position scale is applied to the activations."""
    w_u = model.W_U[:, list(answer_ids)].float()  # [d_model, answer]
    out = []
    for b in model.blocks:
        w_out = b.mlp.W_out.float()
        g = norm_weight(model, b.ln2_post) if _post_norm(model) else None
        if g is not None:
            w_out = w_out * g.float()[None, :]
        out.append((w_out @ w_u).T)
    return torch.stack(out)


@torch.no_grad()
def contribution_scores(model, query: Query, *, config: ContributionConfig | None = None
                        ) -> NeuronScores:
    """FiNE eq. 3 contribution score of every FFN neuron for each answer token.

    ``per_token[t]`` is the map for answer token ``t``; ``scores`` sums them. Select with
    :func:`select_contribution_neurons`.
    """
    config = ContributionConfig() if config is None else config
    _check_query(model, query)
    n = model.cfg.n_layers
    store: dict = {}
    post = _post_norm(model)
    fwd = [h for l in range(n) for h in hooks.cache_hook(hooks.mlp_post(l), store)]
    if post:
        fwd += [h for l in range(n) for h in hooks.cache_hook(hooks.ln2_post_scale(l), store)]
    tokens = torch.tensor([query.input_ids], dtype=torch.long, device=model.cfg.device)
    with fast_forward(model, frozen_weights=True), model.hooks(fwd_hooks=fwd):
        model(tokens, **stop_before(model, n))  # the MLP activations only: no unembedding
    pos = torch.tensor(query.answer_positions, device=model.cfg.device)
    acts = torch.stack([store[hooks.mlp_post(l)][0, pos] for l in range(n)]).float()  # [layer, answer, d_mlp]
    if post:  # the post-MLP RMSNorm divides the layer's whole output by its RMS at that position
        acts = acts / torch.stack([store[hooks.ln2_post_scale(l)][0, pos] for l in range(n)]).float()
    direc = unembed_directions(model, query.answer_ids)  # [layer, answer, d_mlp]
    per_token = (acts * direc).permute(1, 0, 2).contiguous().cpu()
    extras = {"note": "direct logit effect; final-norm scale and downstream paths ignored (FiNE eq. 3)"}
    if post:
        extras["post_mlp_norm"] = ("the MLP output norm (ln2_post) is applied with its scale frozen "
                                   "at the clean run: act / scale x (W_U diag(g) W_out)[t, i]")
    return NeuronScores(scores=per_token.sum(0), method="contribution", query=query, config=config,
                        model=model_info(model), per_token=per_token, extras=extras)


def select_contribution_neurons(scores: NeuronScores, config: ContributionConfig | None = None
                                ) -> NeuronSet:
    """FiNE's selection: top-k per answer token over the unfrozen layers, united over tokens."""
    config = ContributionConfig() if config is None else config
    return top_k_per_token(scores, config.k, by=config.by, freeze_last=config.freeze_last)

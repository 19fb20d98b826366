"""Knowledge-neuron modification as weight deltas (Query Localization, Sec. 2.2, eq. 2).

For every KN ``[l, p]`` in the chosen set (a query's own set N_i, "local", or the union over the
fact's queries N_g, "global"), the neuron's MLP weight ``W_{l,p}`` (its value vector, the W_out row
it writes to the residual stream) becomes

- Erasure: ``0``                                    -> delta ``-W_{l,p}``
- Update:  ``W_{l,p} - lambda1 E(o) + lambda2 E(o')`` -> delta ``-lambda1 E(o) + lambda2 E(o')``

with ``lambda1 = lambda2 = 2`` (QL App. A.1) and ``E(.)`` "the word embedding" of the original and
new object. QL does not spell out which matrix; the knowledge-neurons code it builds on (Dai et al.;
EleutherAI's ``knowledge-neurons`` ``edit_knowledge``) takes the row of the model's *input* word
embedding matrix for the answer's (first) token, so ``embedding="input"`` (``W_E[token]``) is the
default. ``embedding="unembed"`` uses the unembedding column ``W_U[:, token]`` instead, the
residual direction that raises that token's logit. Both are read from the model *as loaded*: kn-lens
folds the final norm's weight into ``W_U`` and may centre ``W_U`` (``center_unembed``) and, for
LayerNorm models, centre ``W_E`` (``center_writing_weights``); SmolLM2 ties W_E and W_U before that
processing, so the two choices differ by the folded final-norm weights and the centring. The
choice is recorded in the edit's config.

Multi-token objects: E(o) is the embedding of the object's first token (as in the KN code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens.backend import embedding_matrix
from kn_lens.edit.delta import Edit, w_out_rows
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import Query, encode_answer
from kn_lens.models import model_info
from kn_lens.neurons import NeuronScores, NeuronSet, threshold_relative, union

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True, kw_only=True)
class KNEditConfig:
    lambda1: float = 2.0  # QL App. A.1: "In Equation 2, we set lambda1 = lambda2 = 2"
    lambda2: float = 2.0  # QL App. A.1
    embedding: Literal["input", "unembed"] = "input"  # E(.): W_E row as in the KN code (see module doc)

    def __post_init__(self) -> None:
        if self.embedding not in ("input", "unembed"):
            raise ConfigError(f"embedding must be 'input' or 'unembed', not {self.embedding!r}")


def _by_layer(neurons: NeuronSet) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for n in neurons:
        out.setdefault(n.layer, []).append(n.index)
    return out


def _check_neurons(model, neurons: NeuronSet) -> None:
    if not isinstance(neurons, NeuronSet):
        neurons = NeuronSet(neurons)
    if len(neurons) == 0:
        raise ConfigError("no neurons to modify: the neuron set is empty")
    for n in neurons:
        if not (0 <= n.layer < model.cfg.n_layers and 0 <= n.index < model.cfg.d_mlp):
            raise ConfigError(f"neuron {n} is outside the model ({model.cfg.n_layers} layers x "
                              f"{model.cfg.d_mlp} neurons)")


def erase(model: "HookedTransformer", neurons: NeuronSet, *, description: str = "") -> Edit:
    """QL eq. 2 Erasure: the neurons' W_out rows set to zero (delta = -row)."""
    neurons = neurons if isinstance(neurons, NeuronSet) else NeuronSet(neurons)
    _check_neurons(model, neurons)
    deltas = []
    for layer, idx in sorted(_by_layer(neurons).items()):
        w_out = model.blocks[layer].mlp.W_out.detach()
        rows = w_out[torch.tensor(idx, device=w_out.device)]
        deltas.append(w_out_rows(layer, idx, -rows.clone()))
    return Edit(tuple(deltas), description or f"erase {len(neurons)} KNs", "kn_erase",
                model_info(model), {"neurons": neurons.to_list()})


def token_of(model: "HookedTransformer", answer: str | Query | int) -> int:
    """The first token id of an answer: a Query's answer, a token id, or text (a leading space is
    added when missing, as answers follow the prompt)."""
    if isinstance(answer, Query):
        return int(answer.answer_ids[0])
    if isinstance(answer, int):
        if not 0 <= answer < model.cfg.d_vocab:
            raise ConfigError(f"token id {answer} outside the vocabulary ({model.cfg.d_vocab})")
        return answer
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidFactError(f"empty answer {answer!r}")
    text = answer if answer.startswith(" ") else " " + answer
    return int(encode_answer(model.tokenizer, text)[0])


def answer_embedding(model: "HookedTransformer", token: int,
                     embedding: Literal["input", "unembed"] = "input") -> Float[Tensor, "d_model"]:
    """E(token): ``W_E[token]`` ("input") or ``W_U[:, token]`` ("unembed"), as loaded."""
    if embedding == "input":
        return embedding_matrix(model, slice(token, token + 1)).detach()[0].clone()
    if embedding == "unembed":
        return model.W_U.detach()[:, token].clone()
    raise ConfigError(f"embedding must be 'input' or 'unembed', not {embedding!r}")


def update(model: "HookedTransformer", neurons: NeuronSet, old_answer: str | Query | int,
           new_answer: str | Query | int, *, config: KNEditConfig = KNEditConfig(),
           description: str = "") -> Edit:
    """QL eq. 2 Update: each neuron's W_out row += -lambda1 E(o) + lambda2 E(o')."""
    neurons = neurons if isinstance(neurons, NeuronSet) else NeuronSet(neurons)
    _check_neurons(model, neurons)
    o, o_new = token_of(model, old_answer), token_of(model, new_answer)
    if o == o_new:
        raise InvalidFactError(
            f"old and new answers share their first token ({o}); eq. 2 would change nothing useful")
    vec = (-config.lambda1 * answer_embedding(model, o, config.embedding)
           + config.lambda2 * answer_embedding(model, o_new, config.embedding))
    deltas = []
    for layer, idx in sorted(_by_layer(neurons).items()):
        deltas.append(w_out_rows(layer, idx, vec.unsqueeze(0).expand(len(idx), -1).clone()))
    tok = model.tokenizer
    return Edit(tuple(deltas),
                description or f"update {len(neurons)} KNs: {tok.decode([o])!r} -> {tok.decode([o_new])!r}",
                "kn_update", model_info(model),
                {"neurons": neurons.to_list(), "old_token": o, "new_token": o_new,
                 "lambda1": config.lambda1, "lambda2": config.lambda2, "embedding": config.embedding})


def kn_sets(scores_per_query: Sequence[NeuronScores | NeuronSet | Tensor], *,
            select: Callable[[NeuronScores | Tensor], NeuronSet] | None = None
            ) -> tuple[list[NeuronSet], NeuronSet]:
    """Local sets N_i (one per query of a fact) and the global set N_g = union_i N_i (QL eq. 2).

    Items that are already NeuronSets are used as they are; score maps are turned into sets with
    ``select`` (default: Dai et al.'s threshold, neurons above 0.2 x the maximum score).
    """
    if not scores_per_query:
        raise ConfigError("kn_sets needs the scores (or sets) of at least one query")
    pick = select or (lambda s: threshold_relative(s, 0.2))  # Dai et al. 2022, threshold t = 0.2
    local = [s if isinstance(s, NeuronSet) else pick(s) for s in scores_per_query]
    return local, union(local)


# --------------------------------------------------------------------------- registered editors


@dataclass(frozen=True, kw_only=True)
class KNEditorConfig:
    """QL's KN erasure / update as editors of :func:`kn_lens.edit.edit` (``kn_erase``,
    ``kn_update``). Without a neuron set, each request's KNs are located on its rewrite prompt
    (``scope="local"``, QL's N_i) or on the rewrite and paraphrase prompts and united
    (``scope="global"``, N_g), with ``locator`` and Dai et al.'s threshold (> ``threshold`` x the
    maximum score)."""

    locator: str = "ig"  # QL locates KNs by integrated gradients
    scope: Literal["local", "global"] = "local"
    threshold: float = 0.2  # Dai et al. 2022: t = 0.2
    update: KNEditConfig = KNEditConfig()  # eq. 2's lambda1 / lambda2 / embedding (kn_update)

    def __post_init__(self) -> None:
        if self.scope not in ("local", "global"):
            raise ConfigError(f"scope must be 'local' or 'global', not {self.scope!r}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")


def request_neurons(model: "HookedTransformer", request, config: KNEditorConfig) -> NeuronSet:
    """The request's KNs for its *original* fact (what QL edits)."""
    from kn_lens.facts import prompt_query
    from kn_lens.locate import locate

    prompts = list(request.prompts) + (list(request.paraphrase_prompts)
                                       if config.scope == "global" else [])
    qs = [prompt_query(model, p, request.fact.object, request.fact) for p in prompts]
    scores = locate(model, qs, method=config.locator, progress=False)
    _, n_g = kn_sets(scores, select=lambda s: threshold_relative(s, config.threshold))
    return n_g


def _editor_neurons(model, requests, neurons, config) -> list[NeuronSet]:
    if neurons is None:
        return [request_neurons(model, r, config) for r in requests]
    if isinstance(neurons, NeuronSet):
        return [neurons] * len(requests)
    neurons = list(neurons)
    if len(neurons) != len(requests):
        raise ConfigError(f"{len(neurons)} neuron sets for {len(requests)} requests")
    return [n if isinstance(n, NeuronSet) else NeuronSet(n) for n in neurons]


def kn_erase(model: "HookedTransformer", requests, *, config: KNEditorConfig | None = None,
             neurons: "NeuronSet | Sequence[NeuronSet] | None" = None,
             generator: torch.Generator | None = None) -> Edit:
    """QL eq. 2 erasure of each request's KNs (the union over a batch). The new object is not
    used: erasure removes the old fact, and the harness judges whether that is enough."""
    from kn_lens.edit.requests import check_requests

    cfg = config or KNEditorConfig()
    requests = check_requests(model, requests)
    sets = _editor_neurons(model, requests, neurons, cfg)
    allset = union(sets)
    e = erase(model, allset, description=f"KN erasure of {len(allset)} neurons: " +
              "; ".join(r.fact.subject for r in requests[:3]))
    return Edit(e.deltas, e.description, "kn_erase", e.model,
                {"neurons": allset.to_list(), "config": cfg, "per_request": [len(s) for s in sets]})


def kn_update(model: "HookedTransformer", requests, *, config: KNEditorConfig | None = None,
              neurons: "NeuronSet | Sequence[NeuronSet] | None" = None,
              generator: torch.Generator | None = None) -> Edit:
    """QL eq. 2 update of each request's KNs (W_out rows += -l1 E(o) + l2 E(o')); the requests'
    deltas are composed (shared neurons get the sum)."""
    from kn_lens.edit.delta import compose
    from kn_lens.edit.requests import check_requests

    cfg = config or KNEditorConfig()
    requests = check_requests(model, requests)
    sets = _editor_neurons(model, requests, neurons, cfg)
    parts = [update(model, s, " " + r.fact.object, " " + r.new_object, config=cfg.update)
             for r, s in zip(requests, sets)]
    e = compose(parts)
    return Edit(e.deltas, f"KN update ({len(union(sets))} neurons): " +
                "; ".join(f"{r.fact.subject} -> {r.new_object}" for r in requests[:3]),
                "kn_update", model_info(model),
                {"neurons": union(sets).to_list(), "config": cfg,
                 "per_request": [len(s) for s in sets]})

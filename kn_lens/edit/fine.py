"""FiNE: fine-grained neuron-level knowledge editing (Pan et al. 2025, ``fine.txt`` Sec. 4, App. C).

1. **Locate** (Sec. 4.1, Algorithm 1): for each token ``t`` the unedited model produces after the
   rewrite prompt (greedy, as many tokens as the old object has; teacher-forced one by one), the
   contribution score ``c = q^l_i * (W_U W_out^l)[t, i]`` of every FFN neuron at the position
   predicting ``t`` (eq. 3, :mod:`kn_lens.locate.contribution`); the top ``k = 5`` per token,
   united over tokens (App. C), never in the last ``l_f = 3`` layers (layer freezing, Sec. 4.3).
2. **Edit** (Sec. 4.2): a vector ``z`` added to the W_out row of every located neuron, trained
   with eq. 7: ``L = L_edit + alpha L_KL + beta L_pen`` -- the teacher-forced NLL of the new
   object (eq. 4, every token at its own position), ``KL(P_edited || P_unedited)`` at prompt
   positions ``1 .. l_p - 1`` (eq. 5) and ``-log(1 - P(o* | p(s, r, o*)))`` (eq. 6) -- plus
   ``gamma ||Z||`` (the FiNE code's ``gamma``; the paper reports "without weight decay"). Adam,
   at most 50 steps, stopped once P(o* | prompt) reaches 0.9 for every request (App. C).

Ablations: ``neurons="random"`` (Table 2 "w/o Loc.": as many neurons, drawn uniformly from the
layers FiNE may edit), ``freeze_last=0`` ("w/o LF"), ``layer=l`` (Table 3: top-k within one layer),
``alpha=0`` / ``beta=0`` (Table 12: w/o L_KL / w/o L_pen). Several requests make one batch edit:
the union of their neurons, one loss over all of them.

Which token is located: the paper's eq. 3 scores "the token t in o_j" that the model outputs (App.
A: "we assume the LLM will output a token t"); here that is the unedited model's own greedy
continuation (``locate_on="prediction"``), which for a known fact is the old object; the old
object's tokens teacher-forced (``locate_on="old_object"``) is the other reading.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch

from kn_lens.edit.delta import Edit, w_out_rows
from kn_lens.edit.kn import _by_layer, _check_neurons
from kn_lens.edit.optimise import (KL, NLL, OptimConfig, RepetitionPenalty, Target, kl_examples,
                                   optimise)
from kn_lens.edit.requests import check_layer, check_requests, rewrite_queries
from kn_lens.errors import ConfigError
from kn_lens.facts import EditRequest, Query
from kn_lens.models import model_info
from kn_lens.neurons import Neuron, NeuronSet, top_k, union

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True, kw_only=True)
class FiNEConfig:
    k: int = 5  # top-k neurons per target token: FiNE App. C ("k = 5 for all LLMs")
    freeze_last: int = 3  # l_f: FiNE Sec. 4.3 / App. C ("we set l_f to 3"); 0 = "w/o LF"
    layer: int | None = None  # one layer only (FiNE Table 3); None: every unfrozen layer ("Any")
    neurons: Literal["located", "random"] = "located"  # "random": Table 2 "w/o Loc."
    locate_on: Literal["prediction", "old_object"] = "prediction"  # see the module doc
    alpha: float = 1.0  # KL weight: FiNE App. C ("alpha is set to 1")
    beta: float = 10.0  # repetition-penalty weight: FiNE App. C ("beta is set to 10")
    gamma: float = 0.1  # ||Z|| weight: the FiNE code's gamma (the default)
    lr: float = 5e-3  # FiNE App. C: 1e-3 (GPT-J, LLaMA-3), 5e-3 (LLaMA-2); see README for ours
    steps: int = 50  # FiNE App. C: "run for a maximum of 50 steps"
    stop_prob: float | None = 0.9  # FiNE App. C: early stop when P(o* | p) reaches 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"FiNEConfig.k must be a positive integer, got {self.k!r}")
        if not isinstance(self.freeze_last, int) or self.freeze_last < 0:
            raise ConfigError(f"FiNEConfig.freeze_last must be >= 0, got {self.freeze_last!r}")
        if self.neurons not in ("located", "random"):
            raise ConfigError(f"FiNEConfig.neurons must be 'located' or 'random', not "
                              f"{self.neurons!r}")
        if self.locate_on not in ("prediction", "old_object"):
            raise ConfigError(f"FiNEConfig.locate_on must be 'prediction' or 'old_object', not "
                              f"{self.locate_on!r}")
        for name in ("alpha", "beta", "gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"FiNEConfig.{name} must be >= 0")
        if self.steps < 0 or not self.lr > 0:
            raise ConfigError("FiNEConfig: steps >= 0 and lr > 0")
        if self.stop_prob is not None and not 0 < self.stop_prob <= 1:
            raise ConfigError(f"FiNEConfig.stop_prob must be in (0, 1], got {self.stop_prob}")


def editable_layers(model: "HookedTransformer", config: FiNEConfig) -> list[int]:
    """The layers FiNE may edit: the chosen one, or all but the last ``freeze_last``."""
    n = model.cfg.n_layers
    if config.freeze_last >= n:
        raise ConfigError(f"freeze_last={config.freeze_last} freezes all {n} layers")
    allowed = list(range(n - config.freeze_last))
    if config.layer is not None:
        layer = check_layer(model, config.layer)
        if layer not in allowed:
            raise ConfigError(f"layer {layer} is frozen (freeze_last={config.freeze_last} leaves "
                              f"layers 0..{allowed[-1]}); pass freeze_last=0 to edit it")
        return [layer]
    return allowed


def located_query(model: "HookedTransformer", request: EditRequest, config: FiNEConfig) -> Query:
    """The query whose answer tokens FiNE locates neurons for: the rewrite prompt with the
    unedited model's greedy continuation (as many tokens as the old object), or the old object."""
    (q,) = rewrite_queries(model, request, target=request.fact.object, all_prompts=False)
    if config.locate_on == "old_object":
        return q
    from kn_lens.evaluate.generation import greedy

    pred = greedy(model, q.prompt_ids, q.n_answer, stop_at_eos=False)
    return dataclasses.replace(q, answer=model.tokenizer.decode(pred), answer_ids=tuple(pred))


def locate_neurons(model: "HookedTransformer", requests: Sequence[EditRequest], *,
                   config: FiNEConfig | None = None,
                   generator: torch.Generator | None = None) -> NeuronSet:
    """FiNE Algorithm 1 for each request (top-k per token in :func:`editable_layers`), united
    over requests; or, with ``neurons="random"``, as many random neurons of those layers."""
    from kn_lens.locate.contribution import contribution_scores

    cfg = config or FiNEConfig()
    layers = editable_layers(model, cfg)
    mask = torch.full((model.cfg.n_layers, model.cfg.d_mlp), float("-inf"), device="cpu")
    mask[layers] = 0.0
    sets = []
    for r in requests:
        scores = contribution_scores(model, located_query(model, r, cfg))
        sets.append(union(top_k(t.float() + mask, cfg.k) for t in scores.per_token))
    located = union(sets)
    if cfg.neurons == "located":
        return located
    if generator is None:
        raise ConfigError("random FiNE neurons need a generator (edit(..., seed=...) passes one)")
    flat = torch.randperm(len(layers) * model.cfg.d_mlp, generator=generator,
                          device="cpu")[:len(located)]
    d = model.cfg.d_mlp
    return NeuronSet(Neuron(layers[int(i) // d], int(i) % d) for i in flat)


def fine(model: "HookedTransformer", requests: Sequence[EditRequest], *,
         config: FiNEConfig | None = None, neurons: NeuronSet | None = None,
         generator: torch.Generator | None = None) -> Edit:
    """FiNE as an :class:`Edit`: trained deltas on the W_out rows of the located neurons.

    ``neurons`` replaces the localisation (it must lie in :func:`editable_layers`)."""
    cfg = config or FiNEConfig()
    requests = check_requests(model, requests)
    layers = editable_layers(model, cfg)
    if neurons is None:
        neurons = locate_neurons(model, requests, config=cfg, generator=generator)
    else:
        neurons = neurons if isinstance(neurons, NeuronSet) else NeuronSet(neurons)
        bad = [n for n in neurons if n.layer not in layers or not 0 <= n.index < model.cfg.d_mlp]
        if bad:
            raise ConfigError(f"neurons outside the layers FiNE may edit ({layers[0]}..{layers[-1]}"
                              f" x {model.cfg.d_mlp}): {bad[:5]}")
    _check_neurons(model, neurons)  # typed errors: empty, outside the model
    by_layer = _by_layer(neurons)
    queries = [q for r in requests for q in rewrite_queries(model, r)]
    terms = [NLL(queries)]
    if cfg.alpha:
        terms.append(KL(kl_examples(queries, positions="prompt"), weight=cfg.alpha,
                        direction="edit||ref"))
    if cfg.beta:
        terms.append(RepetitionPenalty(queries, weight=cfg.beta))
    targets = [Target.rows(layer, idx, "W_out") for layer, idx in sorted(by_layer.items())]
    res = optimise(model, targets, terms, config=OptimConfig(
        steps=cfg.steps, lr=cfg.lr, l2=cfg.gamma, stop_prob=cfg.stop_prob))
    deltas = tuple(w_out_rows(t.block, t.index, v.cpu()) for t, v in zip(targets, res.values))
    desc = (f"FiNE {len(neurons)} neurons in layers {sorted(by_layer)}: " +
            "; ".join(f"{r.fact.subject} -> {r.new_object}" for r in requests[:3]))
    return Edit(deltas, desc, "fine", model_info(model),
                {"config": cfg, "neurons": neurons.to_list(), "steps": res.steps,
                 "stopped": res.stopped, "final_loss": res.final_loss,
                 "final_min_p": res.history[-1].get("min_p") if res.history else None})

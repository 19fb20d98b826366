"""KNE: knowledge neuronal ensemble editing (``kne.txt`` Sec. 3, 4.3-4.6).

1. **Attribute** (eq. 4-5): integrated gradients of P(answer) for every FFN neuron of every layer
   (:mod:`kn_lens.locate.integrated_gradients`, m = 20 right-Riemann steps, zero baseline, every
   answer token at its own position, summed over tokens). Scaling a neuron's W_out row by alpha
   scales its contribution exactly as scaling its activation does, so eq. 4's parameter path is
   the activation path the locator integrates.
2. **Ensemble** (eq. 6-7): the neurons whose attribution reaches ``t_p``, the ``quantile`` of all
   attributions over all layers (positive ones only). Batch editing (Sec. 4.6): the union of the
   requests' ensembles. Sec. 4.4's reuse: pass an ensemble located on other facts as ``neurons``.
3. **Edit** (eq. 8-11): per layer, a zero matrix on the ensemble's ``n`` positions (rows of
   ``W_out``; columns of ``W_in`` / ``W_gate`` for the module study, Sec. 4.3) trained jointly
   over all layers by backpropagation, applied as ``W + alpha / sqrt(n) * dW``. The loss is the
   teacher-forced NLL of the new object (every token at its own position), optionally + a KL term
   on "{subject} is a" (not in the paper).

The paper gives no values for p, alpha, the learning rate or the step budget; the defaults below
are ours (chosen on SmolLM2's Eiffel Tower edit, not on benchmark results) and are recorded in
every edit. Attention modules (the paper's q/k/v/o in Sec. 4.3) are not offered: the attribution
here is per FFN neuron; an attention study needs a per-head attribution first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch

from kn_lens.edit.delta import Edit, WeightDelta, param_name
from kn_lens.edit.kn import _by_layer, _check_neurons
from kn_lens.edit.optimise import KL, NLL, OptimConfig, Target, kl_examples, optimise
from kn_lens.edit.requests import check_requests, essence_queries, rewrite_queries
from kn_lens.errors import ConfigError
from kn_lens.facts import EditRequest
from kn_lens.models import model_info
from kn_lens.neurons import NeuronSet, quantile, union

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class KNEConfig:
    quantile: float = 0.999  # eq. 6: t_p = Quantile_{1-p}; ours: the top 0.1 % (paper: no value)
    alpha: float = 1.0  # eq. 11's alpha (paper: no value)
    module: Literal["W_out", "W_in", "W_gate"] = "W_out"  # Sec. 4.3: the value layer is best
    attribute_to: Literal["old", "new"] = "old"  # eq. 4's y*: the fact being edited, or the target
    ig_steps: int = 20  # eq. 5's m
    lr: float = 1e-2  # Adam on dW (paper: no value; 5e-2 overshoots on SmolLM2, see README)
    steps: int = 25
    stop_prob: float | None = 0.9  # stop once P(new object) reaches this for every request
    kl_factor: float = 0.0  # optional KL on "{subject} is a" (not in the paper)

    def __post_init__(self) -> None:
        if not 0 <= self.quantile < 1:
            raise ConfigError(f"KNEConfig.quantile must be in [0, 1), got {self.quantile}")
        if not self.alpha > 0:
            raise ConfigError(f"KNEConfig.alpha must be > 0, got {self.alpha}")
        if self.module not in ("W_out", "W_in", "W_gate"):
            raise ConfigError(f"KNEConfig.module must be W_out, W_in or W_gate, not {self.module!r}")
        if self.attribute_to not in ("old", "new"):
            raise ConfigError(f"KNEConfig.attribute_to must be 'old' or 'new', not "
                              f"{self.attribute_to!r}")
        if not isinstance(self.ig_steps, int) or self.ig_steps < 1:
            raise ConfigError(f"KNEConfig.ig_steps must be a positive integer, got {self.ig_steps!r}")
        if self.steps < 0 or not self.lr > 0 or self.kl_factor < 0:
            raise ConfigError("KNEConfig: steps >= 0, lr > 0, kl_factor >= 0")
        if self.stop_prob is not None and not 0 < self.stop_prob <= 1:
            raise ConfigError(f"KNEConfig.stop_prob must be in (0, 1], got {self.stop_prob}")


def locate_ensemble(model: "HookedTransformer", requests: Sequence[EditRequest], *,
                    config: KNEConfig | None = None) -> NeuronSet:
    """Eq. 4-7 for each request (IG on its rewrite prompt), united over the requests."""
    from kn_lens.locate.integrated_gradients import IGConfig, integrated_gradients

    cfg = config or KNEConfig()
    sets = []
    for r in check_requests(model, requests):
        target = r.fact.object if cfg.attribute_to == "old" else r.new_object
        (q,) = rewrite_queries(model, r, target=target, all_prompts=False)
        scores = integrated_gradients(model, q, config=IGConfig(steps=cfg.ig_steps))
        sets.append(quantile(scores, cfg.quantile))
    return union(sets)


def kne(model: "HookedTransformer", requests: Sequence[EditRequest], *,
        config: KNEConfig | None = None, neurons: NeuronSet | None = None,
        generator: torch.Generator | None = None) -> Edit:
    """KNE as an :class:`Edit`: the ensemble's slices of ``module`` in every layer it spans,
    each layer's trained delta scaled by ``alpha / sqrt(n_layer)``."""
    cfg = config or KNEConfig()
    requests = check_requests(model, requests)
    if cfg.module == "W_gate" and not model.cfg.gated_mlp:
        raise ConfigError("KNE module W_gate: the model's MLP is not gated")
    if neurons is None:
        neurons = locate_ensemble(model, requests, config=cfg)
        if not len(neurons):
            raise ConfigError("KNE: the ensemble is empty (no attribution reaches the quantile "
                              "threshold); lower KNEConfig.quantile")
    neurons = neurons if isinstance(neurons, NeuronSet) else NeuronSet(neurons)
    _check_neurons(model, neurons)  # typed errors: empty, outside the model
    by_layer = _by_layer(neurons)
    targets = [Target.rows(layer, idx, cfg.module, scale=cfg.alpha / math.sqrt(len(idx)))
               for layer, idx in sorted(by_layer.items())]
    queries = [q for r in requests for q in rewrite_queries(model, r)]
    terms = [NLL(queries)]
    if cfg.kl_factor:
        terms.append(KL(kl_examples([q for r in requests for q in essence_queries(model, r)]),
                        weight=cfg.kl_factor))
    res = optimise(model, targets, terms, config=OptimConfig(
        steps=cfg.steps, lr=cfg.lr, stop_prob=cfg.stop_prob))
    dim = 0 if cfg.module == "W_out" else 1
    deltas = tuple(WeightDelta(param_name(t.block, cfg.module), dim, torch.tensor(t.index), v.cpu())
                   for t, v in zip(targets, res.values))
    desc = (f"KNE {len(neurons)} neurons ({cfg.module}) in {len(by_layer)} layers: " +
            "; ".join(f"{r.fact.subject} -> {r.new_object}" for r in requests[:3]))
    return Edit(deltas, desc, "kne", model_info(model),
                {"config": cfg, "neurons": neurons.to_list(),
                 "scales": {t.block: t.scale for t in targets}, "steps": res.steps,
                 "stopped": res.stopped, "final_loss": res.final_loss,
                 "final_min_p": res.history[-1].get("min_p") if res.history else None})

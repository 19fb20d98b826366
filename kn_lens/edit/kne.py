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
every edit.

Attention modules (Sec. 4.3's q/k/v/o_proj, ``module="W_Q" | "W_K" | "W_V" | "W_O"``): the unit is
one head's slice of the matrix (a kv head's for W_K / W_V under grouped-query attention).
Eq. 4 for that slice, ``w_bar . int dP/dw(alpha w_bar) d alpha``, is the integrated gradient of
a scalar gate on the slice; a gate on W_V or W_O scales the head's values / result ``z`` exactly
(a gate on W_Q / W_K scales its queries / keys, exact for bias-free projections, as SmolLM2's and
Gemma-3's), so :func:`head_attributions` integrates gates on ``hook_q / k / v / z`` at every
position. All heads of the kind, in every layer, move along one path (m right-Riemann points in
one batched forward / backward; completeness: the attributions sum to P(answer) minus its value
with that projection zeroed everywhere, up to the Riemann error). The ensemble is the heads at or
above ``head_quantile`` (ours: 0.95; there are only n_layers x n_heads units), each layer's
delta on those heads' slices scaled by alpha / sqrt(n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

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


MLP_MODULES = ("W_out", "W_in", "W_gate")
ATTN_MODULES = ("W_Q", "W_K", "W_V", "W_O")
_ATTN_HOOK = {"W_Q": "hook_q", "W_K": "hook_k", "W_V": "hook_v", "W_O": "hook_z"}
_ATTN_BIAS = {"W_Q": "b_Q", "W_K": "b_K", "W_V": "b_V"}  # W_O's gate scales z (no bias inside)


@dataclass(frozen=True, kw_only=True)
class KNEConfig:
    quantile: float = 0.999  # eq. 6: t_p = Quantile_{1-p}; ours: the top 0.1 % (paper: no value)
    alpha: float = 1.0  # eq. 11's alpha (paper: no value)
    module: Literal["W_out", "W_in", "W_gate", "W_Q", "W_K", "W_V", "W_O"] = "W_out"  # Sec. 4.3
    head_quantile: float = 0.95  # attention modules: the heads' t_p (ours; paper: no value)
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
        if self.module not in MLP_MODULES + ATTN_MODULES:
            raise ConfigError(f"KNEConfig.module must be one of {MLP_MODULES + ATTN_MODULES}, "
                              f"not {self.module!r}")
        if not 0 <= self.head_quantile < 1:
            raise ConfigError(f"KNEConfig.head_quantile must be in [0, 1), got "
                              f"{self.head_quantile}")
        if self.attribute_to not in ("old", "new"):
            raise ConfigError(f"KNEConfig.attribute_to must be 'old' or 'new', not "
                              f"{self.attribute_to!r}")
        if not isinstance(self.ig_steps, int) or self.ig_steps < 1:
            raise ConfigError(f"KNEConfig.ig_steps must be a positive integer, got {self.ig_steps!r}")
        if self.steps < 0 or not self.lr > 0 or self.kl_factor < 0:
            raise ConfigError("KNEConfig: steps >= 0, lr > 0, kl_factor >= 0")
        if self.stop_prob is not None and not 0 < self.stop_prob <= 1:
            raise ConfigError(f"KNEConfig.stop_prob must be in (0, 1], got {self.stop_prob}")


def n_heads_of(model: "HookedTransformer", module: str) -> int:
    """Units of an attention module per layer: query heads (W_Q, W_O) or kv heads (W_K, W_V)."""
    if module in ("W_K", "W_V"):
        return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    return int(model.cfg.n_heads)


def head_attributions(model: "HookedTransformer", query, module: str, *, steps: int = 20
                      ) -> Float[Tensor, "layer head"]:
    """Eq. 4-5 for every head's slice of ``module`` (W_Q / W_K / W_V / W_O) in every layer: the
    integrated gradient of sum_j P(a_j) (each answer token teacher-forced at its own position)
    along gates g = k/m (k = 1..m) on all heads' slices at once (see the module doc)."""
    from kn_lens.evaluate.scoring import logits_at

    if module not in ATTN_MODULES:
        raise ConfigError(f"head_attributions takes {ATTN_MODULES}, not {module!r}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    n_layers, n_units = model.cfg.n_layers, n_heads_of(model, module)
    alphas = torch.arange(1, steps + 1, dtype=torch.float32, device=model.cfg.device) / steps
    gates = (alphas[:, None, None] * torch.ones(steps, n_layers, n_units,
                                               device=model.cfg.device)).requires_grad_(True)
    name = _ATTN_HOOK[module]

    def gate(act: Tensor, hook, layer: int) -> Tensor:
        if act.shape[-2] != n_units:
            raise ConfigError(f"{hook.name} has {act.shape[-2]} heads, expected {n_units}")
        g = gates[:, layer][:, None, :, None].to(act.dtype)
        bias = _ATTN_BIAS.get(module)
        b = getattr(model.blocks[layer].attn, bias, None) if bias else None
        if b is None:
            return act * g
        b = b.detach()
        if b.shape[0] != n_units:  # GQA models may store the bias per query head
            b = b.reshape(n_units, -1, b.shape[-1])[:, 0]
        return b + g * (act - b)

    fwd = [(f"blocks.{l}.attn.{name}", lambda act, hook, l=l: gate(act, hook, l))
           for l in range(n_layers)]
    pos = list(query.answer_positions)
    ans = torch.tensor(list(query.answer_ids), device=model.cfg.device)
    with torch.enable_grad():  # logits at the answer positions only; grad to the gates alone
        logits = logits_at(model, [query.input_ids] * steps, [pos] * steps, fwd_hooks=fwd)
        probs = torch.softmax(torch.stack(logits).float(), -1)  # [steps, answer, d_vocab]
        objective = probs[:, torch.arange(len(pos), device=probs.device), ans].sum()
        (grad,) = torch.autograd.grad(objective, gates)
    return grad.mean(0).detach().cpu()  # (w_bar - 0) x mean gradient, per gate (w_bar = 1)


def locate_ensemble(model: "HookedTransformer", requests: Sequence[EditRequest], *,
                    config: KNEConfig | None = None) -> NeuronSet:
    """Eq. 4-7 for each request (IG on its rewrite prompt), united over the requests. For an
    attention module the set's ``index`` is a head (kv head for W_K / W_V)."""
    from kn_lens.locate.integrated_gradients import IGConfig, integrated_gradients

    cfg = config or KNEConfig()
    sets = []
    for r in check_requests(model, requests):
        target = r.fact.object if cfg.attribute_to == "old" else r.new_object
        (q,) = rewrite_queries(model, r, target=target, all_prompts=False)
        if cfg.module in ATTN_MODULES:
            scores = head_attributions(model, q, cfg.module, steps=cfg.ig_steps)
            sets.append(quantile(scores, cfg.head_quantile))
        else:
            scores = integrated_gradients(model, q, config=IGConfig(steps=cfg.ig_steps))
            sets.append(quantile(scores, cfg.quantile))
    return union(sets)


def _check_heads(model: "HookedTransformer", heads: NeuronSet, module: str) -> None:
    if not len(heads):
        raise ConfigError("KNE: no heads to edit")
    n = n_heads_of(model, module)
    bad = [h for h in heads if not (0 <= h.layer < model.cfg.n_layers and 0 <= h.index < n)]
    if bad:
        raise ConfigError(f"KNE {module}: heads outside the model's {model.cfg.n_layers} layers x "
                          f"{n} heads: {bad[:5]}")


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
    if cfg.module in ATTN_MODULES:
        _check_heads(model, neurons, cfg.module)
    else:
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
    dim = 1 if cfg.module in ("W_in", "W_gate") else 0  # W_out rows, head slices: dim 0
    deltas = tuple(WeightDelta(param_name(t.block, cfg.module), dim,
                               torch.tensor(t.index, device="cpu"), v.cpu())
                   for t, v in zip(targets, res.values))
    unit = "heads" if cfg.module in ATTN_MODULES else "neurons"
    desc = (f"KNE {len(neurons)} {unit} ({cfg.module}) in {len(by_layer)} layers: " +
            "; ".join(f"{r.fact.subject} -> {r.new_object}" for r in requests[:3]))
    return Edit(deltas, desc, "kne", model_info(model),
                {"config": cfg, "neurons": neurons.to_list(),
                 "scales": {t.block: t.scale for t in targets}, "steps": res.steps,
                 "stopped": res.stopped, "final_loss": res.final_loss,
                 "final_min_p": res.history[-1].get("min_p") if res.history else None})

"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"): a rank-one update
of one MLP's ``W_out`` that maps the subject's key k* to a new value v*.

1. **k*** = the mean, over the bare rewrite prompt and its random-prefix contexts (the request's
   seeded prefixes; ROME samples 20 from the model), of ``W_out``'s input (``hook_post``) at the
   subject's last token.
2. **v*** = W k* + b + delta, where delta is added to the layer's MLP output at the subject's last
   token in every context and optimised (Adam, lr 0.5, 20 steps, stop when the loss < 5e-2) for
   NLL of the new object (mean per-token, every token at its own position, mean over contexts)
   + 0.0625 KL(P_unedited || P_edited) of the next token at the subject's last token of
   "{subject} is a" (ROME's essence prompt and position) + 0.5 ||delta|| / ||v_0||^2 (v_0 the
   bare prompt's MLP output), with ||delta|| <= 4 ||v_0|| (ROME hparams for GPT-2 XL / GPT-J).
3. **C** = E[k k^T] of that layer's keys on local prose (:mod:`kn_lens.edit.baselines.stats`).
4. **Update**: dW = (C^-1 k*) (v* - W k* - b)^T / (k*^T C^-1 k*) = u delta^T with
   u = C^-1 k* / (k*^T C^-1 k*): the edited layer maps k* exactly to v* (tested to 1e-4), and
   because k* is the mean of the context keys, the update adds exactly delta *on average* over
   the contexts delta was trained in. ROME's released code divides by the bare prompt's key
   instead of k* (rome PR #44, "r-ROME"), which makes some edits blow up; this is the consistent
   form.

The delta is stored factorised (:class:`~kn_lens.edit.delta.LowRankDelta`). Several requests are
edited one after another, each computed with the previous ones applied, and composed (ROME is a
single-fact method; use MEMIT for batches). The layer defaults to the model's measured one
(:mod:`kn_lens.edit.layers`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens.edit.baselines import _keys
from kn_lens.edit.baselines.stats import DEFAULT_TOKENS, second_moment
from kn_lens.edit.delta import Edit, LowRankDelta, param_name
from kn_lens.edit.layers import rome_layer
from kn_lens.edit.optimise import KL, NLL, Example, OptimConfig, OptimResult, Target, optimise
from kn_lens.edit.requests import (check_layer, check_requests, context_prefixes, essence_queries,
                                   rewrite_queries, sites)
from kn_lens.errors import ConfigError, NumericalError
from kn_lens.facts import EditRequest
from kn_lens.models import model_info

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True, kw_only=True)
class ROMEConfig:
    layer: int | None = None  # None: the model's measured layer (kn_lens.edit.layers)
    v_steps: int = 20  # ROME hparams (GPT-2 XL, GPT-J): v_num_grad_steps 20
    v_lr: float = 0.5  # v_lr
    kl_factor: float = 0.0625  # kl_factor
    v_weight_decay: float = 0.5  # v_weight_decay (x ||delta|| / ||v_0||^2)
    clamp_norm_factor: float = 4.0  # ||delta|| <= 4 ||v_0||
    stop_loss: float = 5e-2  # compute_v.py: stop when the loss < 5e-2
    n_prefixes: int | None = None  # contexts besides the bare prompt (None: all of the request's)
    stats_tokens: int = DEFAULT_TOKENS  # tokens for C (ROME: 100,000 Wikipedia samples)
    ridge: float = 1e-6  # C + ridge * mean(diag C) * I before solving (numerical safety only)

    def __post_init__(self) -> None:
        if self.v_steps < 0 or not self.v_lr > 0 or self.kl_factor < 0 or self.v_weight_decay < 0:
            raise ConfigError("ROMEConfig: v_steps >= 0, v_lr > 0, kl_factor >= 0, "
                              "v_weight_decay >= 0")
        if not self.clamp_norm_factor > 0 or self.stats_tokens < 1 or self.ridge < 0:
            raise ConfigError("ROMEConfig: clamp_norm_factor > 0, stats_tokens >= 1, ridge >= 0")


@dataclass(frozen=True)
class ROMEComputation:
    """Everything one ROME edit computed (for inspection and tests)."""

    layer: int
    k_star: Float[Tensor, "d_mlp"]
    v_star: Float[Tensor, "d_model"]
    delta: Float[Tensor, "d_model"]
    v0_norm: float
    u: Float[Tensor, "d_mlp"]
    optim: OptimResult

    def low_rank(self) -> LowRankDelta:
        return LowRankDelta(param_name(self.layer, "W_out"), self.u, self.delta)


def solve_spd(C: Tensor, rhs: Tensor, ridge: float) -> Tensor:
    """(C + ridge * mean(diag C) I)^-1 rhs in float64."""
    C64 = C.double()
    if ridge:
        C64 = C64 + ridge * C64.diagonal().mean() * torch.eye(C64.shape[0], dtype=torch.float64,
                                                               device=C64.device)
    return torch.linalg.solve(C64, rhs.double().to(C64.device))


def compute_rome(model: "HookedTransformer", request: EditRequest, *, config: ROMEConfig,
                 layer: int, C: Float[Tensor, "d_mlp d_mlp"]) -> ROMEComputation:
    """One ROME edit on the model as it is now (see the module doc)."""
    contexts = context_prefixes(request, config.n_prefixes)
    rq = rewrite_queries(model, request, prefixes=contexts, all_prompts=False)
    rs = sites(model, rq)
    eq = essence_queries(model, request)
    es = sites(model, eq)
    k = _keys.keys(model, rq, rs, layer)
    k_star = k.mean(0)
    v0 = _keys.mlp_output(model, k[:1], layer)[0]
    target = Target.activation(layer, "mlp_out", norm_ref=[float(v0.norm())])
    terms = [NLL(rq, sites=rs),
             KL([Example(tuple(q.prompt_ids), (s,), 0, s) for q, s in zip(eq, es)],
                weight=config.kl_factor)]
    res = optimise(model, [target], terms, config=OptimConfig(
        steps=config.v_steps, lr=config.v_lr, norm_decay=config.v_weight_decay,
        max_norm=config.clamp_norm_factor, stop_loss=config.stop_loss))
    delta = res.values[0][0].float().cpu()
    cinv_k = solve_spd(C, k_star, config.ridge)
    denom = float(k_star.double() @ cinv_k)
    if not denom > 0:
        raise NumericalError(f"ROME: k*^T C^-1 k* = {denom} is not positive (degenerate key)")
    u = (cinv_k / denom).float()
    v_star = _keys.mlp_output(model, k_star[None], layer)[0] + delta
    return ROMEComputation(layer, k_star, v_star, delta, float(v0.norm()), u, res)


def rome(model: "HookedTransformer", requests: Sequence[EditRequest], *,
         config: ROMEConfig | None = None, neurons=None,
         generator: torch.Generator | None = None) -> Edit:
    """ROME as an :class:`Edit` (a rank-one ``W_out`` delta per request, composed in order)."""
    cfg = config or ROMEConfig()
    requests = check_requests(model, requests)
    if neurons is not None:
        raise ConfigError("ROME edits a whole MLP matrix; it takes no neuron set")
    layer = check_layer(model, cfg.layer if cfg.layer is not None else rome_layer(model))
    C = second_moment(model, layer, n_tokens=cfg.stats_tokens)
    total = Edit((), model=model_info(model))
    details = []
    for req in requests:
        with total.applied(model):  # sequential: each request sees the previous edits
            comp = compute_rome(model, req, config=cfg, layer=layer, C=C)
        total = Edit(total.deltas + (comp.low_rank(),), model=model_info(model))
        details.append({"subject": req.fact.subject, "new_object": req.new_object,
                        "steps": comp.optim.steps, "stopped": comp.optim.stopped,
                        "final_loss": comp.optim.final_loss, "delta_norm": float(comp.delta.norm()),
                        "v0_norm": comp.v0_norm})
    desc = (f"ROME layer {layer}: " + "; ".join(f"{r.fact.subject} -> {r.new_object}"
                                                for r in requests[:3])
            + ("" if len(requests) <= 3 else f" (+{len(requests) - 3})"))
    return Edit(total.deltas, desc, "rome", model_info(model),
                {"layer": layer, "config": cfg, "requests": details})

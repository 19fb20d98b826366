"""FT-L (constrained fine-tuning, Zhu et al. 2020, as the ROME paper's baseline): fine-tune one
layer's MLP output matrix ``W_out`` on the edit with every entry kept within an L-infinity ball of
radius ``norm_constraint`` around the original weights (ROME's ``ft/*_constr.json``: 25 steps,
Adam lr 5e-4, epsilon 5e-4 for GPT-2 XL and 5e-5 for GPT-J, the clamp applied after every step).

The loss is the teacher-forced NLL of the new object with every target token scored at its own
position. ROME's ``ft_main.py`` scores all target tokens from the logits at the *last prompt
position* (rome#41, EasyEdit#173), which is not teacher forcing; kn-lens does not reproduce that.
ROME's hparams edit layer 0 (GPT-2 XL / GPT-J); kn-lens defaults to the same layer as ROME for the
model (a like-for-like comparison of "which weights"), and the radius was raised until the
Eiffel Tower edit succeeds on SmolLM2 (see README: at 5e-4 it does not). The bias is not edited.
Several requests are fine-tuned jointly (one loss over all of them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from kn_lens.edit.delta import Edit, WeightDelta, param_name
from kn_lens.edit.layers import ft_layer
from kn_lens.edit.optimise import KL, NLL, OptimConfig, Target, kl_examples, optimise
from kn_lens.edit.requests import (check_layer, check_requests, context_prefixes, essence_queries,
                                   rewrite_queries)
from kn_lens.errors import ConfigError
from kn_lens.facts import EditRequest
from kn_lens.models import model_info

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True, kw_only=True)
class FTLConfig:
    layer: int | None = None  # None: the model's ROME layer (ROME's FT-L hparams: layer 0)
    steps: int = 25  # ROME FT-L: num_steps 25
    lr: float = 5e-4  # lr 5e-4
    norm_constraint: float = 5e-3  # L-inf radius; ROME: 5e-4 (GPT-2 XL), 5e-5 (GPT-J); see module
    n_prefixes: int = 0  # random-prefix contexts added to the training prompts (ROME's FT-L: 0)
    kl_factor: float = 0.0  # optional KL on "{subject} is a" (ROME's FT-L: none)
    stop_loss: float | None = 1e-2  # stop once the mean NLL is this low

    def __post_init__(self) -> None:
        if self.steps < 0 or not self.lr > 0 or not self.norm_constraint > 0:
            raise ConfigError("FTLConfig: steps >= 0, lr > 0, norm_constraint > 0")
        if self.n_prefixes < 0 or self.kl_factor < 0:
            raise ConfigError("FTLConfig: n_prefixes >= 0, kl_factor >= 0")


def ft_l(model: "HookedTransformer", requests: Sequence[EditRequest], *,
         config: FTLConfig | None = None, neurons=None,
         generator: torch.Generator | None = None) -> Edit:
    """FT-L as an :class:`Edit`: a dense delta on one layer's W_out."""
    cfg = config or FTLConfig()
    requests = check_requests(model, requests)
    if neurons is not None:
        raise ConfigError("FT-L fine-tunes a whole matrix; it takes no neuron set")
    layer = check_layer(model, cfg.layer if cfg.layer is not None else ft_layer(model))
    queries = [q for r in requests
               for q in rewrite_queries(model, r, prefixes=context_prefixes(r, cfg.n_prefixes))]
    terms = [NLL(queries)]
    if cfg.kl_factor:
        terms.append(KL(kl_examples([q for r in requests for q in essence_queries(model, r)]),
                        weight=cfg.kl_factor))
    target = Target.matrix(layer, "W_out")
    res = optimise(model, [target], terms, config=OptimConfig(
        steps=cfg.steps, lr=cfg.lr, linf=cfg.norm_constraint, stop_loss=cfg.stop_loss))
    values = res.values[0].cpu()
    delta = WeightDelta(param_name(layer, "W_out"), 0, torch.arange(values.shape[0], device="cpu"),
                        values)
    desc = (f"FT-L layer {layer} (L-inf {cfg.norm_constraint:g}): " +
            "; ".join(f"{r.fact.subject} -> {r.new_object}" for r in requests[:3]))
    return Edit((delta,), desc, "ft_l", model_info(model),
                {"layer": layer, "config": cfg, "steps": res.steps, "stopped": res.stopped,
                 "final_loss": res.final_loss})

"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): many facts at once, the
update spread over a range of MLP layers R = (l_1 .. l_L).

1. **z_i** for each request: the residual stream after block l_L at the subject's last token,
   z_i = h_i + delta_i, with delta_i optimised as ROME's v* (NLL of the new object over the bare
   prompt and its prefixed contexts + 0.0625 KL on "{subject} is a" + 0.5 ||delta|| / ||h||^2,
   ||delta|| <= 0.75 ||h||, Adam lr 0.5, 25 steps; MEMIT hparams for GPT-J). Requests are
   optimised in chunks of ``z_batch`` as independent groups of one batch (each request's loss
   depends on its own delta only, and Adam's updates are per coordinate, so this is the
   sequential computation up to the shared stopping test).
2. For each layer l in R, in order, with the updates of the earlier layers applied: keys K (the
   mean over the contexts of W_out's input at the subject's last token, one column per request),
   the residual still missing at l_L, R = (Z - H_current) / (number of layers left), and
   dW_l = (lambda C_l + K K^T)^-1 K R^T, stored as a rank-n factorised delta. C_l = E[k k^T] on
   local prose (:mod:`kn_lens.edit.baselines.stats`). Blocks with a norm after the MLP (Gemma)
   get R pulled back through that norm first (:func:`raw_output_change`); MEMIT's derivation
   assumes the MLP output is added to the residual as is.

``lambda`` (``mom2_update_weight``): MEMIT uses 15,000 for GPT-J (d_mlp = 16,384). Since
k^T C^-1 k averages d_mlp for keys like C's samples, the balance between the edit and the
preservation term depends on lambda / d_mlp; the default keeps GPT-J's ratio (lambda = 0.9155 x
d_mlp, 1,406 for SmolLM2's 1,536). Layers default to the model's measured range
(:mod:`kn_lens.edit.layers`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from kn_lens import hooks as H
from kn_lens.backend import has_post_norms, norm_weight
from kn_lens.edit.baselines import _keys
from kn_lens.edit.baselines.rome import solve_spd
from kn_lens.edit.baselines.stats import DEFAULT_TOKENS, second_moments
from kn_lens.edit.delta import Edit, LowRankDelta, param_name
from kn_lens.edit.layers import memit_layers
from kn_lens.edit.optimise import KL, NLL, Example, OptimConfig, Target, optimise
from kn_lens.edit.requests import (check_layer, check_requests, context_prefixes, essence_queries,
                                   rewrite_queries, sites)
from kn_lens.errors import ConfigError
from kn_lens.facts import EditRequest
from kn_lens.models import model_info

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

GPTJ_LAMBDA_PER_DIM = 15000 / 16384  # MEMIT GPT-J: mom2_update_weight 15000, d_mlp 16384


@dataclass(frozen=True, kw_only=True)
class MEMITConfig:
    layers: tuple[int, ...] | None = None  # None: the model's measured range
    mom2_update_weight: float | None = None  # lambda; None: 0.9155 x d_mlp (GPT-J's ratio)
    v_steps: int = 25  # MEMIT GPT-J hparams: v_num_grad_steps 25
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    stop_loss: float = 5e-2  # per request
    n_prefixes: int | None = None  # contexts besides the bare prompt (MEMIT: 5 + the bare one)
    z_batch: int = 8  # requests whose z are optimised in one batch
    stats_tokens: int = DEFAULT_TOKENS
    ridge: float = 1e-6

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or list(self.layers) != sorted(set(self.layers)):
                raise ConfigError(f"MEMIT layers must be a non-empty increasing tuple, got "
                                  f"{self.layers}")
        if self.mom2_update_weight is not None and not self.mom2_update_weight > 0:
            raise ConfigError("mom2_update_weight must be > 0")
        if self.v_steps < 0 or not self.v_lr > 0 or self.z_batch < 1 or self.stats_tokens < 1:
            raise ConfigError("MEMITConfig: v_steps >= 0, v_lr > 0, z_batch >= 1, stats_tokens >= 1")


def _request_queries(model, req: EditRequest, n_prefixes):
    rq = rewrite_queries(model, req, prefixes=context_prefixes(req, n_prefixes), all_prompts=False)
    eq = essence_queries(model, req)
    return rq, sites(model, rq), eq, sites(model, eq)


def compute_z(model: "HookedTransformer", requests: Sequence[EditRequest], *, config: MEMITConfig,
              layer: int) -> tuple[Tensor, Tensor, list[dict]]:
    """Target residuals Z [n, d_model] after block ``layer`` (and the unedited H) per request."""
    name = H.resid_post(layer)
    zs, hs, info = [], [], []
    for s in range(0, len(requests), config.z_batch):
        chunk = requests[s:s + config.z_batch]
        built = [_request_queries(model, r, config.n_prefixes) for r in chunk]
        h0 = _keys.at_sites(model, [b[0][0] for b in built], [b[1][0] for b in built], [name])[name]
        n = len(chunk)
        nll_q, nll_g, nll_s, kl_ex = [], [], [], []
        for g, (rq, rs, eq, es) in enumerate(built):
            nll_q += rq
            nll_g += [g] * len(rq)
            nll_s += rs
            kl_ex += [Example(tuple(q.prompt_ids), (p,), g, p) for q, p in zip(eq, es)]
        target = Target.activation(layer, "resid_post", n_groups=n,
                                   norm_ref=[float(x) for x in h0.norm(dim=-1)])
        # NLL and KL are means over the chunk: weighting by n makes the total the sum of the
        # requests' own losses (so each delta sees the gradient it would see alone).
        terms = [NLL(nll_q, groups=nll_g, sites=nll_s, weight=n),
                 KL(kl_ex, weight=config.kl_factor * n)]
        res = optimise(model, [target], terms, config=OptimConfig(
            steps=config.v_steps, lr=config.v_lr, norm_decay=config.v_weight_decay,
            max_norm=config.clamp_norm_factor, stop_loss=config.stop_loss * n))
        delta = res.values[0].float().cpu()
        zs.append(h0 + delta)
        hs.append(h0)
        info += [{"subject": r.fact.subject, "new_object": r.new_object,
                  "delta_norm": float(d.norm()), "h_norm": float(h.norm()), "steps": res.steps,
                  "stopped": res.stopped, "final_loss": res.final_loss}
                 for r, d, h in zip(chunk, delta, h0)]
    return torch.cat(zs), torch.cat(hs), info


def raw_output_change(model: "HookedTransformer", layer: int, m: Tensor, R: Tensor) -> Tensor:
    """For blocks that normalise the MLP's output before adding it (Gemma's ``ln2_post``: the
    residual receives w * m / rms(m)), the change of the raw output m that moves the normalised
    output by ``R`` as far as a normalised vector can: the target t = post(m) + R is pulled back
    through the norm (m' = t / w, rescaled to m's rms, which the norm ignores), so
    post(m') = t / rms(t / w), the nearest output the norm can produce. Without this MEMIT would
    add its residual-space R to the raw output, which the norm then rescales and rotates."""
    norm = model.blocks[layer].ln2_post
    w = norm_weight(model, norm).detach().float().cpu()
    w = torch.where(w.abs() < 1e-6, torch.full_like(w, 1e-6), w)
    eps = float(getattr(norm, "eps", 1e-6))

    def rms(x):
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    t = m / rms(m) * w + R
    u = t / w
    return u / rms(u) * rms(m) - m


def memit(model: "HookedTransformer", requests: Sequence[EditRequest], *,
          config: MEMITConfig | None = None, neurons=None,
          generator: torch.Generator | None = None) -> Edit:
    """MEMIT as an :class:`Edit`: one factorised delta per layer of the range."""
    cfg = config or MEMITConfig()
    requests = check_requests(model, requests)
    if neurons is not None:
        raise ConfigError("MEMIT edits whole MLP matrices; it takes no neuron set")
    layers = cfg.layers if cfg.layers is not None else memit_layers(model)
    for layer in layers:
        check_layer(model, layer, "MEMIT layer")
    lam = cfg.mom2_update_weight if cfg.mom2_update_weight is not None else \
        GPTJ_LAMBDA_PER_DIM * model.cfg.d_mlp
    Cs = second_moments(model, layers, n_tokens=cfg.stats_tokens)
    last = layers[-1]
    Z, H0, info = compute_z(model, requests, config=cfg, layer=last)
    built = [_request_queries(model, r, cfg.n_prefixes) for r in requests]
    ctx_q = [q for b in built for q in b[0]]
    ctx_s = [p for b in built for p in b[1]]
    owner = torch.tensor([i for i, b in enumerate(built) for _ in b[0]], device="cpu")
    bare_q = [b[0][0] for b in built]
    bare_s = [b[1][0] for b in built]
    deltas: list[LowRankDelta] = []
    spread = []
    for i, layer in enumerate(layers):
        with Edit(tuple(deltas)).applied(model, strict=False):
            k_all = _keys.keys(model, ctx_q, ctx_s, layer)
            hz = _keys.at_sites(model, bare_q, bare_s, [H.resid_post(last)])[H.resid_post(last)]
        K = torch.zeros(len(requests), k_all.shape[1], device="cpu").index_add_(0, owner, k_all)
        K = K / torch.bincount(owner, minlength=len(requests))[:, None].float()  # mean over contexts
        R = (Z - hz) / (len(layers) - i)
        if has_post_norms(model):
            R = raw_output_change(model, layer, _keys.mlp_output(model, K, layer), R)
        A = lam * Cs[layer].double() + K.double().T @ K.double()
        U = solve_spd(A.float(), K.T, cfg.ridge).float()  # [d_mlp, n]
        deltas.append(LowRankDelta(param_name(layer, "W_out"), U, R.T.contiguous()))
        spread.append({"layer": layer, "residual_norm": float((Z - hz).norm(dim=-1).mean())})
    desc = (f"MEMIT layers {layers[0]}-{layers[-1]}: {len(requests)} request(s)" +
            (f" ({requests[0].fact.subject} -> {requests[0].new_object}"
             f"{', ...' if len(requests) > 1 else ''})"))
    return Edit(tuple(deltas), desc, "memit", model_info(model),
                {"layers": list(layers), "lambda": lam, "config": cfg, "requests": info,
                 "spread": spread})

"""Neuron-level causal mediation (TNF-DA) with DNI pruning, and attribution patching (AtP).

Three runs per fact (TNF-DA, "Analysis of the Relationship Between Neurons and Knowledge", after
Vig et al. 2020 and ROME's causal tracing, Meng et al. 2022):

- clean run: the prompt as is; record every neuron's activation h (``blocks.{l}.mlp.hook_post``,
  for gated MLPs act(gate) * up, the vector W_out reads);
- corrupted run: Gaussian noise eps ~ N(0, nu^2) added to the input embeddings (``hook_embed``);
  record P*(o) and the corrupted activations h*;
- corrupted-with-restoration run: the corrupted run with ONE neuron put back to its clean value.
  Its indirect effect is ``IE = P*_{clean h_i}(o) - P*(o)`` (TNF-DA), averaged over noise samples.

P(o) is the probability of the whole answer, teacher-forced (product over answer tokens).

DNI pruning (TNF-DA eq. 6-7): ``DNI = |h - h*| / |h|`` measures how much the noise moved a neuron;
only the neurons in the top gamma % of DNI are searched (restored one by one); the others get
score 0. The searched mask is in ``scores.extras["searched"]``.

**Which tokens are corrupted** (``corrupt``):

- ``"subject"`` (default): noise on the subject's tokens only, as ROME's causal tracing does. The
  relation words and the prompt's format stay clean, so the corrupted run still "knows" it must
  name e.g. a city but no longer knows which subject it is about; restoring a neuron then
  measures how much of the *fact-specific* information it carries. This is the sounder choice for
  locating the neurons of one fact.
- ``"all"``: noise on every prompt token (TNF-DA's literal wording: "the whole prompt is
  obscured"). This also destroys the relation, so the effects mix fact-specific neurons with
  neurons that merely process the relation or the prompt's format.

In both cases BOS (when the model uses one) and the teacher-forced answer tokens are never
corrupted. The subject's tokens are found from the query's template (``{}``), or by searching
``fact.subject`` in the prompt; a query without an identifiable subject corrupts the whole prompt.
The noise scale nu defaults to 3 x the standard deviation of the embedding matrix W_E (ROME uses
3 x the std of the subject tokens' embeddings; the matrix-wide std needs no data set).

**Where a neuron is restored** (``restore_positions``):

- ``"last"`` (default): at the answer-predicting position only (the prompt's last token,
  ``query.last_position``), where KN / IG (Dai et al.) also score neurons. Every earlier
  position is left corrupted and unchanged, which lets the fast implementation recompute only
  the positions from there on (see below).
- ``"all"``: at every position of the input (prompt and teacher-forced answer tokens).

**Exact and fast.** Restoring neuron i of layer l changes nothing before layer l's MLP, and with
``"last"`` nothing at the positions before ``last_position`` anywhere in the network. So the
corrupted run is computed once, with its residual stream and its attention keys/values cached;
each restoration restarts at block l on the positions from the first restored position on
(one position for a single-token answer), attending to the cached keys/values of the earlier
positions (TransformerLens' own key/value cache entries, so rotary offsets and grouped-query
attention are handled as in generation), with many neurons of one layer in one batch (batch
dim = neurons). Only the answer positions are unembedded (with the full softmax normaliser).
For the blocks :func:`kn_lens._fast.prefix_block` covers (pre-norm GPT-2, LLaMA/SmolLM2,
Gemma-3 with its extra norms, q/k norms and sliding windows, parallel GPT-NeoX blocks) the
suffix attention is computed there, with the shared prefix keys/values used once for the whole
batch instead of being copied, rotated and repeated per batch item; any other architecture runs
TransformerLens' own blocks with a frozen key/value cache. Both equal one full hooked forward pass
per neuron (:func:`causal_mediation_plain`, the reference, used by the tests) up to float rounding
(~1e-6 relative); ``chunk`` bounds memory and never changes the result. A TransformerBridge has
no block calls or key/value cache: there each batch of restorations is one whole hooked forward
(``extras["implementation"] == "full_forward"``), the same numbers at more compute. On
SmolLM2-135M with
gamma = 20 % (9,216 neurons) the cost is ~30 s of CPU time per noise sample on one core.

Note what the scores are: the effect of *restoring* a neuron in the corrupted run. A neuron can
carry much of the clean signal that the noise destroyed (high IE) while the clean run, which has
other routes to the answer, barely notices when it is zeroed: IE is not an ablation effect.

**Attribution patching** (:func:`attribution_patching`) estimates every neuron's IE to first order
from one corrupted forward+backward per noise sample:
``IE_i ~= sum_{restored positions} (h_i - h*_i) * dP(o)/dh_i`` (gradient on the corrupted run),
with the same noise samples (same seed) and position options as the exact method.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kn_lens import _fast, hooks
from kn_lens.backend import embedding_matrix, is_bridge
from kn_lens.errors import ConfigError, InvalidFactError, NumericalError
from kn_lens.facts import Query, answer_logprobs, n_bos_tokens as _n_bos, subject_positions
from kn_lens.models import model_info
from kn_lens.neurons import NeuronScores

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Corrupt = Literal["subject", "all"]
RestorePositions = Literal["last", "all"]
Prune = Literal["dni", "atp", "none"]


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True, kw_only=True)
class MediationConfig:
    """Exact neuron-level causal mediation (TNF-DA) with DNI pruning."""

    n_noise: int = 3  # noise samples averaged (ROME averages 10 per state; a few suffice per neuron)
    noise_multiplier: float = 3.0  # nu = 3 x std(W_E) (ROME causal tracing: 3 x embedding std)
    noise_scale: float | None = None  # absolute nu; overrides noise_multiplier when given
    corrupt: Corrupt = "subject"  # ROME corrupts the subject; TNF-DA the whole prompt ("all")
    restore_positions: RestorePositions = "last"  # answer-predicting position (as KN/IG score)
    gamma: float = 20.0  # TNF-DA eq. 7: search only the top gamma % of neurons (by ``prune``)
    # How the search space is pruned: "dni" = TNF-DA eq. 6-7, |h - h*| / |h|; "atp" = the top
    # gamma % by |attribution-patching estimate| (same noise); "none" = every neuron.
    # Measured on SmolLM2: DNI favours neurons with small clean activations and drops most of the
    # neurons that carry the fact (32 of the top-46 by AtP for the Eiffel Tower), see README.
    prune: Prune = "dni"
    seed: int = 0  # seeds the torch.Generator the noise samples are drawn from
    # neurons per batched restoration; bounds memory, never changes the result (not identity)
    chunk: int = field(default=512, compare=False)
    dni_eps: float = 1e-8  # floor on |h| in DNI = |h - h*| / |h| (TNF-DA eq. 6)

    def __post_init__(self) -> None:
        _check_noise_fields(self)
        if not (0 < self.gamma <= 100) or not math.isfinite(self.gamma):
            raise ConfigError(f"gamma must be a percentage in (0, 100], got {self.gamma}")
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {self.chunk}")
        if not self.dni_eps > 0:
            raise ConfigError(f"dni_eps must be > 0, got {self.dni_eps}")
        if self.prune not in ("dni", "atp", "none"):
            raise ConfigError(f"prune must be 'dni', 'atp' or 'none', got {self.prune!r}")


@dataclass(frozen=True, kw_only=True)
class AtPConfig:
    """Attribution patching: first-order estimate of the mediation IE of every neuron."""

    n_noise: int = 3  # same meaning (and, with the same seed, the same noise) as MediationConfig
    noise_multiplier: float = 3.0  # nu = 3 x std(W_E) (ROME causal tracing)
    noise_scale: float | None = None
    corrupt: Corrupt = "subject"
    restore_positions: RestorePositions = "last"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_noise_fields(self)


def _check_noise_fields(cfg) -> None:
    if not isinstance(cfg.n_noise, int) or cfg.n_noise < 1:
        raise ConfigError(f"n_noise must be an integer >= 1, got {cfg.n_noise!r}")
    if not (cfg.noise_multiplier >= 0) or not math.isfinite(cfg.noise_multiplier):
        raise ConfigError(f"noise_multiplier must be finite and >= 0, got {cfg.noise_multiplier}")
    if cfg.noise_scale is not None and (not cfg.noise_scale >= 0 or not math.isfinite(cfg.noise_scale)):
        raise ConfigError(f"noise_scale must be finite and >= 0 (or None), got {cfg.noise_scale}")
    if cfg.corrupt not in ("subject", "all"):
        raise ConfigError(f"corrupt must be 'subject' or 'all', not {cfg.corrupt!r}")
    if cfg.restore_positions not in ("last", "all"):
        raise ConfigError(f"restore_positions must be 'last' or 'all', not {cfg.restore_positions!r}")


# --------------------------------------------------------------------------- positions and noise


def corrupted_positions(model: "HookedTransformer", query: Query, corrupt: Corrupt) -> tuple[int, ...]:
    """Input positions that receive noise: the subject's tokens, or every prompt token (no BOS)."""
    if corrupt == "all":
        return tuple(range(_n_bos(model, query), query.n_prompt))
    return subject_positions(model, query)


def restored_positions(query: Query, restore: RestorePositions) -> tuple[int, ...]:
    if restore == "last":
        return (query.last_position,)
    return tuple(range(len(query.input_ids)))


def embedding_noise_scale(model: "HookedTransformer", cfg) -> float:
    """nu: ``cfg.noise_scale`` or ``cfg.noise_multiplier`` x std of W_E (ROME: 3 x std)."""
    if cfg.noise_scale is not None:
        return float(cfg.noise_scale)
    return float(cfg.noise_multiplier) * float(embedding_matrix(model).detach().float().std())


def noise_samples(model: "HookedTransformer", query: Query, cfg
                  ) -> tuple[Float[Tensor, "noise pos d_model"], tuple[int, ...], float]:
    """The ``cfg.n_noise`` additive noise tensors for the input embeddings (zero outside the
    corrupted positions), drawn from a ``torch.Generator`` seeded with ``cfg.seed``."""
    pos = corrupted_positions(model, query, cfg.corrupt)
    nu = embedding_noise_scale(model, cfg)
    gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    # drawn on the CPU, then moved: the same seed gives the same noise on every device
    draws = torch.randn(cfg.n_noise, len(pos), model.cfg.d_model, generator=gen,
                        dtype=torch.float32, device="cpu")
    full = torch.zeros(cfg.n_noise, len(query.input_ids), model.cfg.d_model, device="cpu")
    full[:, list(pos)] = draws * nu
    return full.to(model.cfg.device, model.cfg.dtype), pos, nu


# --------------------------------------------------------------------------- model pieces


def _check_model(model) -> None:
    if model.cfg.positional_embedding_type == "shortformer":
        raise ConfigError("causal mediation does not support shortformer positional embeddings")


def _answer_logprob(model, resid_final: Float[Tensor, "batch answer d_model"],
                    answer_ids: Tensor) -> Float[Tensor, "batch"]:
    """log P(answer) from the final residual stream at the answer-predicting positions."""
    from transformer_lens.utils import apply_softcap

    x = model.ln_final(resid_final) if model.cfg.normalization_type is not None else resid_final
    logits = apply_softcap(torch.nn.functional.linear(x, model.W_U.T, model.b_U), model.cfg.output_logits_soft_cap)
    logits = logits.float()
    idx = answer_ids.to(logits.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)
    picked = logits.gather(-1, idx).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)).sum(-1)


def _new_entry(model, past_keys=None, past_values=None, frozen=False):
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    if past_keys is None:
        return TransformerLensKeyValueCacheEntry.init_cache_entry(model.cfg, model.cfg.device, 1)
    return TransformerLensKeyValueCacheEntry(past_keys, past_values, frozen=frozen)


def _tokens(model, query: Query) -> Tensor:
    return query.tokens(model.cfg.device)


@dataclass
class _Run:
    """One run's state: neurons at every position, the residual stream entering each block, the
    keys/values each attention layer computed, log P(answer)."""

    post: Float[Tensor, "layer pos d_mlp"]
    resid_pre: Float[Tensor, "layer pos d_model"] | None  # None: restorations rerun everything
    keys: list[Tensor] | None
    values: list[Tensor] | None
    logprob: float
    noise: Tensor | None = None  # the run's embedding noise (for full-forward restorations)


@torch.inference_mode()
def _cached_run(model, query: Query, noise: Tensor | None) -> _Run:
    """A forward pass block by block (as generation with an empty KV cache does), recording the
    residual stream before each block, the keys/values and every neuron's activation. On a
    TransformerBridge (no block-by-block calls) one hooked forward records the activations only,
    and restorations rerun the whole forward (:func:`_restored_logprobs_full`)."""
    toks = _tokens(model, query)
    if is_bridge(model):
        store: dict = {}
        fwd = [h for layer in range(model.cfg.n_layers)
               for h in hooks.cache_hook(hooks.mlp_post(layer), store)]
        with model.hooks(fwd_hooks=fwd + ([] if noise is None else _noise_hooks(noise))):
            logits = model(toks)
        lp = _answer_logprob_from_full(logits, query,
                                       torch.tensor(query.answer_ids, device=logits.device))
        post = torch.stack([store[hooks.mlp_post(layer)][0] for layer in range(model.cfg.n_layers)])
        return _Run(post, None, None, None, float(lp), noise)
    embed = model.hook_embed(model.embed(toks))
    if noise is not None:
        embed = embed + noise[None]
    resid = model.get_residual(embed, 0, tokens=toks, return_shortformer_pos_embed=False)
    store: dict = {}
    fwd = [h for layer in range(model.cfg.n_layers) for h in hooks.cache_hook(hooks.mlp_post(layer), store)]
    entries = [_new_entry(model) for _ in range(model.cfg.n_layers)]
    pres = []
    with model.hooks(fwd_hooks=fwd):
        for i, block in enumerate(model.blocks):
            pres.append(resid[0])
            resid = block(resid, past_kv_cache_entry=entries[i])
    ans = torch.tensor(query.answer_ids, device=resid.device)
    lp = _answer_logprob(model, resid[:, list(query.answer_positions)], ans)
    post = torch.stack([store[hooks.mlp_post(layer)][0] for layer in range(model.cfg.n_layers)])
    return _Run(post, torch.stack(pres), [e.past_keys for e in entries],
                [e.past_values for e in entries], float(lp[0]))


# Set to False to always use TransformerLens' own blocks with a frozen key/value cache (slower:
# every batch item copies, rotates and repeats the shared prefix keys); tests compare both.
_USE_SHARED_PREFIX_ATTENTION = True


def _shared_prefix_ok(model) -> bool:
    """Whether the restorations run :func:`kn_lens._fast.prefix_block` (the shared prefix keys /
    values used once for the whole batch) rather than TransformerLens' blocks with a frozen
    key/value cache: the architecture is covered (:func:`kn_lens._fast.prefix_block_ok`)."""
    return _USE_SHARED_PREFIX_ATTENTION and _fast.prefix_block_ok(model)


@torch.inference_mode()
def _restored_logprobs(model, query: Query, run: _Run, clean_post: Tensor, layer: int,
                       idx: Tensor, restore: tuple[int, ...]) -> Float[Tensor, "batch"]:
    """log P(answer) with neuron ``idx[b]`` of ``layer`` restored (batch item b), recomputing
    blocks ``layer..`` on the positions from the first restored one on only."""
    if run.resid_pre is None:
        return _restored_logprobs_full(model, query, run, clean_post, layer, idx, restore)
    p0 = min(restore)
    n = len(query.input_ids)
    b = idx.numel()
    dev = model.cfg.device
    resid = run.resid_pre[layer, p0:].unsqueeze(0).expand(b, -1, -1).contiguous()
    with model.hooks(fwd_hooks=[_restore_hook(model, clean_post, layer, idx, restore, p0)]):
        if _shared_prefix_ok(model):
            for i in range(layer, model.cfg.n_layers):
                block = model.blocks[i]
                resid = _fast.prefix_block(
                    block, resid, _fast.relative_prefix_keys(block.attn, run.keys[i][0, :p0]),
                    run.values[i][0, :p0])
        else:
            entries = []
            for i in range(layer, model.cfg.n_layers):
                if p0 == 0:
                    entries.append(None)
                else:
                    k = run.keys[i][:, :p0].expand(b, -1, -1, -1)
                    v = run.values[i][:, :p0].expand(b, -1, -1, -1)
                    entries.append(_new_entry(model, k, v, frozen=True))
            for j, i in enumerate(range(layer, model.cfg.n_layers)):
                resid = model.blocks[i](resid, past_kv_cache_entry=entries[j])
    ans_rel = [p - p0 for p in query.answer_positions]
    assert min(ans_rel) >= 0 and max(ans_rel) < n - p0
    return _answer_logprob(model, resid[:, ans_rel], torch.tensor(query.answer_ids, device=dev))


def _restore_hook(model, clean_post: Tensor, layer: int, idx: Tensor, restore: tuple[int, ...],
                  p0: int) -> tuple[str, object]:
    """The hook on ``layer``'s ``mlp_post`` that sets neuron ``idx[b]`` of batch row ``b`` to its
    clean value at the ``restore`` positions (the activation's positions start at ``p0``)."""
    dev = model.cfg.device
    rel = torch.tensor([p - p0 for p in restore], device=dev)
    vals = clean_post[layer][list(restore)][:, idx.to(dev)].T  # [b, r]
    bidx = torch.arange(idx.numel(), device=dev)[:, None]
    cols = idx.to(dev)[:, None]

    def restore_fn(act: Tensor, hook) -> Tensor:
        act = act.clone()
        act[bidx, rel[None, :], cols] = vals.to(act.dtype)
        return act

    return hooks.mlp_post(layer), restore_fn


@torch.inference_mode()
def _restored_logprobs_full(model, query: Query, run: _Run, clean_post: Tensor, layer: int,
                            idx: Tensor, restore: tuple[int, ...]) -> Float[Tensor, "batch"]:
    """:func:`_restored_logprobs` by whole hooked forward passes (one batch row per restored
    neuron, the run's noise on every row): what a model without TransformerLens' block calls
    and key/value caches (a TransformerBridge) computes; the same numbers up to rounding."""
    b = idx.numel()
    toks = _tokens(model, query).expand(b, -1)
    fwd = ([] if run.noise is None else _noise_hooks(run.noise)) + [
        _restore_hook(model, clean_post, layer, idx, restore, 0)]
    with model.hooks(fwd_hooks=fwd):
        logits = model(toks)
    logp = torch.log_softmax(logits[:, list(query.answer_positions)].float(), dim=-1)
    ans = torch.tensor(query.answer_ids, device=logp.device)
    return logp.gather(-1, ans.view(1, -1, 1).expand(b, -1, 1)).squeeze(-1).sum(-1)


def _dni(clean_post: Tensor, corr_post: Tensor, restore: tuple[int, ...], eps: float
         ) -> Float[Tensor, "layer d_mlp"]:
    """DNI = |h - h*| / |h| at the restored position (TNF-DA eq. 6); over several positions the
    L2 norms over positions are used."""
    pos = list(restore)
    h = clean_post[:, pos].float()
    hs = corr_post[:, pos].float()
    return (h - hs).norm(dim=1) / h.norm(dim=1).clamp_min(eps)


def _searched_mask(dni: Tensor, gamma: float) -> Bool[Tensor, "layer d_mlp"]:
    """The top gamma % of neurons by DNI (TNF-DA eq. 7): exactly round(gamma/100 * N) neurons."""
    flat = dni.flatten()
    k = max(1, round(gamma / 100.0 * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device="cpu")
    if k >= flat.numel():
        mask[:] = True
    else:
        # stable order for ties: sort descending by DNI, then by index
        order = torch.sort(flat.cpu().double(), descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.view_as(dni)


def _validate_query(model, query: Query) -> None:
    if not isinstance(query, Query):
        raise InvalidFactError(f"expected a Query, got {type(query).__name__}")
    if len(query.input_ids) > model.cfg.n_ctx:
        raise InvalidFactError(f"query has {len(query.input_ids)} tokens > n_ctx {model.cfg.n_ctx}")


def _finite(x: Tensor, what: str) -> Tensor:
    if not torch.isfinite(x).all():
        raise NumericalError(f"{what} is not finite (NaN/inf in the model's activations)")
    return x


# --------------------------------------------------------------------------- exact mediation


def causal_mediation(model: "HookedTransformer", query: Query, *,
                     config: MediationConfig | None = None) -> NeuronScores:
    """Exact indirect effect of every searched neuron (TNF-DA causal mediation + DNI pruning).

    ``scores[l, i] = mean_s [P*(o | h_{l,i} restored) - P*_s(o)]`` over the noise samples for the
    neurons in the top gamma % by DNI (mean over samples), 0 elsewhere. ``extras``: ``searched``
    (bool mask), ``dni`` (mean DNI), ``p_clean``, ``p_corrupted`` (per sample),
    ``ie_per_sample`` (noise, layer, d_mlp), ``noise_scale``, ``corrupted_positions``,
    ``restored_positions``, ``seconds``."""
    cfg = config or MediationConfig()
    return _mediation(model, query, cfg, fast=True)


def causal_mediation_plain(model: "HookedTransformer", query: Query, *,
                           config: MediationConfig | None = None) -> NeuronScores:
    """Reference implementation: one hooked full forward pass per (noise sample, neuron). Same
    result as :func:`causal_mediation` up to float rounding; only for small models / tests."""
    cfg = config or MediationConfig()
    return _mediation(model, query, cfg, fast=False)


def _mediation(model, query: Query, cfg: MediationConfig, *, fast: bool) -> NeuronScores:
    _check_model(model)
    _validate_query(model, query)
    t0 = time.perf_counter()
    noise, cpos, nu = noise_samples(model, query, cfg)
    restore = restored_positions(query, cfg.restore_positions)
    L, d = model.cfg.n_layers, model.cfg.d_mlp

    clean = _cached_run(model, query, None)
    corr = [_cached_run(model, query, noise[s]) for s in range(cfg.n_noise)]
    _finite(clean.post, "the clean run")
    dni = torch.stack([_dni(clean.post, c.post, restore, cfg.dni_eps) for c in corr]).mean(0).cpu()
    if cfg.prune == "dni":
        searched = _searched_mask(dni, cfg.gamma)
    elif cfg.prune == "atp":
        atp_cfg = AtPConfig(n_noise=cfg.n_noise, noise_multiplier=cfg.noise_multiplier,
                            noise_scale=cfg.noise_scale, corrupt=cfg.corrupt,
                            restore_positions=cfg.restore_positions, seed=cfg.seed)
        estimate = attribution_patching(model, query, config=atp_cfg).scores
        searched = _searched_mask(estimate.abs().cpu(), cfg.gamma)
    else:
        searched = torch.ones(L, d, dtype=torch.bool, device="cpu")

    ie = torch.zeros(cfg.n_noise, L, d, dtype=torch.float64, device="cpu")
    p_corr = []
    for s in range(cfg.n_noise):
        run = corr[s]
        if not fast:  # the reference: P*(o) from an ordinary hooked forward pass
            base = float(answer_logprobs(model, [query], fwd_hooks=_noise_hooks(noise[s]))[0])
        else:
            base = run.logprob
        p_base = math.exp(base)
        p_corr.append(p_base)
        for layer in range(L):
            idx_all = searched[layer].nonzero().flatten()
            if idx_all.numel() == 0:
                continue
            if fast:
                for c0 in range(0, idx_all.numel(), cfg.chunk):
                    idx = idx_all[c0: c0 + cfg.chunk]
                    lp = _restored_logprobs(model, query, run, clean.post, layer, idx, restore)
                    ie[s, layer, idx] = lp.double().exp().cpu() - p_base
            else:
                for i in idx_all.tolist():
                    fwd = _noise_hooks(noise[s]) + hooks.patch_activations(
                        hooks.mlp_post(layer), clean.post[layer][None],
                        index=torch.tensor([i], device=model.cfg.device), positions=list(restore))
                    lp = float(answer_logprobs(model, [query], fwd_hooks=fwd)[0])
                    ie[s, layer, i] = math.exp(lp) - p_base
    _finite(ie, "the indirect effects")
    scores = ie.mean(0).float()
    extras = dict(
        searched=searched, dni=dni, p_clean=math.exp(clean.logprob), p_corrupted=p_corr,
        ie_per_sample=ie.float(), noise_scale=nu, corrupted_positions=cpos,
        restored_positions=restore, seconds=time.perf_counter() - t0,
        implementation=("plain" if not fast else
                        "full_forward" if clean.resid_pre is None else "fast"),
    )
    return NeuronScores(scores=scores, method="mediation", query=query, config=cfg,
                        model=model_info(model), extras=extras)


def _noise_hooks(noise: Tensor) -> hooks.HookList:
    return hooks.add_to(hooks.embed(), noise[None])


# --------------------------------------------------------------------------- attribution patching


def attribution_patching(model: "HookedTransformer", query: Query, *,
                         config: AtPConfig | None = None) -> NeuronScores:
    """First-order (attribution patching) estimate of every neuron's mediation IE:
    ``mean_s sum_{p in restored} (h_p - h*_p) * dP(o)/dh*_p`` with the gradient taken on the
    corrupted run (one forward + backward per noise sample). ``extras``: ``p_clean``,
    ``p_corrupted``, ``atp_per_sample``, ``noise_scale``, positions, ``seconds``."""
    cfg = config or AtPConfig()
    _check_model(model)
    _validate_query(model, query)
    t0 = time.perf_counter()
    noise, cpos, nu = noise_samples(model, query, cfg)
    restore = list(restored_positions(query, cfg.restore_positions))
    L, d = model.cfg.n_layers, model.cfg.d_mlp
    clean = _cached_run(model, query, None)
    out = torch.zeros(cfg.n_noise, L, d, device="cpu")
    p_corr = []
    toks = _tokens(model, query)
    ans = torch.tensor(query.answer_ids, device=toks.device)
    for s in range(cfg.n_noise):
        store: dict = {}
        zeros = [torch.zeros(1, toks.shape[1], d, device=model.cfg.device, dtype=model.cfg.dtype,
                             requires_grad=True) for _ in range(L)]

        def grab(act: Tensor, hook, layer: int, store=store) -> Tensor:
            store[layer] = act.detach()
            return act + zeros[layer]

        # the layer is bound here: a bridge's hook point may carry another (canonical) name
        fwd = _noise_hooks(noise[s]) + [
            (hooks.mlp_post(layer), lambda act, hook, layer=layer: grab(act, hook, layer))
            for layer in range(L)]
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
            logits = model(toks)
            lp = _answer_logprob_from_full(logits, query, ans)
            p = lp.exp()
            grads = torch.autograd.grad(p, zeros)
        p_corr.append(float(p.detach()))
        for layer in range(L):
            # in float32: a half-precision model's h - h* and its products and sums
            delta = clean.post[layer][restore].float() - store[layer][0, restore].float()
            out[s, layer] = (delta * grads[layer][0, restore].float()).sum(0).cpu()
    _finite(out, "the attribution-patching scores")
    extras = dict(p_clean=math.exp(clean.logprob), p_corrupted=p_corr, atp_per_sample=out,
                  noise_scale=nu, corrupted_positions=cpos, restored_positions=tuple(restore),
                  seconds=time.perf_counter() - t0)
    return NeuronScores(scores=out.mean(0), method="atp", query=query,
                        config=cfg, model=model_info(model), extras=extras)


def _answer_logprob_from_full(logits: Tensor, query: Query, ans: Tensor) -> Tensor:
    logp = torch.log_softmax(logits[0, list(query.answer_positions)].float(), dim=-1)
    return logp.gather(-1, ans.to(logp.device)[:, None]).sum()


# --------------------------------------------------------------------------- agreement


@dataclass(frozen=True)
class MediationAgreement:
    """How well AtP ranks neurons like the exact IE, over the neurons exact mediation searched."""

    spearman: float  # rank correlation over the searched neurons
    top_overlap: float  # |top-k(exact) & top-k(atp)| / k, both ranked within the searched neurons
    k: int  # top 1 % of all neurons (at least 1)
    n_searched: int
    pearson: float
    extras: dict = field(default_factory=dict, compare=False)


def mediation_agreement(exact: NeuronScores, atp: NeuronScores, *, top_fraction: float = 0.01
                        ) -> MediationAgreement:
    """Spearman correlation between exact IE and AtP over the searched neurons
    (``exact.extras["searched"]``; all neurons if absent) and the overlap of their top
    ``top_fraction`` (1 %) of all neurons, both ranked within the searched neurons."""
    from scipy.stats import pearsonr, spearmanr

    if exact.shape != atp.shape:
        raise ConfigError(f"score maps differ in shape: {exact.shape} vs {atp.shape}")
    if not 0 < top_fraction <= 1:
        raise ConfigError(f"top_fraction must be in (0, 1], got {top_fraction}")
    mask = exact.extras.get("searched")
    mask = torch.ones(exact.shape, dtype=torch.bool, device="cpu") if mask is None else \
        mask.bool().cpu()
    e = exact.scores.detach().cpu().double()[mask]
    a = atp.scores.detach().cpu().double()[mask]
    n = int(mask.sum())
    if n < 2:
        raise ConfigError("need at least 2 searched neurons to compare rankings")
    k = min(n, max(1, round(top_fraction * mask.numel())))
    te = set(torch.topk(e, k).indices.tolist())
    ta = set(torch.topk(a, k).indices.tolist())
    rho = spearmanr(e.numpy(), a.numpy()).statistic
    r = pearsonr(e.numpy(), a.numpy()).statistic
    return MediationAgreement(spearman=float(rho), top_overlap=len(te & ta) / k, k=k, n_searched=n,
                              pearson=float(r))

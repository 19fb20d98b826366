"""ROME-style causal tracing: which layers carry a fact's subject to the answer.

Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME §2.1):

1. **clean run**: the prompt as is; record the hidden states and P(answer);
2. **corrupted run**: Gaussian noise eps ~ N(0, nu^2) added to the embeddings of the *subject's*
   tokens (``hook_embed``), nu = 3 sigma (ROME: 3 x the std of subject embeddings; here, as in
   :mod:`kn_lens.locate.mediation`, 3 x the std of the embedding matrix W_E, which needs no data
   set); P*(answer) usually drops;
3. **corrupted-with-restoration run**: the corrupted run with one state put back to its clean
   value at one token. Its **indirect effect** is ``IE = P*_{clean state}(answer) - P*(answer)``,
   averaged over noise samples (ROME: 10).

What is restored (:class:`TraceConfig` ``kind``), at layer l and one position:

- ``"mlp"``: the MLP outputs ``blocks.{j}.hook_mlp_out`` of a window of layers centred on l,
  ``j in [l - w//2, l + ceil(w/2))`` clamped to ``[0, n_layers)``; ROME uses w = 10 (its Fig. 1
  and 2: one MLP alone changes little, a window shows the band of layers that matters);
- ``"attn"``: the same with the attention outputs ``blocks.{j}.hook_attn_out``;
- ``"resid"``: the residual stream after block l (``blocks.{l}.hook_resid_post``), window 1.

``position`` is the subject's last token (``"subject_last"``, ROME's edit site) or the prompt's
last token (``"last"``). ROME picks its edit layer as the MLP layer with the peak average
indirect effect at the last subject token over many known facts: layer 17 of GPT-2 XL (48
layers), layer 5 of GPT-J (28 layers). :func:`layer_sweep` computes that curve and its argmax.

P(answer) is the probability of the whole answer, teacher-forced (product over its tokens;
ROME scores the first token only). The restoration is at one position only: for a multi-token
answer the later answer tokens are predicted from positions that still attend to the noisy
subject, so even restoring the final residual stream at the prompt's last token does not give
back P_clean (it does for a single-token answer; the tests check it).

**Batched.** One forward pass per chunk of noise samples: each row of the batch is one (noise
sample, layer) pair (the same noise for every layer of a sample) plus one unrestored row per
sample for P*(answer), so a whole trace costs ``n_noise / chunk`` hooked forward passes. It equals
one hooked forward pass per (sample, layer) up to float rounding (the tests compare it with
such a loop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens import hooks
from kn_lens.errors import ConfigError, InvalidFactError, NumericalError
from kn_lens.facts import Query, answer_logprobs, subject_last_position
from kn_lens.locate.mediation import noise_samples

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Kind = Literal["mlp", "resid", "attn"]
Position = Literal["subject_last", "last"]

_HOOK_OF_KIND: dict[str, Callable[[int], str]] = {
    "mlp": hooks.mlp_out, "attn": hooks.attn_out, "resid": hooks.resid_post,
}
_DEFAULT_WINDOW = {"mlp": 10, "attn": 10, "resid": 1}  # ROME's causal-tracing windows


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class TraceConfig:
    """Causal tracing (ROME §2.1). Defaults are ROME's."""

    kind: Kind = "mlp"  # what is restored: MLP outputs, attention outputs or the residual stream
    # layers restored around each layer; None = ROME's: 10 for "mlp"/"attn", 1 for "resid"
    window: int | None = None
    n_noise: int = 10  # noise samples averaged (ROME: 10)
    noise_multiplier: float = 3.0  # nu = 3 x std(W_E) (ROME: 3 x std of subject embeddings)
    noise_scale: float | None = None  # absolute nu; overrides noise_multiplier when given
    seed: int = 0  # seeds the torch.Generator the noise is drawn from (same noise for every query)
    position: Position = "subject_last"  # where states are restored (ROME: last subject token)
    chunk: int = 10  # noise samples per batched forward (rows = chunk x (n_layers + 1)); memory only
    # layer_sweep skips a query when p_clean - p_corrupt < min_effect (the corruption does
    # nothing, so there is nothing to restore); -1 keeps every query whose subject is found
    min_effect: float = 0.01

    corrupt: ClassVar[str] = "subject"  # what noise_samples() corrupts: ROME's subject tokens

    def __post_init__(self) -> None:
        if self.kind not in _HOOK_OF_KIND:
            raise ConfigError(f"kind must be 'mlp', 'attn' or 'resid', got {self.kind!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ConfigError(f"window must be an integer >= 1 (or None for ROME's default), "
                              f"got {self.window!r}")
        if not isinstance(self.n_noise, int) or self.n_noise < 1:
            raise ConfigError(f"n_noise must be an integer >= 1, got {self.n_noise!r}")
        if not (self.noise_multiplier >= 0) or not math.isfinite(self.noise_multiplier):
            raise ConfigError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if self.noise_scale is not None and (not self.noise_scale >= 0
                                             or not math.isfinite(self.noise_scale)):
            raise ConfigError(f"noise_scale must be finite and >= 0 (or None), got {self.noise_scale}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.position not in ("subject_last", "last"):
            raise ConfigError(f"position must be 'subject_last' or 'last', got {self.position!r}")
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ConfigError(f"chunk must be an integer >= 1, got {self.chunk!r}")
        if not (-1.0 <= self.min_effect <= 1.0):
            raise ConfigError(f"min_effect is a difference of probabilities in [-1, 1], "
                              f"got {self.min_effect}")

    @property
    def effective_window(self) -> int:
        """The window used: ``window``, or ROME's default for ``kind``."""
        return _DEFAULT_WINDOW[self.kind] if self.window is None else self.window


def layer_window(layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """The half-open range of layers restored for ``layer``: ROME's
    ``[max(0, l - w//2), min(n_layers, l + ceil(w/2)))`` (w = 10: l-5 .. l+4; w = 1: l)."""
    return max(0, layer - window // 2), min(n_layers, layer - (-window // 2))


# --------------------------------------------------------------------------- one query


@dataclass(frozen=True)
class TraceResult:
    """Causal trace of one query: P(answer) restored layer by layer, averaged over noise."""

    p_clean: float
    p_corrupt: float  # mean over noise samples
    p_restored: Float[Tensor, "layer"]  # mean over noise samples
    indirect_effect: Float[Tensor, "layer"]  # p_restored - p_corrupt
    kind: str
    window: int
    position: int  # the token index (in query.input_ids) where states were restored
    query: Query
    config: TraceConfig
    windows: tuple[tuple[int, int], ...]  # per layer: the half-open range of layers restored
    subject_positions: tuple[int, ...]  # the positions that received noise
    noise_scale: float  # nu
    p_corrupt_samples: Float[Tensor, "noise"] = field(repr=False)
    p_restored_samples: Float[Tensor, "noise layer"] = field(repr=False)

    @property
    def prompt(self) -> str:
        return self.query.prompt

    @property
    def total_effect(self) -> float:
        """p_clean - p_corrupt: what the corruption destroyed."""
        return self.p_clean - self.p_corrupt


def causal_trace(model: "HookedTransformer", query: Query, *,
                 config: TraceConfig = TraceConfig()) -> TraceResult:
    """Corrupt the subject's embeddings, restore the clean ``config.kind`` state of each layer
    (its window) at ``config.position``, and return P(answer) per layer averaged over noise.

    Raises :class:`~kn_lens.errors.InvalidFactError` when the subject is not spelled in the
    prompt. Leaves no hook behind, also on error."""
    if not isinstance(query, Query):
        raise InvalidFactError(f"expected a Query, got {type(query).__name__}")
    if len(query.input_ids) > model.cfg.n_ctx:
        raise InvalidFactError(f"query has {len(query.input_ids)} tokens > n_ctx {model.cfg.n_ctx}")
    subj_last = subject_last_position(model, query)  # raises when the subject is not found
    pos = subj_last if config.position == "subject_last" else query.last_position
    L = model.cfg.n_layers
    w = config.effective_window
    windows = tuple(layer_window(l, w, L) for l in range(L))
    name = _HOOK_OF_KIND[config.kind]
    noise, cpos, nu = noise_samples(model, query, config)

    store: dict[str, Tensor] = {}
    cache = [h for j in range(L) for h in hooks.cache_hook(name(j), store)]
    p_clean = float(answer_logprobs(model, [query], fwd_hooks=cache)[0].exp())
    clean = {j: store[name(j)][0, pos] for j in range(L)}

    p_corr, p_rest = [], []
    for s0 in range(0, config.n_noise, config.chunk):
        s1 = min(config.n_noise, s0 + config.chunk)
        p = _restored_probs(model, query, noise[s0:s1], clean, windows, name, pos)
        p_rest.append(p[:, :L])
        p_corr.append(p[:, L])
    p_rest_s = torch.cat(p_rest).double().cpu()
    p_corr_s = torch.cat(p_corr).double().cpu()
    if not (math.isfinite(p_clean) and torch.isfinite(p_rest_s).all()
            and torch.isfinite(p_corr_s).all()):
        raise NumericalError("causal tracing produced NaN/inf probabilities (the model's "
                             "activations are not finite)")
    p_restored = p_rest_s.mean(0)
    p_corrupt = float(p_corr_s.mean())
    return TraceResult(
        p_clean=p_clean, p_corrupt=p_corrupt, p_restored=p_restored.float(),
        indirect_effect=(p_restored - p_corrupt).float(), kind=config.kind, window=w,
        position=pos, query=query, config=config, windows=windows, subject_positions=cpos,
        noise_scale=nu, p_corrupt_samples=p_corr_s.float(), p_restored_samples=p_rest_s.float())


def _restored_probs(model, query: Query, noise: Float[Tensor, "noise pos d_model"],
                    clean: dict[int, Float[Tensor, "d_model"]], windows: Sequence[tuple[int, int]],
                    name: Callable[[int], str], pos: int) -> Float[Tensor, "noise row"]:
    """P(answer) for every (noise sample, row) in one hooked forward: row l < n_layers restores
    ``windows[l]``, row n_layers restores nothing (the corrupted run)."""
    n, L = noise.shape[0], len(windows)
    R = L + 1
    rows_noise = noise.repeat_interleave(R, dim=0)  # [n * R, pos, d_model], sample-major
    fwd = hooks.add_to(hooks.embed(), rows_noise)
    for j in range(L):
        rows = [s * R + l for s in range(n) for l, (lo, hi) in enumerate(windows) if lo <= j < hi]
        if rows:
            fwd.append((name(j), _restore_rows(torch.tensor(rows, device=noise.device), pos,
                                               clean[j])))
    lp = answer_logprobs(model, [query] * (n * R), batch_size=n * R, fwd_hooks=fwd)
    return lp.exp().view(n, R)


def _restore_rows(rows: Tensor, pos: int, value: Float[Tensor, "d_model"]) -> Callable:
    """A hook function that sets ``act[rows, pos] = value`` (the clean state)."""

    def fn(act: Tensor, hook) -> Tensor:
        act = act.clone()
        act[rows.to(act.device), pos] = value.to(act.device, act.dtype)
        return act

    return fn


# --------------------------------------------------------------------------- many queries


@dataclass(frozen=True)
class LayerSweep:
    """Indirect effect per layer over many queries, and its peak (ROME's edit-layer choice).

    Queries are skipped (``skipped``, with reasons in ``skipped_queries``) when their subject is
    not spelled in the prompt, or when the corruption barely moves the answer
    (``p_clean - p_corrupt < config.min_effect``, default 0.01 absolute): such a query has no
    effect to restore and only adds noise to the mean."""

    kind: str
    window: int
    mean_ie: Float[Tensor, "layer"]
    std_ie: Float[Tensor, "layer"]  # over queries (unbiased; 0 for a single query)
    best_layer: int  # argmax of mean_ie
    ie: Float[Tensor, "query layer"]  # per kept query
    p_restored: Float[Tensor, "query layer"]
    p_clean: Float[Tensor, "query"]
    p_corrupt: Float[Tensor, "query"]
    positions: tuple[int, ...]  # restored token index per kept query
    prompts: tuple[str, ...]
    n_queries: int  # kept
    skipped: int
    skipped_queries: tuple[tuple[str, str], ...]  # (prompt, reason)
    config: TraceConfig

    def top_layers(self, k: int = 3) -> list[tuple[int, float]]:
        """The ``k`` layers with the largest mean indirect effect, largest first."""
        order = torch.argsort(self.mean_ie, descending=True, stable=True)[:k]
        return [(int(i), float(self.mean_ie[i])) for i in order]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "window": self.window, "position": self.config.position,
            "best_layer": self.best_layer, "top_layers": self.top_layers(3),
            "mean_ie": self.mean_ie.tolist(), "std_ie": self.std_ie.tolist(),
            "mean_p_clean": float(self.p_clean.mean()), "mean_p_corrupt": float(self.p_corrupt.mean()),
            "n_queries": self.n_queries, "skipped": self.skipped,
            "skipped_queries": [list(x) for x in self.skipped_queries],
            "per_query": [{"prompt": p, "position": pos, "p_clean": float(pc), "p_corrupt": float(pk),
                           "ie": ie.tolist()}
                          for p, pos, pc, pk, ie in zip(self.prompts, self.positions, self.p_clean,
                                                        self.p_corrupt, self.ie)],
        }


def layer_sweep(model: "HookedTransformer", queries: Sequence[Query], *,
                config: TraceConfig = TraceConfig(), progress: Callable[[int, int], None] | None = None
                ) -> LayerSweep:
    """:func:`causal_trace` on every query; mean and std of the indirect effect per layer over
    the kept queries and its argmax (``best_layer``). ``progress(i, n)`` is called after each
    query when given. Raises :class:`~kn_lens.errors.InvalidFactError` when no query is kept."""
    traces: list[TraceResult | str] = []
    for i, q in enumerate(queries):
        try:
            traces.append(causal_trace(model, q, config=config))
        except InvalidFactError as e:
            traces.append(str(e))
        if progress is not None:
            progress(i + 1, len(queries))
    return summarize_traces(queries, traces, config=config)


def summarize_traces(queries: Sequence[Query], traces: Sequence["TraceResult | str"], *,
                     config: TraceConfig) -> LayerSweep:
    """The :class:`LayerSweep` of traces computed one query at a time (:func:`layer_sweep`, or a
    sweep's ``trace`` items): ``traces[i]`` is query i's :class:`TraceResult` under ``config``,
    or the message of the ``InvalidFactError`` that kept its subject from being located."""
    if len(traces) != len(queries):
        raise ConfigError(f"summarize_traces: {len(traces)} traces for {len(queries)} queries")
    kept: list[TraceResult] = []
    skipped: list[tuple[str, str]] = []
    for q, r in zip(queries, traces):
        if isinstance(r, str):
            skipped.append((getattr(q, "prompt", repr(q)), f"subject not located: {r}"))
        elif r.total_effect < config.min_effect:
            skipped.append((q.prompt, f"corruption effect {r.total_effect:.4f} < "
                                      f"min_effect {config.min_effect}"))
        else:
            kept.append(r)
    if not kept:
        raise InvalidFactError(
            f"layer_sweep kept none of {len(queries)} queries ({len(skipped)} skipped: subject not "
            f"found, or p_clean - p_corrupt < min_effect = {config.min_effect}); use facts the model "
            "knows, more noise, or a lower min_effect")
    ie = torch.stack([r.indirect_effect for r in kept])
    std = ie.std(0) if len(kept) > 1 else torch.zeros(ie.shape[1], device=ie.device)
    mean = ie.mean(0)
    return LayerSweep(
        kind=config.kind, window=config.effective_window, mean_ie=mean, std_ie=std,
        best_layer=int(torch.argmax(mean)), ie=ie,
        p_restored=torch.stack([r.p_restored for r in kept]),
        p_clean=torch.tensor([r.p_clean for r in kept], device="cpu"),
        p_corrupt=torch.tensor([r.p_corrupt for r in kept], device="cpu"),
        positions=tuple(r.position for r in kept), prompts=tuple(r.prompt for r in kept),
        n_queries=len(kept), skipped=len(skipped), skipped_queries=tuple(skipped), config=config)


__all__ = ["TraceConfig", "TraceResult", "LayerSweep", "causal_trace", "layer_sweep",
           "summarize_traces", "layer_window"]

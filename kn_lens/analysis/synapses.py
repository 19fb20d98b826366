"""Attention "knowledge synapses" and the Dynamic-KN-Selection test (Query Localization, Sec. 3.2).

What the paper defines (QL = "Knowledge Localization: Mission Not Accomplished? Enter Query
Localization!", Sec. 3.2, eq. 4-6, App. A.1), and how it is read here:

* ``A_(l,h)`` is the **post-softmax** attention pattern of layer ``l``, query head ``h``
  (``blocks.{l}.attn.hook_pattern``, ``[batch, head, query_pos, key_pos]``); rows ``r`` are query
  (destination) positions, columns ``c`` key (source) positions. ``L`` is every layer and ``H``
  every *query* head (for grouped-query attention TransformerLens repeats the key/value heads, so
  the pattern already has ``n_heads`` rows; the synapses are per query head). ``R = C`` = the
  prompt's tokens (BOS included when the model prepends one); the answer tokens are not part of
  the pattern the synapses are read from.
* **Knowledge synapses** (eq. 5-6)::

      tau = alpha * 1/(L*H) * sum_{l,h,r,c} A_(l,h)^(r,c)                       (5)
      S   = {(c, l, h) : sum_r A_(l,h)^(r,c) > tau}                            (6)

  ``alpha = 0.3`` (App. A.1, where it is misprinted as "tau = 0.3"). Because every softmax row sums
  to one, ``sum_{r,c} A_(l,h) = R`` for every head and eq. 5 reduces to ``tau = alpha * R``: a key
  position is a synapse of head (l, h) when it receives more than ``alpha * R`` of that head's total
  attention mass (``R``). Under causal masking the column sums are biased toward early positions
  (key 0 receives attention from every row; attention sinks sit there), so the first token (BOS, or
  the first word) is usually a synapse of most heads. This is what the equations define; the
  results record the synapses per position so a reader can see it.
* **Predominance score** (eq. 4): the layer/head-mean pattern ``A_i`` of each query, its most
  attended token ``t_i`` and ``P = max_t (#{i : t_i = t}) / k`` over a fact's ``k`` queries. As
  printed, eq. 4 takes ``argmax_r sum_c A_i^(r,c)``, i.e. sums each *row*: for a softmax pattern
  every row sums to one, so the printed formula is degenerate (all rows tie). The text says "the
  token with the highest attention score", and eq. 6 sums columns, so the default here is the token
  that *receives* the most attention, ``argmax_c sum_r A_i^(r,c)`` (``axis="key"``); ``axis="query"``
  gives the literal, degenerate reading and exists only to show that. Tokens are compared by id.
* **Suppress / enhance** (Sec. 3.2.2): "we enhance or suppress the attention scores at these
  positions". The factors are not stated in QL; we use the convention of Dai et al. and QL Sec. 3.1
  for KN activations: suppress = x0, enhance = x2. A synapse (c, l, h) is a whole column of head
  (l, h)'s pattern, so every query row's weight on key c is scaled. By default the rows are **not**
  renormalised (``renormalize=False``): "manipulate the attention scores at these positions" leaves
  the other entries alone, and renormalising would make suppression a no-op for a head whose every
  key is a synapse. ``renormalize=True`` divides each row by its new sum (rows whose sum becomes
  zero stay zero).
* **Irrelevant synapses** ``S_ir`` (Sec. 3.2.2): the synapses of a query of another fact, applied to
  this query. Key positions past this query's length are dropped (the number actually applied is
  recorded).
* **Metrics** (Sec. 3.2.2): ``dValue = +-(Value_a - Value_b) / Value_b`` with ``Value`` the mean
  activation (``blocks.{l}.mlp.hook_post``, the answer-predicting last prompt position) over the
  query's KNs, and ``dProb = +-(Prob_a - Prob_b) / Prob_b`` with ``Prob`` the (teacher-forced,
  whole-answer) answer probability; ``+`` for enhancement, ``-`` for suppression, so a positive
  number is a change in the expected direction. The raw relative changes are kept too. When
  ``|Value_b|`` is below ``1e-8`` the relative change is NaN (reported, never silently dropped).
  Gated MLPs (SiLU) have signed activations, so ``Value_b`` can be negative: then a positive raw
  relative change means the mean moved *toward more negative*; read ``value_before/after``.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kn_lens import hooks
from kn_lens.errors import ConfigError, InvalidFactError, NumericalError
from kn_lens.facts import Query, answer_logprobs
from kn_lens.models import ModelInfo, model_info
from kn_lens.neurons import NeuronSet

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "SynapseConfig", "Synapses", "Predominance", "SynapseManipulationConfig", "SynapseEffect",
    "SynapseManipulationResult", "ActivationMaps", "attention_patterns", "synapses_from_patterns",
    "knowledge_synapses", "predominance_from_patterns", "predominance_score", "scale_synapses",
    "synapse_manipulation", "activation_maps",
]

_EPS = 1e-8


# --------------------------------------------------------------------------- configs / results


@dataclass(frozen=True, kw_only=True)
class SynapseConfig:
    alpha: float = 0.3  # QL eq. 5 scaling factor; App. A.1 ("tau = 0.3", same for all PLMs)
    # Not in the paper: drop key position 0 (BOS, or the first word when there is no BOS) from S.
    # Measured on SmolLM2-135M: ~95 % of the eq. 6 synapses sit on position 0, the attention sink.
    ignore_first: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be a positive finite number, got {self.alpha!r}")


@dataclass(frozen=True)
class Synapses:
    """The knowledge synapses of one query (QL eq. 6): key positions per (layer, head)."""

    mask: Bool[Tensor, "layer head key"]
    column_sums: Float[Tensor, "layer head key"]  # sum_r A_(l,h)^(r,c)
    tau: float  # eq. 5
    alpha: float
    query: Query | None = None
    tokens: tuple[str, ...] = ()
    model: ModelInfo | None = None

    @property
    def n_positions(self) -> int:
        return int(self.mask.shape[-1])

    def __len__(self) -> int:
        return int(self.mask.sum())

    def triples(self) -> list[tuple[int, int, int]]:
        """The set S as (c, l, h) triples, the paper's order."""
        return [(int(c), int(l), int(h)) for l, h, c in self.mask.nonzero().tolist()]

    def per_position(self) -> list[int]:
        """How many (layer, head) pairs select each key position."""
        return self.mask.sum(dim=(0, 1)).tolist()

    def per_layer(self) -> list[int]:
        return self.mask.sum(dim=(1, 2)).tolist()

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha, "tau": self.tau, "n_synapses": len(self),
            "triples_c_l_h": self.triples(), "per_position": self.per_position(),
            "per_layer": self.per_layer(), "tokens": list(self.tokens),
            "prompt": None if self.query is None else self.query.prompt,
            "answer": None if self.query is None else self.query.answer,
            "model": None if self.model is None else self.model.to_dict(),
        }


@dataclass(frozen=True)
class Predominance:
    """QL eq. 4 for one fact's queries."""

    score: float  # P
    most_attended: tuple[int, ...]  # t_i as token ids
    most_attended_text: tuple[str, ...]
    most_attended_position: tuple[int, ...]
    axis: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class SynapseManipulationConfig:
    synapses: SynapseConfig = SynapseConfig()
    suppress_factor: float = 0.0  # x0: Dai et al. / QL Sec. 3.1 convention (QL 3.2 gives none)
    enhance_factor: float = 2.0  # x2: same convention
    renormalize: bool = False  # see module docstring
    # KN activations are read here: the answer-predicting position (QL Sec. 3.2.2 "KN activation")
    position: Literal["last"] = "last"

    def __post_init__(self) -> None:
        for name in ("suppress_factor", "enhance_factor"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite non-negative number, got {v!r}")


@dataclass(frozen=True)
class SynapseEffect:
    """Per-query numbers of the Dynamic-KN-Selection test (QL Fig. 6)."""

    prompt: str
    answer: str
    irrelevant_prompt: str
    n_kns: int
    n_synapses: int
    n_irrelevant_synapses: int  # applied to this query (positions within its length)
    value_before: float
    prob_before: float
    # keys "self_suppress", "self_enhance", "irrelevant_suppress", "irrelevant_enhance"
    value_after: dict[str, float]
    prob_after: dict[str, float]
    delta_value: dict[str, float]  # signed as in the paper (+ enhance, - suppress)
    delta_prob: dict[str, float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SynapseManipulationResult:
    effects: tuple[SynapseEffect, ...]
    config: SynapseManipulationConfig
    model: ModelInfo
    seed: int | None

    def summary(self) -> dict[str, dict[str, float]]:
        """Means over queries (NaNs skipped, count kept): QL Fig. 6's bars, incl. "avg" of
        enhance and suppress for self and irrelevant."""
        out: dict[str, dict[str, float]] = {}
        for metric in ("delta_value", "delta_prob"):
            row: dict[str, float] = {}
            for key in _CONDITIONS:
                vals = [getattr(e, metric)[key] for e in self.effects]
                vals = [v for v in vals if math.isfinite(v)]
                row[key] = sum(vals) / len(vals) if vals else float("nan")
                row[key + "_n"] = float(len(vals))
            for who in ("self", "irrelevant"):
                row[f"{who}_avg"] = (row[f"{who}_suppress"] + row[f"{who}_enhance"]) / 2
            out[metric] = row
        return out

    def to_dict(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config), "model": self.model.to_dict(),
            "seed": self.seed, "summary": self.summary(),
            "effects": [e.to_dict() for e in self.effects],
        }


@dataclass(frozen=True)
class ActivationMaps:
    """Neuron activations [layer, d_mlp] at the last prompt position, with no manipulation and
    with the query's synapses suppressed / enhanced (QL Fig. 1, 7, 10)."""

    maps: dict[str, Float[Tensor, "layer d_mlp"]]  # "none", "suppressed", "enhanced"
    query: Query
    n_synapses: int
    config: SynapseManipulationConfig
    model: ModelInfo

    def to_dict(self) -> dict:
        return {"prompt": self.query.prompt, "answer": self.query.answer,
                "n_synapses": self.n_synapses, "config": dataclasses.asdict(self.config),
                "model": self.model.to_dict(),
                "maps": {k: v.tolist() for k, v in self.maps.items()}}


_CONDITIONS = ("self_suppress", "self_enhance", "irrelevant_suppress", "irrelevant_enhance")


# --------------------------------------------------------------------------- pure tensor maths


def _check_patterns(patterns: Tensor) -> None:
    if patterns.ndim != 4:
        raise ValueError(f"patterns must be [layer, head, query, key], got {tuple(patterns.shape)}")
    if patterns.numel() == 0:
        raise InvalidFactError("empty attention patterns (no layers, heads or positions)")
    if not torch.isfinite(patterns).all():
        raise NumericalError("attention patterns contain NaN or inf")


def synapses_from_patterns(patterns: Float[Tensor, "layer head query key"], alpha: float = 0.3,
                           *, ignore_first: bool = False
                           ) -> tuple[Bool[Tensor, "layer head key"], Float[Tensor, "layer head key"], float]:
    """QL eq. 5-6 on one query's patterns: (mask of S, column sums, tau).

    ``tau = alpha / (L H) * sum_{l,h,r,c} A``; ``S = {(c,l,h): sum_r A_(l,h)^(r,c) > tau}``.
    ``ignore_first`` removes key 0 from S (it still counts in tau, as in eq. 5).
    """
    SynapseConfig(alpha=alpha)  # validates alpha
    _check_patterns(patterns)
    p = patterns.float()
    n_l, n_h = p.shape[0], p.shape[1]
    tau = float(alpha * p.sum() / (n_l * n_h))
    col = p.sum(dim=2)  # sum over rows r -> [layer, head, key]
    mask = col > tau
    if ignore_first:
        mask[..., 0] = False
    return mask, col, tau


def predominance_from_patterns(patterns: Sequence[Float[Tensor, "layer head _query _key"]],
                               token_ids: Sequence[Sequence[int]], *,
                               axis: Literal["key", "query"] = "key", ignore_first: bool = False
                               ) -> tuple[float, list[int], list[int]]:
    """QL eq. 4: (P, t_i token ids, t_i positions) for the k queries of one fact.

    ``axis="key"``: t_i is the token receiving the most attention, ``argmax_c sum_r A_i``.
    ``axis="query"``: the printed formula ``argmax_r sum_c A_i`` (degenerate for softmax rows).
    """
    if len(patterns) == 0:
        raise InvalidFactError("predominance needs at least one query")
    if len(patterns) != len(token_ids):
        raise ValueError(f"{len(patterns)} patterns for {len(token_ids)} token lists")
    tokens, positions = [], []
    for pat, ids in zip(patterns, token_ids):
        _check_patterns(pat)
        mean = pat.float().mean(dim=(0, 1))  # A_i = 1/(LH) sum_{l,h} A_(l,h): [query, key]
        if mean.shape[0] != len(ids) or mean.shape[1] != len(ids):
            raise ValueError(f"pattern of {tuple(mean.shape)} for {len(ids)} tokens")
        if axis == "key":
            totals = mean.sum(dim=0)
        elif axis == "query":
            totals = mean.sum(dim=1)
        else:
            raise ConfigError(f"axis must be 'key' or 'query', not {axis!r}")
        if ignore_first and totals.numel() > 1:
            totals = totals.clone()
            totals[0] = float("-inf")
        pos = int(totals.argmax())
        positions.append(pos)
        tokens.append(int(ids[pos]))
    counts: dict[int, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    return max(counts.values()) / len(tokens), tokens, positions


# --------------------------------------------------------------------------- model helpers


@torch.no_grad()
def attention_patterns(model: "HookedTransformer", query: Query
                       ) -> Float[Tensor, "layer head query key"]:
    """Post-softmax patterns of every layer and query head over the query's prompt tokens."""
    store: dict[str, Tensor] = {}
    fwd = []
    for layer in range(model.cfg.n_layers):
        fwd += hooks.cache_hook(hooks.attn_pattern(layer), store)
    toks = torch.tensor([query.prompt_ids], dtype=torch.long, device=model.cfg.device)
    with model.hooks(fwd_hooks=fwd):
        model(toks, return_type=None)
    return torch.stack([store[hooks.attn_pattern(l)][0] for l in range(model.cfg.n_layers)]).float().cpu()


def knowledge_synapses(model: "HookedTransformer", query: Query, *,
                       config: SynapseConfig = SynapseConfig()) -> Synapses:
    """The knowledge synapses S of ``query`` (QL eq. 5-6) read from its prompt's attention."""
    pats = attention_patterns(model, query)
    mask, col, tau = synapses_from_patterns(
        pats, config.alpha, ignore_first=config.ignore_first)
    toks = tuple(model.tokenizer.decode([t]) for t in query.prompt_ids)
    return Synapses(mask=mask, column_sums=col, tau=tau, alpha=config.alpha, query=query,
                    tokens=toks, model=model_info(model))


def predominance_score(model: "HookedTransformer", queries: Sequence[Query], *,
                       axis: Literal["key", "query"] = "key", ignore_first: bool = False
                       ) -> Predominance:
    """QL eq. 4 over a fact's neighbour queries (pass the k queries of one fact).
    ``ignore_first`` (not in the paper) skips key position 0, the attention sink."""
    if not queries:
        raise InvalidFactError("predominance_score needs at least one query")
    pats = [attention_patterns(model, q) for q in queries]
    ids = [q.prompt_ids for q in queries]
    score, toks, pos = predominance_from_patterns(
        pats, ids, axis=axis, ignore_first=ignore_first)
    text = tuple(model.tokenizer.decode([t]) for t in toks)
    return Predominance(score=score, most_attended=tuple(toks), most_attended_text=text,
                        most_attended_position=tuple(pos), axis=axis)


def scale_synapses(synapses: Synapses | Bool[Tensor, "layer head key"], factor: float, *,
                   renormalize: bool = False) -> hooks.HookList:
    """Hooks on ``blocks.{l}.attn.hook_pattern`` multiplying every query row's weight on each
    synapse key (column c of head (l, h)) by ``factor`` (0 suppresses, 2 enhances).

    Key positions of the mask beyond the running sequence are ignored; positions of the sequence
    beyond the mask are untouched. The same mask is applied to every batch item (use it with
    right-padded batches of one query, or queries sharing positions). ``renormalize`` divides each
    row by its new sum (rows summing to zero stay zero). Only layers with a synapse get a hook.
    """
    mask = synapses.mask if isinstance(synapses, Synapses) else synapses
    if mask.ndim != 3:
        raise ValueError(f"synapse mask must be [layer, head, key], got {tuple(mask.shape)}")
    if not math.isfinite(factor):
        raise ConfigError(f"factor must be finite, got {factor!r}")
    out: hooks.HookList = []
    for layer in range(mask.shape[0]):
        m = mask[layer]
        if not bool(m.any()):
            continue

        def fn(pattern: Tensor, hook, m=m) -> Tensor:
            n_key = pattern.shape[-1]
            if m.shape[0] != pattern.shape[1]:
                raise ValueError(f"synapse mask has {m.shape[0]} heads, pattern {pattern.shape[1]}")
            mm = torch.zeros(m.shape[0], n_key, dtype=torch.bool, device=pattern.device)
            k = min(n_key, m.shape[1])
            mm[:, :k] = m[:, :k].to(pattern.device)
            scale = torch.where(mm, torch.tensor(float(factor), dtype=pattern.dtype, device=pattern.device),
                                torch.ones((), dtype=pattern.dtype, device=pattern.device))
            new = pattern * scale[None, :, None, :]  # [batch, head, query, key]
            if renormalize:
                s = new.sum(dim=-1, keepdim=True)
                new = torch.where(s > 0, new / s.clamp_min(torch.finfo(new.dtype).tiny), new)
            return new

        out.append((hooks.attn_pattern(layer), fn))
    return out


def _restrict(mask: Tensor, n_positions: int) -> Tensor:
    """A synapse mask cut (or zero-padded) to ``n_positions`` key positions."""
    out = torch.zeros(mask.shape[0], mask.shape[1], n_positions, dtype=torch.bool,
                      device=mask.device)
    k = min(n_positions, mask.shape[-1])
    out[..., :k] = mask[..., :k]
    return out


@torch.no_grad()
def _run(model: "HookedTransformer", query: Query, layers: Sequence[int], fwd: hooks.HookList
         ) -> tuple[dict[int, Tensor], float]:
    """One forward: mlp_post at the last prompt position for ``layers`` and P(answer)."""
    store: dict[str, Tensor] = {}
    cache = []
    for layer in layers:
        cache += hooks.cache_hook(hooks.mlp_post(layer), store)
    # unembeds only the answer positions (a full forward unembeds every position: most of the
    # cost for a 262k vocabulary and a short prompt)
    lp = answer_logprobs(model, [query], fwd_hooks=list(fwd) + cache)[0]
    if not torch.isfinite(lp):
        raise NumericalError(f"non-finite answer log-prob for {query.prompt!r}")
    acts = {l: store[hooks.mlp_post(l)][0, query.last_position].float().cpu() for l in layers}
    return acts, float(lp.exp())


def _mean_kn(acts: dict[int, Tensor], kns: NeuronSet) -> float:
    vals = [float(acts[n.layer][n.index]) for n in kns]
    return sum(vals) / len(vals)


def _rel(after: float, before: float) -> float:
    if abs(before) < _EPS:
        return float("nan")
    return (after - before) / before


def _pick_irrelevant(queries: Sequence[Query], seed: int | None) -> list[Query]:
    rng = random.Random(seed)
    out = []
    for q in queries:
        # an "irrelevant fact" (QL 3.2.2): another relation when there is one, else another fact
        pool = [o for o in queries if o.fact.relation != q.fact.relation]
        pool = pool or [o for o in queries if o.fact.key() != q.fact.key()]
        if not pool:
            raise InvalidFactError(
                "no irrelevant query: pass queries of at least two different facts, or `irrelevant=`")
        out.append(rng.choice(pool))
    return out


def synapse_manipulation(model: "HookedTransformer", queries: Sequence[Query],
                         kns: Sequence[NeuronSet], *, irrelevant: Sequence[Query] | None = None,
                         config: SynapseManipulationConfig = SynapseManipulationConfig(),
                         seed: int | None = 0) -> SynapseManipulationResult:
    """QL Sec. 3.2.2: suppress / enhance each query's own synapses S and an irrelevant query's
    S_ir, measuring the KNs' mean activation and the answer probability before and after.

    ``kns[i]`` are the knowledge neurons of ``queries[i]`` (any locator). ``irrelevant[i]`` is the
    query whose synapses act as S_ir for ``queries[i]``; by default one is drawn at random (with
    ``seed``) among the given queries of another relation (of another fact when all share one
    relation) (QL: "randomly select ... an irrelevant fact").
    """
    queries = list(queries)
    if not queries:
        raise InvalidFactError("synapse_manipulation needs at least one query")
    if len(kns) != len(queries):
        raise ValueError(f"{len(kns)} KN sets for {len(queries)} queries")
    for q, k in zip(queries, kns):
        if len(k) == 0:
            raise InvalidFactError(f"empty KN set for {q.prompt!r}")
        for n in k:
            if not (0 <= n.layer < model.cfg.n_layers and 0 <= n.index < model.cfg.d_mlp):
                raise ValueError(f"neuron {n} outside the model ({model.cfg.n_layers} x {model.cfg.d_mlp})")
    irr = list(irrelevant) if irrelevant is not None else _pick_irrelevant(queries, seed)
    if len(irr) != len(queries):
        raise ValueError(f"{len(irr)} irrelevant queries for {len(queries)} queries")
    syn_cache: dict[tuple[int, ...], Synapses] = {}

    def syn(q: Query) -> Synapses:
        if q.prompt_ids not in syn_cache:
            syn_cache[q.prompt_ids] = knowledge_synapses(model, q, config=config.synapses)
        return syn_cache[q.prompt_ids]

    effects = []
    for q, kn, qi in zip(queries, kns, irr):
        layers = sorted({n.layer for n in kn})
        s_self = syn(q).mask
        s_irr = _restrict(syn(qi).mask, q.n_prompt)
        acts_b, p_b = _run(model, q, layers, [])
        v_b = _mean_kn(acts_b, kn)
        v_a, p_a, dv, dp = {}, {}, {}, {}
        for who, mask in (("self", s_self), ("irrelevant", s_irr)):
            for what, factor, sign in (("suppress", config.suppress_factor, -1.0),
                                       ("enhance", config.enhance_factor, 1.0)):
                key = f"{who}_{what}"
                fwd = scale_synapses(mask, factor, renormalize=config.renormalize)
                acts, p = _run(model, q, layers, fwd)
                v_a[key] = _mean_kn(acts, kn)
                p_a[key] = p
                dv[key] = sign * _rel(v_a[key], v_b)
                dp[key] = sign * _rel(p, p_b)
        effects.append(SynapseEffect(
            prompt=q.prompt, answer=q.answer, irrelevant_prompt=qi.prompt, n_kns=len(kn),
            n_synapses=int(s_self.sum()), n_irrelevant_synapses=int(s_irr.sum()),
            value_before=v_b, prob_before=p_b, value_after=v_a, prob_after=p_a,
            delta_value=dv, delta_prob=dp))
    return SynapseManipulationResult(effects=tuple(effects), config=config, model=model_info(model),
                                     seed=seed if irrelevant is None else None)


@torch.no_grad()
def activation_maps(model: "HookedTransformer", query: Query, *,
                    synapses: Synapses | None = None,
                    config: SynapseManipulationConfig = SynapseManipulationConfig()) -> ActivationMaps:
    """Neuron activation maps [layer, d_mlp] at the last prompt position with no manipulation,
    with the query's synapses suppressed and enhanced (QL Fig. 1 / 7 / 10)."""
    s = synapses if synapses is not None else knowledge_synapses(model, query, config=config.synapses)
    layers = list(range(model.cfg.n_layers))
    maps = {}
    for name, fwd in (("none", []),
                      ("suppressed", scale_synapses(s, config.suppress_factor, renormalize=config.renormalize)),
                      ("enhanced", scale_synapses(s, config.enhance_factor, renormalize=config.renormalize))):
        acts, _ = _run(model, query, layers, fwd)
        maps[name] = torch.stack([acts[l] for l in layers])
    return ActivationMaps(maps=maps, query=query, n_synapses=len(s), config=config,
                          model=model_info(model))

"""The one scorer: log-probability, argmax and rank of every answer token, teacher-forced.

Every metric in kn-lens (known facts, QL's reliability / locality, the three editing protocols)
and every editing loss (NLL of the new object, KL, FiNE's repetition penalty) reads answers
through this module:

- :func:`answer_logits` -- the logits at each query's answer positions (answer token ``j`` is
  predicted at position ``n_prompt - 1 + j``, with the previous answer tokens in the input), one
  right-padded forward for all queries (exact for causal LMs), and only those rows unembedded.
  Differentiable: the optimisation loop calls it with grad enabled; it can start at a block from
  a cached residual stream (``start_at_layer``) when nothing below that block changes.
- :func:`score` -- no-grad :class:`AnswerScore` per query (per-token log-probs, argmax ids,
  ranks, optional top-k at the first answer position), batched by length.
- :func:`answer_logprobs` -- the summed log P(answer) of each query.

Scoring every answer token from the *last prompt position* (the FT-L bug) or only the first
answer token (TNF-DA's released code) cannot happen here: positions come from
:attr:`kn_lens.facts.Query.answer_positions`.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kn_lens._fast import fast_forward
from kn_lens.backend import is_bridge
from kn_lens.errors import ConfigError, InvalidFactError, NumericalError
from kn_lens.facts import Query

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class AnswerScore:
    """One query's answer under one model state, teacher-forced."""

    answer_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]  # log P(a_j | prompt, a_<j), one per answer token
    argmax: tuple[int, ...]  # the argmax token at each answer position
    ranks: tuple[int, ...]  # rank of a_j among the vocabulary at its position (0 = top-1)
    top_ids: tuple[int, ...] = ()  # top-k tokens at the first answer position (when asked)
    top_probs: tuple[float, ...] = ()

    @property
    def n(self) -> int:
        return len(self.answer_ids)

    @property
    def logprob(self) -> float:
        """log P(answer) = sum_j log P(a_j | ...)."""
        return float(sum(self.token_logprobs))

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)

    @property
    def mean_nll(self) -> float:
        """Mean per-token negative log-likelihood (ROME's CounterFact comparison)."""
        return -self.logprob / self.n

    @property
    def mean_prob(self) -> float:
        """exp(-mean NLL): the per-token geometric-mean probability."""
        return math.exp(-self.mean_nll)

    @property
    def accuracy(self) -> float:
        """Share of answer tokens that are the argmax at their position (EasyEdit's token acc.)."""
        return sum(int(a == t) for a, t in zip(self.argmax, self.answer_ids)) / self.n

    @property
    def exact(self) -> bool:
        """Every answer token is the argmax at its position (greedy decoding yields the answer)."""
        return all(a == t for a, t in zip(self.argmax, self.answer_ids))

    def agreement(self, other: "AnswerScore") -> float:
        """Share of positions whose argmax is the same as in ``other`` (locality: edited vs not)."""
        if other.answer_ids != self.answer_ids:
            raise ConfigError("agreement compares two scores of the same query")
        return sum(int(a == b) for a, b in zip(self.argmax, other.argmax)) / self.n


def unembed_rows(model: "HookedTransformer", resid: Float[Tensor, "rows d_model"]
                 ) -> Float[Tensor, "rows d_vocab"]:
    """ln_final + unembed + logit soft-cap on selected residual rows, as HookedTransformer.forward
    does for every position (without its per-call copy of the whole unembedding matrix)."""
    from transformer_lens.utilities import apply_softcap

    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid[:, None, :])[:, 0]
    logits = resid @ model.W_U + model.b_U
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def _pad_id(model) -> int:
    pad = getattr(model.tokenizer, "pad_token_id", None) if model.tokenizer is not None else None
    return int(pad) if pad is not None else 0


def pad_ids(model: "HookedTransformer", ids: Sequence[Sequence[int]]) -> Int[Tensor, "batch pos"]:
    """Right-pad token id rows into one batch on the model's device (exact for causal LMs: real
    positions never attend to the pads after them, and absolute positions are unchanged)."""
    if not ids:
        raise ConfigError("nothing to score: no token rows")
    longest = max(len(r) for r in ids)
    if longest > model.cfg.n_ctx:
        raise InvalidFactError(f"a sequence of {longest} tokens is longer than the model's context "
                               f"({model.cfg.n_ctx})")
    out = torch.full((len(ids), longest), _pad_id(model), dtype=torch.long, device="cpu")
    for i, r in enumerate(ids):
        out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long, device="cpu")
    return out.to(model.cfg.device)


def batch_tokens(model: "HookedTransformer", queries: Sequence[Query]
                 ) -> Int[Tensor, "batch pos"]:
    """The right-padded input ids (prompt + answer[:-1]) of ``queries`` on the model's device."""
    return pad_ids(model, [q.input_ids for q in queries])


def logits_at(model: "HookedTransformer", ids: Sequence[Sequence[int]],
              positions: Sequence[Sequence[int]], *, fwd_hooks: list | None = None,
              start_at_layer: int = 0, resid: Tensor | None = None
              ) -> list[Float[Tensor, "_n d_vocab"]]:
    """Logits at ``positions[i]`` of row ``ids[i]`` (one right-padded forward; only those rows
    go through the final norm and unembedding). With ``start_at_layer=L`` and ``resid`` (the
    residual stream entering block L for exactly this padded batch) only blocks L.. run. Grad
    flows when the caller enables it."""
    if len(ids) != len(positions):
        raise ConfigError(f"{len(ids)} token rows but {len(positions)} position lists")
    if not ids:
        return []
    for r, ps in zip(ids, positions):
        if any(not 0 <= p < len(r) for p in ps):
            raise ConfigError(f"position outside a row of {len(r)} tokens: {list(ps)}")
    # model.hooks() walks every hook point on exit: skip it when there is nothing to add
    bridge = is_bridge(model)
    if start_at_layer and bridge:
        raise ConfigError("start_at_layer needs a HookedTransformer: a TransformerBridge runs "
                          "Hugging Face's layer loop from the embeddings (start at 0)")
    with fast_forward(model, frozen_weights=True), \
            (model.hooks(fwd_hooks=fwd_hooks) if fwd_hooks else nullcontext()):
        if start_at_layer:
            if resid is None:
                raise ConfigError("start_at_layer needs the residual stream entering that block")
            out = model(resid, start_at_layer=start_at_layer, stop_at_layer=model.cfg.n_layers)
        elif bridge:  # no residual-stream exit: the full logits, then the rows asked for
            out = model(pad_ids(model, ids))
        else:
            out = model(pad_ids(model, ids), stop_at_layer=model.cfg.n_layers)
        rows = torch.tensor([b for b, ps in enumerate(positions) for _ in ps], device=out.device,
                            dtype=torch.long)
        cols = torch.tensor([p for ps in positions for p in ps], device=out.device,
                            dtype=torch.long)
        logits = out[rows, cols] if bridge else unembed_rows(model, out[rows, cols])
    return list(logits.split([len(ps) for ps in positions]))


def answer_logits(model: "HookedTransformer", queries: Sequence[Query], *,
                  fwd_hooks: list | None = None, start_at_layer: int = 0,
                  resid: Tensor | None = None) -> list[Float[Tensor, "_answer d_vocab"]]:
    """Logits at each query's answer positions (:func:`logits_at` on the queries' inputs)."""
    queries = list(queries)
    return logits_at(model, [q.input_ids for q in queries], [q.answer_positions for q in queries],
                     fwd_hooks=fwd_hooks, start_at_layer=start_at_layer, resid=resid)


def token_logprobs(logits: Float[Tensor, "_answer d_vocab"], answer_ids: Sequence[int]
                   ) -> Float[Tensor, "_answer"]:
    """log P(a_j) at each answer position from that query's :func:`answer_logits` rows."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.as_tensor(list(answer_ids), device=logits.device)
    return lp[torch.arange(len(ids), device=logits.device), ids]


@torch.no_grad()
def score(model: "HookedTransformer", queries: Sequence[Query], *, fwd_hooks: list | None = None,
          batch_size: int = 32, top_k: int = 0, share_rows: bool = False) -> list[AnswerScore]:
    """:class:`AnswerScore` of every query (in order). Queries are grouped by length into
    batches of ``batch_size``. ``share_rows=True``: queries with the same input tokens and
    answer positions (the true and the new object of a probe when both are one token: the same
    prompt) share one forward row -- only for hooks that treat every batch row alike (an edit's
    deltas), never for per-row interventions such as causal tracing's noise. ``top_k > 0``
    also records the top-k tokens at the first answer position. Raises NumericalError on
    non-finite logits."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    queries = list(queries)
    out: list[AnswerScore | None] = [None] * len(queries)
    users: dict[tuple, list[int]] = {}  # (input ids, answer positions) -> the queries reading it
    for i, q in enumerate(queries):
        key = (tuple(q.input_ids), tuple(q.answer_positions)) if share_rows else i
        users.setdefault(key, []).append(i)
    rows = list(users.values())
    order = sorted(range(len(rows)), key=lambda j: len(queries[rows[j][0]].input_ids))
    for s in range(0, len(order), batch_size):
        group = [rows[j] for j in order[s:s + batch_size]]
        logits = answer_logits(model, [queries[g[0]] for g in group], fwd_hooks=fwd_hooks)
        pairs = [(i, lg) for g, lg in zip(group, logits) for i in g]
        for i, lg in pairs:
            q = queries[i]
            lg = lg.float()
            if not torch.isfinite(lg).all():
                raise NumericalError(f"non-finite logits while scoring {q.prompt!r}: the model or "
                                     "an edit produced NaN/inf")
            lp = torch.log_softmax(lg, dim=-1)
            ids = torch.tensor(q.answer_ids, device=lp.device)
            tok = lp[torch.arange(q.n_answer, device=lp.device), ids]
            ranks = (lp > tok[:, None]).sum(-1)
            top_ids: tuple[int, ...] = ()
            top_p: tuple[float, ...] = ()
            if top_k:
                p, t = lp[0].exp().topk(min(top_k, lp.shape[-1]))
                top_ids, top_p = tuple(int(x) for x in t), tuple(float(x) for x in p)
            out[i] = AnswerScore(tuple(q.answer_ids), tuple(float(x) for x in tok),
                                 tuple(int(x) for x in lg.argmax(-1)),
                                 tuple(int(x) for x in ranks), top_ids, top_p)
    return out  # type: ignore[return-value]


def answer_logprobs(model: "HookedTransformer", queries: Sequence[Query], *,
                    batch_size: int = 32, fwd_hooks: list | None = None) -> Float[Tensor, "n"]:
    """log P(answer) of each query (whole multi-token answer, teacher-forced)."""
    scores = score(model, queries, fwd_hooks=fwd_hooks, batch_size=batch_size)
    return torch.tensor([s.logprob for s in scores], dtype=torch.float32, device="cpu")

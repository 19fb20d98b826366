"""Perplexity on reference prose, and QL's relative change dPPL = (PPL_after - PPL_before) / PPL_before.

QL (Sec. 2.2) samples five WikiText-2 entries per measurement; kn-lens samples ``n_slices``
non-overlapping windows of ``slice_len`` tokens from Jane Austen's novels
(:mod:`kn_lens.evaluate.reference`, installed separately), deterministically from a seed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from kn_lens import hooks
from kn_lens._fast import fast_forward
from kn_lens.backend import is_bridge
from kn_lens.errors import ConfigError, DataFileError, NumericalError
from kn_lens.evaluate.reference import reference_text

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

DEFAULT_BOOKS = ("prideprejudice", "persuasion")


@functools.lru_cache(maxsize=8)
def _tokenise(tokenizer, books: tuple[str, ...], max_chars: int | None = None) -> Tensor:
    text = reference_text(books)
    if max_chars is not None and max_chars < len(text):  # cut at a space: the tokens before the
        text = text[: text.rfind(" ", 0, max_chars) + 1 or max_chars]  # cut are the full text's
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device="cpu")


def reference_tokens(model: "HookedTransformer", books: Sequence[str] = DEFAULT_BOOKS, *,
                     min_tokens: int | None = None) -> Int[Tensor, "n"]:
    """The reference text tokenised by the model's tokenizer (no BOS). ``min_tokens``: only a
    prefix of the text that still yields at least that many tokens (the same first tokens as the
    whole text; tokenising three novels for a few thousand tokens is slow with small tokenizers)."""
    books = tuple(books)
    if min_tokens is not None:
        ids = _tokenise(model.tokenizer, books, 8 * min_tokens + 1000)
        if ids.numel() >= min_tokens + 64:
            return ids
    return _tokenise(model.tokenizer, books)


def reference_slices(model: "HookedTransformer", n_slices: int = 8, slice_len: int = 128,
                     seed: int = 0, *, books: Sequence[str] = DEFAULT_BOOKS,
                     tokens: Tensor | None = None) -> Int[Tensor, "n_slices slice_len"]:
    """``n_slices`` non-overlapping windows of the reference text, chosen by ``seed``.

    Each row is ``slice_len`` tokens; for models that use BOS the row is BOS followed by
    ``slice_len - 1`` text tokens. ``tokens`` replaces the reference text (e.g. your own corpus).
    """
    if n_slices < 1 or slice_len < 2:
        raise ConfigError(f"need n_slices >= 1 and slice_len >= 2 (got {n_slices}, {slice_len})")
    if slice_len > model.cfg.n_ctx:
        raise ConfigError(f"slice_len {slice_len} exceeds the model's context of {model.cfg.n_ctx} "
                          "tokens")
    ids = reference_tokens(model, books) if tokens is None else \
        torch.as_tensor(tokens, device="cpu").flatten()
    bos = bool(model.cfg.default_prepend_bos)
    width = slice_len - 1 if bos else slice_len
    n_windows = ids.numel() // width
    if n_windows < n_slices:
        raise DataFileError(f"the reference text has {ids.numel()} tokens: too few for {n_slices} "
                            f"windows of {width}")
    g = torch.Generator(device="cpu").manual_seed(seed)  # the same windows on every device
    starts = torch.randperm(n_windows, generator=g, device="cpu")[:n_slices].sort().values * width
    rows = torch.stack([ids[s:s + width] for s in starts.tolist()])
    if bos:
        bos_id = model.tokenizer.bos_token_id
        if bos_id is None:
            raise ConfigError("the model prepends BOS but its tokenizer has no bos_token_id")
        rows = torch.cat([torch.full((n_slices, 1), bos_id, dtype=torch.long, device="cpu"), rows],
                         dim=1)
    return rows


def _nll_sum(logits: Tensor, toks: Tensor) -> float:
    """Summed next-token NLL of ``toks`` [rows, pos] under ``logits`` [rows, pos, d_vocab]."""
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), toks[:, 1:].flatten(),
                                 reduction="sum"))


@torch.no_grad()
def token_nll(model: "HookedTransformer", token_slices: Tensor | Sequence[Tensor], *,
              fwd_hooks: list | None = None, batch_size: int = 4) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) over all rows, and the number of tokens."""
    rows = list(token_slices) if not isinstance(token_slices, Tensor) else list(token_slices)
    if not rows:
        raise ConfigError("no token slices to score")
    total, count = 0.0, 0
    device = model.cfg.device
    with torch.no_grad(), fast_forward(model, frozen_weights=True), \
            model.hooks(fwd_hooks=fwd_hooks or []):
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            lengths = {int(r.numel()) for r in chunk}
            groups = [torch.stack([r for r in chunk if r.numel() == n]) for n in sorted(lengths)]
            for toks in groups:
                toks = toks.to(device)
                total += _nll_sum(model(toks), toks)
                count += toks[:, 1:].numel()
    if count == 0:
        raise ConfigError("token slices need at least two tokens each (nothing to predict)")
    if not math.isfinite(total):
        raise NumericalError("perplexity: non-finite log-likelihood (the model or edit produced NaN/inf)")
    return total, count


def perplexity(model: "HookedTransformer", token_slices: "Tensor | Sequence[Tensor] | PreparedReference",
               *, fwd_hooks: list | None = None, batch_size: int = 4,
               start_at_layer: int = 0) -> float:
    """exp(mean next-token NLL) over every predicted token of every slice (token-weighted).

    With a :class:`PreparedReference`, ``start_at_layer=L`` reuses its cached clean residual
    stream at block ``L`` and runs only blocks ``L..``: exact for any edit that changes nothing
    below block ``L`` (the common case for KN edits; see :meth:`PreparedReference.perplexity`)."""
    if isinstance(token_slices, PreparedReference):
        return token_slices.perplexity(model, fwd_hooks=fwd_hooks, start_at_layer=start_at_layer)
    if start_at_layer:
        raise ConfigError("start_at_layer needs a PreparedReference (the cached residual stream)")
    total, count = token_nll(model, token_slices, fwd_hooks=fwd_hooks, batch_size=batch_size)
    return math.exp(total / count)


@dataclass(frozen=True, eq=False)
class PreparedReference:
    """Reference slices scored once on the unedited model: their perplexity and the clean
    residual stream entering every block, so that perplexity under an edit confined to blocks
    ``>= L`` recomputes only those blocks (``perplexity(..., start_at_layer=L)``). Built by
    :func:`prepare_reference`; tied to the model it was built on (its ``model_name`` and the
    weights at that time: do not reuse it after changing the model's weights)."""

    tokens: Int[Tensor, "n_slices slice_len"]
    ppl: float
    n_tokens: int
    resid_pre: tuple[Tensor, ...]  # per block: Float[Tensor, "n_slices slice_len d_model"];
    # empty when built on a TransformerBridge (every perplexity then runs the whole forward)
    model_name: str

    def perplexity(self, model: "HookedTransformer", *, fwd_hooks: list | None = None,
                   start_at_layer: int = 0) -> float:
        n = model.cfg.n_layers
        if self.resid_pre and len(self.resid_pre) != n:
            raise ConfigError(f"this PreparedReference was built on a model with "
                              f"{len(self.resid_pre)} layers, not {n}")
        if not 0 <= start_at_layer < n:
            raise ConfigError(f"start_at_layer must be in [0, {n}), got {start_at_layer}")
        # a TransformerBridge cannot start at a block: the whole forward (the same numbers)
        if start_at_layer == 0 or not self.resid_pre or is_bridge(model):
            total, _ = token_nll(model, self.tokens, fwd_hooks=fwd_hooks)
            return math.exp(total / self.n_tokens)
        total = 0.0
        with torch.no_grad(), fast_forward(model, frozen_weights=True), \
                model.hooks(fwd_hooks=fwd_hooks or []):
            for s in range(0, self.tokens.shape[0], 4):
                toks = self.tokens[s:s + 4].to(model.cfg.device)
                total += _nll_sum(model(self.resid_pre[start_at_layer][s:s + 4],
                                        start_at_layer=start_at_layer), toks)
        if not math.isfinite(total):
            raise NumericalError("perplexity: non-finite log-likelihood (the model or edit produced "
                                 "NaN/inf)")
        return math.exp(total / self.n_tokens)


@torch.no_grad()
def prepare_reference(model: "HookedTransformer", token_slices: Tensor) -> PreparedReference:
    """Score ``token_slices`` (from :func:`reference_slices`) once and cache the residual stream
    entering every block (n_layers x n_slices x slice_len x d_model floats: 71 MB for
    SmolLM2-135M with 8 x 128 tokens)."""
    from kn_lens.models import model_info

    toks = torch.as_tensor(token_slices, device="cpu")
    if toks.ndim != 2 or toks.shape[1] < 2:
        raise ConfigError("prepare_reference needs a [n_slices, slice_len >= 2] token tensor")
    # a TransformerBridge cannot restart at a block: it keeps no residual stream
    names = [] if is_bridge(model) else [hooks.resid_pre(l) for l in range(model.cfg.n_layers)]
    parts: dict = {nm: [] for nm in names}  # token_nll keeps the row order (equal-length rows)
    fwd = [(nm, lambda act, hook, nm=nm: parts[nm].append(act.detach())) for nm in names]
    total, count = token_nll(model, toks, fwd_hooks=fwd)
    return PreparedReference(toks, math.exp(total / count), count,
                             tuple(torch.cat(parts[nm]) for nm in names), model_info(model).name)


def relative_ppl_change(before: float, after: float) -> float:
    """QL: dPPL = (PPL_a - PPL_b) / PPL_b."""
    if before <= 0 or not math.isfinite(before):
        raise NumericalError(f"invalid perplexity before the edit: {before}")
    return (after - before) / before

"""Protocol 3, generation: greedy continuations, whether the new object appears *as text*, and
fluency (ROME's weighted bi-/tri-gram entropy).

Success compares text, not token ids: an edit that moves " Paris" (one token) away but leaves the
model writing "Paris" after a newline, or "the city of Paris", has not removed the fact. The
object counts as present when it occurs in the continuation as a whole word, case-insensitively.

Fluency (ROME ``experiments/py/eval_utils_counterfact.py``: ``n_gram_entropy``): for each text,
the entropies (bits) of its word bigram and trigram frequency distributions, weighted 2/3 and 4/3,
arithmetic mean; then the mean over texts. ROME generates 100 tokens by top-k sampling from ten
generation prompts and reports x100 (~620 for GPT-2 XL); kn-lens generates ``max_new_tokens``
greedily from the rewrite and paraphrase prompts and reports the same x100 scale, so compare
kn-lens fluencies with each other (before vs after an edit), not with ROME's table. Words are
``\\w+`` runs and single punctuation marks (ROME uses nltk's word tokenizer).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens._fast import fast_forward
from kn_lens.backend import is_bridge
from kn_lens.errors import ConfigError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def n_gram_entropy(text: str, ns: Sequence[int] = (2, 3),
                   weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy`` for one text (bits; not scaled)."""
    toks = words(text)
    ent = []
    for n in ns:
        grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        total = sum(grams.values())
        ent.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return float(sum(e * w for e, w in zip(ent, weights)) / len(ent))


def fluency(texts: Sequence[str]) -> float:
    """Mean n-gram entropy over texts, x100 (ROME's reporting scale)."""
    if not texts:
        return float("nan")
    return 100.0 * sum(n_gram_entropy(t) for t in texts) / len(texts)


def mentions(text: str, obj: str) -> bool:
    """Whether ``obj`` occurs in ``text`` as a whole word (case-insensitive)."""
    obj = obj.strip()
    if not obj:
        raise ConfigError("empty object")
    return re.search(rf"(?<!\w){re.escape(obj)}(?!\w)", text, flags=re.IGNORECASE) is not None


@torch.no_grad()
def greedy(model: "HookedTransformer", prompt_ids: Sequence[int], max_new_tokens: int, *,
           fwd_hooks: list | None = None, stop_at_eos: bool = True) -> list[int]:
    """Greedy continuation (new token ids only) with a key/value cache, under ``fwd_hooks``.
    On a TransformerBridge (no TransformerLens cache) every step reruns the whole sequence."""
    if max_new_tokens < 0:
        raise ConfigError("max_new_tokens must be >= 0")
    if len(prompt_ids) + max_new_tokens > model.cfg.n_ctx:
        max_new_tokens = max(0, model.cfg.n_ctx - len(prompt_ids))
    eos = getattr(model.tokenizer, "eos_token_id", None)
    cache = _cache(model, 1)
    toks = torch.tensor([list(prompt_ids)], device=model.cfg.device)
    out: list[int] = []
    with fast_forward(model, frozen_weights=True), \
            model.hooks(fwd_hooks=fwd_hooks or []):
        for _ in range(max_new_tokens):
            logits = _next_logits(model, toks, None, cache)[0]
            nxt = int(logits.argmax())
            out.append(nxt)
            if stop_at_eos and eos is not None and nxt == eos:
                break
            new = torch.tensor([[nxt]], device=model.cfg.device)
            toks = new if cache is not None else torch.cat([toks, new], dim=1)
    return out


def _cache(model, rows: int):
    """A TransformerLens key/value cache for ``rows`` sequences, or None on a TransformerBridge
    (its forward has no TransformerLens cache: generation reruns the whole sequence)."""
    if is_bridge(model):
        return None
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, rows)


def _next_logits(model, x: Tensor, mask: Tensor | None, cache) -> Float[Tensor, "batch d_vocab"]:
    """Logits at the last position: ``x`` holds only the new tokens when a ``cache`` holds the
    rest, else the whole sequences (``mask`` covers every position either way)."""
    if cache is None:
        return model(x, attention_mask=mask)[:, -1]
    return model(x, attention_mask=mask, past_kv_cache=cache)[:, -1]


@torch.no_grad()
def greedy_batch(model: "HookedTransformer", prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 *, fwd_hooks: list | None = None, batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations of many prompts at once: left-padded, with an attention mask and a
    key/value cache (TransformerLens' own padded-generation path), one forward per new token for
    the whole batch. Equal to :func:`greedy` per prompt up to float rounding (tested). Rows stop
    after EOS (the rest of their continuation is dropped). On a TransformerBridge every step
    reruns the whole left-padded batch with its mask (the same tokens, tested)."""
    if max_new_tokens < 0:
        raise ConfigError("max_new_tokens must be >= 0")
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    if any(not p for p in prompts):
        raise ConfigError("empty prompt")
    eos = getattr(model.tokenizer, "eos_token_id", None)
    pad = getattr(model.tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    dev = model.cfg.device
    outs: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rows = [prompts[i] for i in idx]
        width = max(len(r) for r in rows)
        steps = min(max_new_tokens, model.cfg.n_ctx - width)
        if steps <= 0:
            continue
        toks = torch.full((len(rows), width), pad, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
        for b, r in enumerate(rows):
            toks[b, width - len(r):] = torch.tensor(r, device="cpu")
            mask[b, width - len(r):] = 1
        cache = _cache(model, len(rows))
        done = [False] * len(rows)
        x, m = toks.to(dev), mask.to(dev)
        with fast_forward(model, frozen_weights=True), \
                model.hooks(fwd_hooks=fwd_hooks or []):
            for _ in range(steps):
                nxt = _next_logits(model, x, m, cache).argmax(-1)
                for b, (i, t) in enumerate(zip(idx, nxt.tolist())):
                    if not done[b]:
                        outs[i].append(t)
                        done[b] = eos is not None and t == eos
                if all(done):
                    break
                ones = torch.ones((len(rows), 1), dtype=torch.long, device=dev)
                if cache is not None:
                    x, m = nxt[:, None], ones
                else:
                    x, m = torch.cat([x, nxt[:, None]], 1), torch.cat([m, ones], 1)
    return outs


def continue_text(model: "HookedTransformer", prompt_ids: Sequence[int], max_new_tokens: int, *,
                  fwd_hooks: list | None = None) -> str:
    return model.tokenizer.decode(greedy(model, prompt_ids, max_new_tokens, fwd_hooks=fwd_hooks),
                                  skip_special_tokens=True)


def continue_texts(model: "HookedTransformer", prompts: Sequence[Sequence[int]],
                   max_new_tokens: int, *, fwd_hooks: list | None = None) -> list[str]:
    """Greedy continuations of many prompts (batched, :func:`greedy_batch`), decoded."""
    return [model.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in greedy_batch(model, prompts, max_new_tokens, fwd_hooks=fwd_hooks)]

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
    """Greedy continuation (new token ids only) with a key/value cache, under ``fwd_hooks``."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    if max_new_tokens < 0:
        raise ConfigError("max_new_tokens must be >= 0")
    if len(prompt_ids) + max_new_tokens > model.cfg.n_ctx:
        max_new_tokens = max(0, model.cfg.n_ctx - len(prompt_ids))
    eos = getattr(model.tokenizer, "eos_token_id", None)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    toks = torch.tensor([list(prompt_ids)], device=model.cfg.device)
    out: list[int] = []
    with model.hooks(fwd_hooks=fwd_hooks or []):
        for _ in range(max_new_tokens):
            logits = model(toks, past_kv_cache=cache)[0, -1]
            nxt = int(logits.argmax())
            out.append(nxt)
            if stop_at_eos and eos is not None and nxt == eos:
                break
            toks = torch.tensor([[nxt]], device=model.cfg.device)
    return out


def continue_text(model: "HookedTransformer", prompt_ids: Sequence[int], max_new_tokens: int, *,
                  fwd_hooks: list | None = None) -> str:
    return model.tokenizer.decode(greedy(model, prompt_ids, max_new_tokens, fwd_hooks=fwd_hooks),
                                  skip_special_tokens=True)

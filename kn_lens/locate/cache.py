"""The per-query score cache: a locator's ``NeuronScores`` of a query, computed once.

One item per (model, locator, locator version, config, prompt, answer ids) in a
:class:`kn_lens.cache.ItemCache` (:func:`score_key`): a changed input, or a locator whose numbers
changed (``kn_lens.locate.method_version`` bumped), is a different item and is computed again,
never a stale hit. Items hold the score maps as computed (float32, ``per_token`` and ``extras``
included), so a cached result equals the fresh one exactly and an analysis gives the same numbers
whether its scores came from the cache or not. Each query is stored as soon as it is computed: a
killed run loses at most the query in progress.

    scores = scores_for_facts(model, dataset, facts, "ig", cache_dir="results/cache")
    # {fact: [NeuronScores of template 0, 1, ...]}
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from kn_lens.cache import ItemCache
from kn_lens.facts import Fact, Query
from kn_lens.neurons import NeuronScores

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["score_key", "cached_scores", "scores_for_facts", "method_config", "mean_seconds"]

FORMAT = 3  # of a stored item (2: the experiment scripts' float16 per-fact files)


def method_config(method: str, **changes: Any) -> Any:
    """Locator ``method``'s config: the library defaults (the papers' settings) with ``changes``."""
    from kn_lens.locate import get_method

    return get_method(method)[1](**changes)


def score_key(model: "HookedTransformer", method: str, config: Any, query: Query) -> str:
    """The item key of ``query``'s scores: model identity (:func:`kn_lens.models.model_info`,
    weight processing included), locator, its version, config, prompt and answer token ids."""
    from kn_lens.locate import method_version
    from kn_lens.models import model_info

    return ItemCache.key(kind="scores", format=FORMAT, model=model_info(model), method=method,
                         version=method_version(method), config=config, prompt=query.prompt,
                         answer=list(query.answer_ids))


def _as_cache(cache: ItemCache | str | os.PathLike | None) -> ItemCache | None:
    return cache if cache is None or isinstance(cache, ItemCache) else ItemCache(cache)


def cached_scores(model: "HookedTransformer", queries: Sequence[Query], method: str, *,
                  config: Any = None, cache: ItemCache | str | os.PathLike | None = None
                  ) -> list[NeuronScores]:
    """``locate(model, query, method, config)`` for each query, through ``cache`` (an
    :class:`~kn_lens.cache.ItemCache` or its folder; None: no cache). ``config`` None: the
    locator's defaults. Freshly computed scores carry ``extras["seconds"]`` (this run's time);
    cached ones the extras stored with them and ``extras["cached"] = True``."""
    from kn_lens.locate import locate  # looked up per call: tests may stand in for it
    from kn_lens.models import model_info

    config = method_config(method) if config is None else config
    cache = _as_cache(cache)
    out = []
    for q in queries:
        key = None if cache is None else score_key(model, method, config, q)
        item = None if key is None else cache.load(key)
        if item is not None:
            out.append(NeuronScores(item["scores"], method, q, config, model_info(model),
                                    item["per_token"], {**item["extras"], "cached": True}))
            continue
        t0 = time.perf_counter()
        (s,) = locate(model, [q], method=method, config=config, progress=False)
        seconds = time.perf_counter() - t0
        if key is not None:
            cache.save(key, {"format": FORMAT, "method": method, "prompt": q.prompt,
                             "scores": s.scores.detach().cpu(),
                             "per_token": None if s.per_token is None
                             else s.per_token.detach().cpu(),
                             "extras": dict(s.extras), "seconds": seconds})
        s.extras["seconds"] = seconds
        out.append(s)
    return out


def scores_for_facts(model: "HookedTransformer", dataset, facts: Sequence[Fact], method: str, *,
                     config: Any = None, cache_dir: str | os.PathLike | ItemCache | None = None,
                     progress: bool = False, log: Callable[[str], None] = print
                     ) -> dict[Fact, list[NeuronScores]]:
    """``{fact: [NeuronScores per template of its relation]}`` for locator ``method`` (the QL
    neighbour queries q_1..q_k of each fact), through the cache in ``cache_dir`` (None: none).
    ``progress`` logs one line per fact that needed computing."""
    from kn_lens.facts import queries_for_fact

    cache = _as_cache(cache_dir)
    out: dict[Fact, list[NeuronScores]] = {}
    for i, fact in enumerate(facts):
        queries = queries_for_fact(model, fact, dataset.relation_of(fact))
        out[fact] = cached_scores(model, queries, method, config=config, cache=cache)
        secs = [s.extras["seconds"] for s in out[fact] if not s.extras.get("cached")]
        if progress and secs:
            log(f"  [{method}] {i + 1}/{len(facts)} {fact.key()} {sum(secs):.1f} s")
    return out


def mean_seconds(scores: Mapping[Fact, Sequence[NeuronScores]]) -> float | None:
    """Mean seconds per query computed in this run (None: every query came from the cache)."""
    secs = [s.extras["seconds"] for seq in scores.values() for s in seq
            if not s.extras.get("cached")]
    return sum(secs) / len(secs) if secs else None

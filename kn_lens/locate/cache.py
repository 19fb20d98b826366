"""The per-query score cache: a locator's ``NeuronScores`` of a query, computed once, through a
sweep.

Each query's scores are one ``locate`` work item (:func:`kn_lens.sweep.locate_items`) in a
:class:`kn_lens.sweep.ResultStore`, keyed by everything that determines them
(:attr:`kn_lens.sweep.WorkItem.key`: the model's identity, the locator and its version, the config
with every field, the prompt and the answer's token ids): a changed input, or a locator whose
numbers changed (``kn_lens.locate.method_version`` bumped), is a different item and is computed
again, never a stale hit. The missing items are computed by one :func:`kn_lens.sweep.sweep`
(``sweep_config``: in-process by default, or a local pool / Ray / one shard), each stored as soon
as it is computed (float32, ``per_token`` and ``extras`` included, so a stored score equals the
fresh one exactly): a killed run loses at most the items in progress, and a rerun computes only
what is missing.

    scores = scores_for_facts(model, dataset, facts, "ig", store="results/sweeps")
    # {fact: [NeuronScores of template 0, 1, ...]}

Every returned score carries ``extras["seconds"]`` (its compute time, from the store's index) and,
when it was stored before this call, ``extras["cached"] = True``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from kn_lens.facts import Fact, Query
from kn_lens.neurons import NeuronScores

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from kn_lens.sweep import ResultStore, SweepConfig

__all__ = ["cached_scores", "locate_many", "scores_for_facts", "scores_for_methods",
           "method_config", "mean_seconds", "open_store"]


def method_config(method: str, **changes: Any) -> Any:
    """Locator ``method``'s config: the library defaults (the papers' settings) with ``changes``."""
    from kn_lens.locate import get_method

    return get_method(method)[1](**changes)


@contextlib.contextmanager
def open_store(store: "ResultStore | str | os.PathLike | None") -> Iterator["ResultStore"]:
    """``store`` as an open :class:`~kn_lens.sweep.ResultStore` (a folder is opened, or created,
    and closed after; None: a temporary store, deleted after)."""
    from kn_lens.sweep import ResultStore

    if isinstance(store, ResultStore):
        yield store
        return
    with contextlib.ExitStack() as stack:
        if store is None:
            store = stack.enter_context(tempfile.TemporaryDirectory(prefix="kn-lens-store-"))
        st = stack.enter_context(ResultStore(store))
        yield st


def locate_many(model: "HookedTransformer", jobs: Sequence[tuple[str, Any, Sequence[Query]]], *,
                store: "ResultStore | str | os.PathLike | None" = None,
                sweep_config: "SweepConfig | None" = None, progress: bool = False,
                log: Callable[[str], None] = print) -> list[list[NeuronScores]]:
    """The scores of every ``(method, config, queries)`` job (config None: the locator's
    defaults), through ``store``, every missing item computed by one sweep."""
    from kn_lens.sweep import SweepConfig, locate_items, sweep_results

    items = [locate_items(model, qs, m, method_config(m) if cfg is None else cfg)
             for m, cfg, qs in jobs]
    flat = [it for its in items for it in its]
    if not flat:
        return [[] for _ in jobs]
    with open_store(store) as st:
        before = st.done_keys(it.key for it in flat)
        scores = sweep_results(flat, st, config=sweep_config or SweepConfig(), model=model,
                               progress=progress, log=log)
        seconds = {k: st.record(k).seconds for k in {it.key for it in flat}}
    out, i = [], 0
    for its in items:
        group = []
        for it in its:
            s = scores[i]
            i += 1
            s.extras["seconds"] = seconds[it.key]
            if it.key in before:
                s.extras["cached"] = True
            group.append(s)
        out.append(group)
    return out


def cached_scores(model: "HookedTransformer", queries: Sequence[Query], method: str, *,
                  config: Any = None, store: "ResultStore | str | os.PathLike | None" = None,
                  sweep_config: "SweepConfig | None" = None, progress: bool = False,
                  log: Callable[[str], None] = print) -> list[NeuronScores]:
    """``locate(model, query, method, config)`` for each query, through ``store`` (a
    :class:`~kn_lens.sweep.ResultStore` or its folder; None: a temporary one). ``config`` None:
    the locator's defaults. See the module doc for ``extras``."""
    return locate_many(model, [(method, config, queries)], store=store, sweep_config=sweep_config,
                       progress=progress, log=log)[0]


def scores_for_methods(model: "HookedTransformer", dataset, facts: Sequence[Fact],
                       methods: Mapping[str, Any], *,
                       store: "ResultStore | str | os.PathLike | None" = None,
                       sweep_config: "SweepConfig | None" = None, progress: bool = False,
                       log: Callable[[str], None] = print
                       ) -> dict[str, dict[Fact, list[NeuronScores]]]:
    """``{method: {fact: [NeuronScores per template of its relation]}}`` for every locator of
    ``methods`` (name -> config, None: its defaults) on the QL neighbour queries q_1..q_k of each
    fact, every missing item computed by one sweep."""
    from kn_lens.facts import queries_for_fact

    per_fact = [queries_for_fact(model, f, dataset.relation_of(f)) for f in facts]
    flat = [q for qs in per_fact for q in qs]
    located = locate_many(model, [(m, cfg, flat) for m, cfg in methods.items()], store=store,
                          sweep_config=sweep_config, progress=progress, log=log)
    out: dict[str, dict[Fact, list[NeuronScores]]] = {}
    for m, scores in zip(methods, located):
        it = iter(scores)
        out[m] = {f: [next(it) for _ in qs] for f, qs in zip(facts, per_fact)}
    return out


def scores_for_facts(model: "HookedTransformer", dataset, facts: Sequence[Fact], method: str, *,
                     config: Any = None, store: "ResultStore | str | os.PathLike | None" = None,
                     sweep_config: "SweepConfig | None" = None, progress: bool = False,
                     log: Callable[[str], None] = print) -> dict[Fact, list[NeuronScores]]:
    """``{fact: [NeuronScores per template of its relation]}`` for locator ``method``
    (:func:`scores_for_methods` with one locator)."""
    return scores_for_methods(model, dataset, facts, {method: config}, store=store,
                              sweep_config=sweep_config, progress=progress, log=log)[method]


def mean_seconds(scores: Mapping[Fact, Sequence[NeuronScores]]) -> float | None:
    """Mean seconds per query computed in this run (None: every query was stored before)."""
    secs = [s.extras["seconds"] for seq in scores.values() for s in seq
            if not s.extras.get("cached")]
    return sum(secs) / len(secs) if secs else None

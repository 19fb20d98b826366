"""Sweeps: many work items (model, method, config, fact, template), each computed once and stored.

A sweep is a list of :class:`WorkItem` s (built by :func:`locate_items`, :func:`analysis_items`,
:func:`edit_items`, :func:`known_item`, or by hand for a kind of your own,
:func:`register_kind`). :func:`sweep` computes the items a :class:`ResultStore` lacks (and
:func:`sweep_results` loads them all back), with an executor chosen by
``SweepConfig.backend``: ``inprocess`` (default), ``pool`` (local processes) or ``ray`` (a
local Ray or a cluster); ``shard=(i, n)`` takes a fixed share of the items for users without
Ray. Each result is stored once under a key made of everything that determines it, written
atomically; a killed sweep resumes with nothing lost and nothing computed twice, and sweeps
sharing a store never compute the same item. Results are listed and loaded back by key or by
filter (``store.query(kind=..., method=..., relation=...)``; the index is a SQLite file).

``kn-lens sweep SPEC`` runs a sweep described by a JSON file (:mod:`kn_lens.sweep.specfile`).
"""
from kn_lens.sweep.items import (EditJob, ItemKind, KNModificationJob, KnownJob, ReferenceSpec,
                                 WorkItem, kn_modification_items,
                                 analysis_items, available_analyses, available_kinds, canonical,
                                 edit_items, fact_queries, get_kind, known_item, locate_items,
                                 register_analysis, register_kind)
from kn_lens.sweep.kinds import CompactScores, EditOutcome
from kn_lens.sweep.modelspec import ModelSpec, weights_fingerprint
from kn_lens.sweep.run import (BACKENDS, SkippedItem, SweepConfig, SweepResult, parse_shard,
                               shard_of, sweep, sweep_results)
from kn_lens.sweep.store import Record, ResultStore

__all__ = [
    "EditJob", "ItemKind", "KNModificationJob", "kn_modification_items", "KnownJob", "ReferenceSpec", "WorkItem", "analysis_items",
    "available_analyses", "available_kinds", "canonical", "edit_items", "fact_queries", "get_kind",
    "known_item", "locate_items",
    "register_analysis", "register_kind", "CompactScores", "EditOutcome", "ModelSpec",
    "weights_fingerprint", "BACKENDS", "SkippedItem", "SweepConfig", "SweepResult", "parse_shard",
    "shard_of", "sweep", "sweep_results", "Record", "ResultStore",
]

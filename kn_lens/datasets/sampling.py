"""Seeded fact samples for analyses and benchmarks: one helper, :func:`sample_facts`.

Two strategies, each a different question:

- ``"shuffle"`` (the Query Localization sample): the candidate facts shuffled with
  ``random.Random(seed)``, the first ``n`` the model knows taken. The sample follows what the model
  knows, and it is nested: the first ``n`` facts of a larger sample are the smaller sample (so
  further facts, e.g. out-of-scope locality facts, never overlap it).
- ``"balanced"`` (the editing benchmark, TNF-DA, FiNE, ROME tracing, the study): the known
  candidates grouped by relation, relations with fewer than ``min_per_relation`` left out
  (``n_relations``: keep the largest), each relation's list shuffled with one
  ``random.Random(seed)`` (relations by size, then id) and cut to ``per_relation``, then taken
  round robin until ``n`` (``n=None``: all of them, i.e. up to ``per_relation`` per relation).

Candidates: the dataset's facts whose relation has at least ``min_templates`` templates and, with
``max_answer_tokens``, whose answer has at most that many tokens. A fact is *known* when the
model ranks its answer's first token top-1 on >= 60 % of its relation's templates
(:func:`kn_lens.datasets.known_facts`). Known verdicts come from ``known`` (a saved
:class:`KnownFacts` of this model, e.g. ``results/known_facts_<model>.json``) when it covers the
candidates with the dataset's templates; otherwise they are scored here: ``"shuffle"`` in chunks of
``batch_size`` along the shuffled candidates until ``n`` are found, ``"balanced"`` on the first
``candidates_per_relation`` facts of each relation (default ``max(8, 3 n / relations)``).
``known_only=False`` skips the filter (random test models know nothing).

Each sampled fact comes with a template index: its best-ranked template (highest P(answer)) when
known verdicts are used, else 0.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import Fact

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from kn_lens.datasets.core import Dataset
    from kn_lens.datasets.known import KnownFacts

__all__ = ["FactSample", "sample_facts", "STRATEGIES"]

STRATEGIES = ("shuffle", "balanced")


@dataclass(frozen=True)
class FactSample:
    """The sampled facts (in sample order), each with its template index, and how they were drawn
    (``known``: "saved" verdicts, "scored" here, or "off" without the known filter)."""

    facts: tuple[Fact, ...]
    templates: tuple[int, ...]
    strategy: str
    seed: int
    n_requested: int | None  # None: up to per_relation from every relation
    known: Literal["saved", "scored", "off"]

    def __len__(self) -> int:
        return len(self.facts)

    def pairs(self) -> list[tuple[Fact, int]]:
        """``[(fact, template index), ...]``."""
        return list(zip(self.facts, self.templates))


def _answer_tokens(model: "HookedTransformer", fact: Fact) -> int:
    from kn_lens.facts import encode_answer

    return len(encode_answer(model.tokenizer, " " + fact.object))


def _covers(known: "KnownFacts", model: "HookedTransformer", dataset: "Dataset",
            pool: Sequence[Fact]) -> bool:
    """Whether ``known`` is a verdict of this model on every candidate, with the dataset's
    templates (a fact it could not tokenise counts as covered: it is not known)."""
    from kn_lens.models import model_info

    if known.model.name != model_info(model).name:
        return False
    have = set(known.facts) | {key for key, _ in known.skipped}
    if any(f not in have and f.key() not in have for f in pool):
        return False
    return all(tuple(known.templates.get(r, ())) == tuple(dataset.relation(r).templates)
               for r in {f.relation for f in pool})


def _best_templates(known: "KnownFacts") -> dict[Fact, int]:
    """Known facts -> their best template."""
    return {f: known.best_template(i) for i, f in enumerate(known.facts) if known.known[i]}


def sample_facts(model: "HookedTransformer", dataset: "Dataset", n: int | None, *, seed: int,
                 strategy: Literal["shuffle", "balanced"] = "shuffle", known_only: bool = True,
                 known: "KnownFacts | None" = None, min_templates: int = 1,
                 max_answer_tokens: int | None = None, n_relations: int | None = None,
                 min_per_relation: int = 2, per_relation: int | None = None,
                 batch_size: int = 64, candidates_per_relation: int | None = None) -> FactSample:
    """``n`` facts of ``dataset`` drawn with ``strategy`` (see the module doc), seeded by ``seed``.

    Fewer than ``n`` (with a warning) when fewer qualify; raises InvalidFactError when none do.
    ``max_answer_tokens`` None or 0: any answer length. ``n_relations``, ``min_per_relation`` and
    ``per_relation`` apply to ``"balanced"`` only; ``n=None`` needs ``per_relation``.
    """
    from kn_lens.datasets.known import known_facts

    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown sampling strategy {strategy!r}: choose from {STRATEGIES}")
    if n is None and (strategy != "balanced" or per_relation is None):
        raise ConfigError("n=None (every relation up to per_relation) needs strategy='balanced' "
                          "and per_relation")
    if (n is not None and n < 1) or min_templates < 1 or min_per_relation < 1 or batch_size < 1:
        raise ConfigError("sample_facts needs n, min_templates, min_per_relation, batch_size >= 1")
    for name, value in (("n_relations", n_relations), ("per_relation", per_relation)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 (or None for no limit), got {value}")
    pool = [f for f in dataset.facts if len(dataset.relation_of(f).templates) >= min_templates]
    if max_answer_tokens:
        pool = [f for f in pool if _answer_tokens(model, f) <= max_answer_tokens]
    best: dict[Fact, int] | None = None  # known facts -> best template
    source = "off"
    if known_only and known is not None:
        if _covers(known, model, dataset, pool):
            best, source = _best_templates(known), "saved"
        else:
            warnings.warn("the known-facts record given does not cover these facts with this "
                          "model and the dataset's templates: scoring them here", stacklevel=2)
    rng = random.Random(seed)
    if strategy == "shuffle":
        rng.shuffle(pool)
        if not known_only:
            picked = [(f, 0) for f in pool[:n]]
        else:
            if best is None:  # score in chunks along the shuffled pool until n are known
                best, source = {}, "scored"
                found = 0
                for s in range(0, len(pool), batch_size):
                    chunk = _best_templates(known_facts(model, pool[s:s + batch_size], dataset))
                    best.update(chunk)
                    found += len(chunk)
                    if found >= n:
                        break
            picked = [(f, best[f]) for f in pool if f in best][:n]
    else:
        if not known_only:
            cands = [(f, 0) for f in pool]
        else:
            if best is None:
                per_rel = candidates_per_relation or max(
                    8, 3 * (n or 0) // max(1, len(dataset.relations)), per_relation or 0)
                keep = set(pool)
                scored = [f for f in dataset.filter(limit_per_relation=per_rel).facts if f in keep]
                best, source = _best_templates(known_facts(model, scored, dataset)), "scored"
            cands = [(f, best[f]) for f in pool if f in best]
        by_rel: dict[str, list[tuple[Fact, int]]] = {}
        for f, t in cands:
            by_rel.setdefault(f.relation, []).append((f, t))
        rels = sorted((r for r in by_rel if len(by_rel[r]) >= min_per_relation),
                      key=lambda r: (-len(by_rel[r]), r))[:n_relations]
        for r in rels:
            rng.shuffle(by_rel[r])
            by_rel[r] = by_rel[r][:per_relation]
        wanted = sum(len(by_rel[r]) for r in rels) if n is None else n
        picked = []
        i = 0
        while len(picked) < wanted and any(i < len(by_rel[r]) for r in rels):
            picked += [by_rel[r][i] for r in rels if i < len(by_rel[r])][: wanted - len(picked)]
            i += 1
    if not picked:
        raise InvalidFactError(
            f"no facts to sample from {dataset.name!r}: "
            + ("the model knows none of the candidates (known_only=False skips the filter)"
               if known_only else "no fact meets the template / answer-length conditions"))
    if n is not None and len(picked) < n:
        warnings.warn(f"only {len(picked)} facts qualify (asked for {n})", stacklevel=2)
    return FactSample(tuple(f for f, _ in picked), tuple(t for _, t in picked), strategy, seed, n,
                      source)

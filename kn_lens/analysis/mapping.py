"""Query-KN mapping demonstration of the Query Localization paper (QL §3.1, eq. 3, Fig. 4).

For a query q_i of a fact with neighbour queries q_1..q_k and KN sets N_1..N_k, QL suppresses or
enhances the activations of

  - "self": the query's own KNs N_i, and
  - the neighbour KNs N_i^N built from the *other* queries' sets (j != i), eq. 3:
      "union":        ∪_{j≠i} N_j
      "intersection": ∩_{j≠i} N_j
      "refine":       {n in ∪_{j≠i} N_j : Σ_{j≠i} 1[n ∈ N_j] > 1}

and measures the change of the answer probability, ΔProb = ±(P_a − P_b)/P_b ("+" for
enhancement, "−" for suppression, so both are positive when the neurons matter); "Avg" is the mean
of the two. Suppression multiplies activations by 0 and enhancement by 2, as in Dai et al. 2022
(whose settings QL follows).

Positions: Dai et al.'s reference implementation (EleutherAI ``knowledge-neurons``, ``Patch``)
scales the neurons only at the position that predicts the answer (the [MASK] / last prompt token).
The default here, ``positions="answer"``, scales at every answer-predicting position of the
teacher-forced answer: for a single-token answer that is exactly Dai et al.'s position, and for a
multi-token answer it matches where ``kn_lens.locate`` scores neurons (KNE eq. 4, per answer
token). ``"last"`` scales only at the last prompt token; ``"all"`` at every position.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from kn_lens import hooks
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import Fact, Query, answer_probs
from kn_lens.models import ModelInfo, model_info
from kn_lens.neurons import NeuronScores, NeuronSet, intersection, union

__all__ = ["MappingConfig", "neighbour_sets", "QueryMapping", "MappingSummary", "MappingResult",
           "query_kn_mapping", "queries_and_sets_from_scores", "scaled_probs"]

SET_KINDS = ("self", "union", "intersection", "refine")


@dataclass(frozen=True, kw_only=True)
class MappingConfig:
    suppress_factor: float = 0.0  # QL §3.1 "suppress" (Dai et al. 2022: set activation to 0)
    enhance_factor: float = 2.0  # QL §3.1 "enhance" (Dai et al. 2022: double the activation)
    positions: Literal["answer", "last", "all"] = "answer"  # Dai et al.: the answer-predicting position
    refine_min_count: int = 2  # QL eq. 3 "refine": Σ 1[n ∈ N_j] > 1
    kinds: tuple[str, ...] = SET_KINDS
    batched: bool = True  # all variants of a query in one forward (same numbers as one by one
    #                       with hooks.scale_neurons, up to float rounding; tested)

    def __post_init__(self) -> None:
        if self.positions not in ("last", "answer", "all"):
            raise ConfigError(f"positions must be 'last', 'answer' or 'all', not {self.positions!r}")
        bad = [k for k in self.kinds if k not in SET_KINDS]
        if bad:
            raise ConfigError(f"unknown set kinds {bad}; choose from {SET_KINDS}")
        if self.refine_min_count < 2:
            raise ConfigError("refine_min_count must be >= 2")


def neighbour_sets(sets: Sequence[NeuronSet], i: int, *,
                   refine_min_count: int = 2) -> dict[str, NeuronSet]:
    """QL eq. 3: the sets suppressed/enhanced for query i — its own N_i and the union,
    intersection and refinement of the other queries' sets."""
    sets = list(sets)
    if len(sets) < 2:
        raise InvalidFactError("the query-KN mapping needs at least 2 neighbour queries per fact")
    if not 0 <= i < len(sets):
        raise IndexError(f"query index {i} out of range for {len(sets)} sets")
    others = [s for j, s in enumerate(sets) if j != i]
    counts = Counter(n for s in others for n in s)
    return {
        "self": sets[i],
        "union": union(others),
        "intersection": intersection(others),
        "refine": NeuronSet(n for n, c in counts.items() if c >= refine_min_count),
    }


@dataclass(frozen=True)
class QueryMapping:
    """Per-query numbers: P before, and for each set kind its size and the relative change
    (P_a − P_b)/P_b under suppression and enhancement."""

    fact: Fact
    query_index: int
    prompt: str
    p_before: float
    sizes: dict  # kind -> |set|
    rel_suppress: dict  # kind -> (P_a − P_b)/P_b with factor suppress_factor
    rel_enhance: dict  # kind -> (P_a − P_b)/P_b with factor enhance_factor
    group: str | None = None  # e.g. "K_I" / "K_II"

    def delta_prob(self, kind: str) -> dict:
        """QL's signed ΔProb: Sup = −rel, Enh = +rel, Avg = their mean."""
        sup, enh = -self.rel_suppress[kind], self.rel_enhance[kind]
        return {"Sup": sup, "Enh": enh, "Avg": (sup + enh) / 2}


@dataclass(frozen=True)
class MappingSummary:
    group: str  # "all", "K_I", "K_II", ...
    kind: str
    n_queries: int
    n_empty: int  # queries whose set of this kind was empty (ΔProb = 0 exactly)
    mean_size: float
    sup: float  # mean of −(P_a − P_b)/P_b under suppression (QL Fig. 4 "Sup")
    enh: float  # mean of +(P_a − P_b)/P_b under enhancement ("Enh")
    avg: float  # (sup + enh) / 2 ("Avg")


@dataclass(frozen=True)
class MappingResult:
    queries: tuple[QueryMapping, ...]
    summary: tuple[MappingSummary, ...]
    config: MappingConfig
    model: ModelInfo | None = None
    extras: dict = field(default_factory=dict, compare=False)

    def get(self, kind: str = "self", group: str = "all") -> MappingSummary:
        for s in self.summary:
            if s.kind == kind and s.group == group:
                return s
        raise KeyError(f"no summary for kind={kind!r}, group={group!r}")

    def table(self) -> list[dict]:
        return [{"group": s.group, "set": s.kind, "n": s.n_queries, "empty": s.n_empty,
                 "mean |set|": round(s.mean_size, 1), "Sup": round(s.sup, 4),
                 "Enh": round(s.enh, 4), "Avg": round(s.avg, 4)} for s in self.summary]

    def to_markdown(self) -> str:
        from kn_lens.analysis.consistency import markdown_table

        return markdown_table(self.table())

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "model": None if self.model is None else self.model.to_dict(),
            "queries": [{"fact": asdict(q.fact), "query_index": q.query_index, "prompt": q.prompt,
                         "group": q.group, "p_before": q.p_before, "sizes": q.sizes,
                         "rel_suppress": q.rel_suppress, "rel_enhance": q.rel_enhance}
                        for q in self.queries],
            "summary": [asdict(s) for s in self.summary],
        }


def _positions(query: Query, mode: str):
    if mode == "all":
        return None
    if mode == "last":
        return query.last_position
    return list(query.answer_positions)


def _prob(model, query: Query, neurons: NeuronSet | None, factor: float, mode: str) -> float:
    fwd = [] if neurons is None or not len(neurons) else hooks.scale_neurons(
        neurons, factor, positions=_positions(query, mode))
    return float(answer_probs(model, [query], fwd_hooks=fwd)[0])


def _row_scaling_hooks(variants: Sequence[tuple[NeuronSet, float]], n_rows: int, positions,
                       d_mlp: int) -> list:
    """Per-row neuron scaling: row r + 1 scales ``variants[r]`` neurons by its factor (row 0 is the
    clean run). One hook per layer that any variant touches."""
    per_layer: dict[int, torch.Tensor] = {}
    for r, (ns, factor) in enumerate(variants):
        for n in ns:
            mult = per_layer.setdefault(n.layer, torch.ones(n_rows, d_mlp, device="cpu"))
            mult[r + 1, n.index] = factor
    pos = slice(None) if positions is None else (
        [positions] if isinstance(positions, int) else list(positions))
    out = []
    for layer, mult in sorted(per_layer.items()):
        def fn(act, hook, mult=mult):
            act = act.clone()
            m = mult.to(act.device, act.dtype)[:, None, :]
            act[:, pos] = act[:, pos] * m
            return act

        out.append((hooks.mlp_post(layer), fn))
    return out


def scaled_probs(model, query: Query, variants: Sequence[tuple[NeuronSet, float]], *,
                 positions=None) -> list[float]:
    """P(answer) of ``query`` unedited and with each variant's neurons scaled by its factor
    (``[p_clean, p_variant_1, ...]``), all in one batched forward (row r + 1 scales variant r).
    ``positions``: the positions scaled (None: every position; an int or a list)."""
    fwd = _row_scaling_hooks(variants, len(variants) + 1, positions, model.cfg.d_mlp)
    return answer_probs(model, [query] * (len(variants) + 1), fwd_hooks=fwd,
                        batch_size=len(variants) + 1).tolist()


def _query_probs(model, q: Query, cand: dict, config: MappingConfig) -> tuple[float, dict, dict]:
    """P before and P after each (kind, factor) variant for one query."""
    pos = _positions(q, config.positions)
    kinds = [k for k in config.kinds if len(cand[k])]
    factors = (config.suppress_factor, config.enhance_factor)
    variants = [(cand[k], f) for k in kinds for f in factors]
    if config.batched:
        probs = scaled_probs(model, q, variants, positions=pos)
    else:
        probs = [_prob(model, q, None, 1.0, config.positions)]
        probs += [_prob(model, q, ns, f, config.positions) for ns, f in variants]
    p_b = probs[0]
    sup, enh = {}, {}
    for i, k in enumerate(kinds):
        sup[k], enh[k] = probs[1 + 2 * i], probs[2 + 2 * i]
    return p_b, sup, enh


def query_kn_mapping(model, queries: Mapping[Fact, Sequence[Query]],
                     kn_sets: Mapping[Fact, Sequence[NeuronSet]], *,
                     config: MappingConfig = MappingConfig(),
                     groups: Mapping[Fact, str] | None = None) -> MappingResult:
    """QL §3.1: for every query of every fact, suppress (x0) / enhance (x2) its own KNs and the
    neighbour sets of eq. 3, and record the relative change of P(answer).

    ``queries[fact][i]`` must be the query whose KN set is ``kn_sets[fact][i]`` (same order, at
    least two per fact). ``groups`` (e.g. ``ConsistencyResult.labels["static"]``) splits the
    summary by K_I / K_II as in QL Fig. 4; facts missing from ``groups`` count only in "all".
    An empty set is a no-op (relative change exactly 0); ``n_empty`` reports how often.
    """
    if not queries:
        raise InvalidFactError("query_kn_mapping needs at least one fact")
    records: list[QueryMapping] = []
    for fact, qs in queries.items():
        if fact not in kn_sets:
            raise InvalidFactError(f"no KN sets for fact {fact.key()!r}")
        sets = list(kn_sets[fact])
        qs = list(qs)
        if len(qs) != len(sets):
            raise InvalidFactError(f"fact {fact.key()!r}: {len(qs)} queries but {len(sets)} KN sets")
        group = None if groups is None else groups.get(fact)
        for i, q in enumerate(qs):
            cand = neighbour_sets(sets, i, refine_min_count=config.refine_min_count)
            p_b, p_sup, p_enh = _query_probs(model, q, cand, config)
            if not p_b > 0:
                raise InvalidFactError(f"P(answer) is 0 for {q.prompt!r}: relative change undefined")
            sizes, sup, enh = {}, {}, {}
            for kind in config.kinds:
                sizes[kind] = len(cand[kind])
                if kind not in p_sup:  # empty set: a no-op
                    sup[kind] = enh[kind] = 0.0
                    continue
                sup[kind] = (p_sup[kind] - p_b) / p_b
                enh[kind] = (p_enh[kind] - p_b) / p_b
            records.append(QueryMapping(fact, i, q.prompt, p_b, sizes, sup, enh, group))
    summary = []
    group_names = ["all"] + sorted({r.group for r in records if r.group is not None})
    for g in group_names:
        rs = records if g == "all" else [r for r in records if r.group == g]
        for kind in config.kinds:
            sup = np.array([-r.rel_suppress[kind] for r in rs])
            enh = np.array([r.rel_enhance[kind] for r in rs])
            summary.append(MappingSummary(
                g, kind, len(rs), sum(1 for r in rs if r.sizes[kind] == 0),
                float(np.mean([r.sizes[kind] for r in rs])), float(sup.mean()), float(enh.mean()),
                float((sup.mean() + enh.mean()) / 2)))
    return MappingResult(tuple(records), tuple(summary), config, model_info(model))


def queries_and_sets_from_scores(
        scores_by_fact: Mapping[Fact, Sequence[NeuronScores]], selection=None,
) -> tuple[dict[Fact, list[Query]], dict[Fact, list[NeuronSet]]]:
    """Split per-fact lists of NeuronScores (each carrying its query) into the ``queries`` and
    ``kn_sets`` arguments of :func:`query_kn_mapping` (selection as in
    :func:`kn_lens.analysis.consistency.select_kns`, the paper's by default)."""
    from kn_lens.analysis.consistency import KNSelection, select_kns

    selection = selection or KNSelection()
    qs, sets = {}, {}
    for fact, seq in scores_by_fact.items():
        if any(s.query is None for s in seq):
            raise InvalidFactError(f"fact {fact.key()!r}: NeuronScores without a query")
        qs[fact] = [s.query for s in seq]
        sets[fact] = [select_kns(s, selection) for s in seq]
    return qs, sets

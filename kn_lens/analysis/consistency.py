"""KN-consistency analysis of the Query Localization paper (QL §2.1, eq. 1, Table 1, App. Table 4).

For a fact with neighbour queries q_1..q_k (one per paraphrase template) and their knowledge-neuron
sets N_1..N_k (from any locator), QL eq. 1 defines

    CS1 = |∩_i N_i| / |∪_i N_i|
    CS2 = |{n ∈ ∪_i N_i : Σ_i 1[n ∈ N_i] > 1}| / |∪_i N_i|        (the relaxation of CS1)

Facts are split by a threshold *on CS2* (QL §2.1: "we use a thresholding technique based on CS2")
into K_I (CS2 above the threshold: the fact obeys the knowledge-localisation assumption) and K_II
(at or below it). Two thresholds: the static one, 0.1 (App. Table 4, the same for every model and
locator), and Otsu's threshold computed on the batch of CS2 values (App. A.1: "calculated
separately based on each batch of data"). Welch's t-test (unequal variances) compares the CS2
values of the two groups (Table 1 reports "S: I", "S: II" and the t-statistic of that test).

The KN sets come from any locator: :func:`select_kns` turns a :class:`NeuronScores` into a set
with a configurable :class:`KNSelection`; the default is the paper's (App. A.4: "the specific
experimental settings remain consistent with the original author"; for IG that is Dai et al.'s
coarse-KN threshold, attribution > 0.2 x the maximum attribution of the prompt).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from kn_lens.errors import ConfigError, InvalidFactError, NumericalError
from kn_lens.facts import Fact
from kn_lens.models import ModelInfo
from kn_lens.neurons import (NeuronScores, NeuronSet, intersection, quantile, threshold_relative,
                             top_fraction, top_k, top_k_per_token, union)

__all__ = [
    "KNSelection", "select_kns", "kn_sets_from_scores", "cs1", "cs2", "otsu_threshold",
    "welch_t_test", "ConsistencyConfig", "FactConsistency", "GroupRow", "ConsistencyResult",
    "consistency_analysis", "consistency_by_method", "shared_k2_ratio", "default_selection",
]


# --------------------------------------------------------------------------- KN selection


@dataclass(frozen=True, kw_only=True)
class KNSelection:
    """How a :class:`NeuronScores` map becomes a KN set.

    ``rule``:
      - ``"threshold_relative"`` (default): scores > ``ratio`` x max score. Dai et al. 2022 (the
        IG locator QL App. A.4 uses with the original author's settings) keep attributions above
        0.2 x the maximum as coarse KNs.
      - ``"top_k"``: the ``k`` highest scores; ``"top_fraction"``: the top ``fraction``;
        ``"quantile"``: at or above the ``q`` quantile (KNE eq. 6); ``"top_k_per_token"``: FiNE's
        top-k per answer token, united.
      - ``"absolute"``: scores > ``tau`` (QL App. A.4 eq. 19, Chen et al.'s AMIG threshold tau on
        normalised attributions).
    """

    rule: Literal["threshold_relative", "top_k", "top_fraction", "quantile", "top_k_per_token",
                  "absolute"] = "threshold_relative"
    ratio: float = 0.2  # Dai et al. 2022 (QL App. A.4): attribution > 0.2 x max
    k: int = 5  # FiNE App. C (top_k / top_k_per_token only)
    fraction: float = 0.01  # TNF-DA "1 %" (top_fraction only)
    q: float = 0.99  # quantile rule only
    tau: float = 0.0  # absolute rule only (QL eq. 19)
    freeze_last: int = 0  # exclude the last l_f layers (FiNE §4.3); 0 = none

    def __post_init__(self) -> None:
        if self.rule not in ("threshold_relative", "top_k", "top_fraction", "quantile",
                             "top_k_per_token", "absolute"):
            raise ConfigError(f"unknown KN selection rule {self.rule!r}")
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")


def default_selection(method: str, n_layers: int | None = None) -> KNSelection:
    """Each locator's KN set rule with its authors' settings (QL App. A.4): FiNE's contribution
    -> top-5 per answer token, the last 3 layers frozen (FiNE App. C); every other locator ->
    Dai et al.'s attribution > 0.2 x max. On models with fewer than 5 layers (tiny test models)
    fewer layers are frozen so that some remain."""
    if method == "contribution":
        from kn_lens.locate import ContributionConfig

        c = ContributionConfig()
        freeze = c.freeze_last if n_layers is None else min(c.freeze_last, max(n_layers - 2, 0))
        return KNSelection(rule="top_k_per_token", k=c.k, freeze_last=freeze)
    return KNSelection()


def select_kns(scores: NeuronScores | Tensor, selection: KNSelection = KNSelection()) -> NeuronSet:
    """The KN set of one query's score map under ``selection``."""
    s = selection
    if s.rule == "threshold_relative":
        return threshold_relative(scores, s.ratio, freeze_last=s.freeze_last)
    if s.rule == "top_k":
        return top_k(scores, s.k, freeze_last=s.freeze_last)
    if s.rule == "top_fraction":
        return top_fraction(scores, s.fraction, freeze_last=s.freeze_last)
    if s.rule == "quantile":
        return quantile(scores, s.q, freeze_last=s.freeze_last)
    if s.rule == "top_k_per_token":
        if not isinstance(scores, NeuronScores):
            raise ConfigError("top_k_per_token needs NeuronScores (with per_token scores)")
        return top_k_per_token(scores, s.k, freeze_last=s.freeze_last)
    t = (scores.scores if isinstance(scores, NeuronScores) else scores).float()
    if s.freeze_last:
        t = t.clone()
        t[t.shape[0] - s.freeze_last:] = float("-inf")
    return NeuronSet.from_mask(t > s.tau)


def kn_sets_from_scores(scores_by_fact: Mapping[Fact, Sequence[NeuronScores | Tensor]],
                        selection: KNSelection = KNSelection()) -> dict[Fact, list[NeuronSet]]:
    """Apply :func:`select_kns` to every query's scores of every fact (order kept)."""
    return {f: [select_kns(s, selection) for s in seq] for f, seq in scores_by_fact.items()}


# --------------------------------------------------------------------------- eq. 1


def _check_sets(sets: Sequence[NeuronSet]) -> list[NeuronSet]:
    sets = list(sets)
    if len(sets) < 2:
        raise InvalidFactError(
            f"consistency needs at least 2 neighbour queries (KN sets) per fact, got {len(sets)}; "
            "give the relation more templates")
    return sets


def cs1(sets: Sequence[NeuronSet]) -> float:
    """QL eq. 1, CS1 = |∩ N_i| / |∪ N_i|; NaN when every set is empty (0/0)."""
    sets = _check_sets(sets)
    u = len(union(sets))
    return len(intersection(sets)) / u if u else float("nan")


def cs2(sets: Sequence[NeuronSet]) -> float:
    """QL eq. 1, CS2 = |{n in ∪ N_i appearing in more than one N_i}| / |∪ N_i|; NaN when all empty."""
    sets = _check_sets(sets)
    counts = Counter(n for s in sets for n in s)
    if not counts:
        return float("nan")
    return sum(1 for c in counts.values() if c > 1) / len(counts)


# --------------------------------------------------------------------------- statistics


def otsu_threshold(values: Sequence[float] | np.ndarray | Tensor, *, bins: int | None = None) -> float:
    """Otsu's threshold (the split maximising the between-class variance w0 w1 (mu0 - mu1)^2).

    ``bins=None`` (default): exact, over every split of the sorted distinct values; the returned
    threshold is the midpoint between the largest value of the lower class and the smallest of the
    upper class, so ``values > threshold`` is the upper class. Ties go to the lowest split.
    ``bins=n``: the classic histogram version (n equal-width bins; returns the upper edge of the
    last bin of the lower class, as in skimage's ``threshold_otsu`` up to its bin-centre convention).
    """
    v = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise NumericalError("Otsu's threshold needs at least one finite value")
    if bins is None:
        uniq, counts = np.unique(v, return_counts=True)
        edges = uniq
    else:
        if bins < 2:
            raise ConfigError(f"bins must be >= 2, got {bins}")
        counts, edge_arr = np.histogram(v, bins=bins)
        uniq = (edge_arr[:-1] + edge_arr[1:]) / 2
        edges = edge_arr[1:]
    if uniq.size == 1:
        return float(uniq[0])
    w = counts.astype(np.float64)
    total, total_mass = w.sum(), (w * uniq).sum()
    w0 = np.cumsum(w)[:-1]
    m0 = np.cumsum(w * uniq)[:-1]
    w1 = total - w0
    valid = (w0 > 0) & (w1 > 0)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(total_mass - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = np.where(valid, (w0 / total) * (w1 / total) * (mu0 - mu1) ** 2, -1.0)
    i = int(np.argmax(between))
    if bins is None:
        return float((uniq[i] + uniq[i + 1]) / 2)
    return float(edges[i])


def welch_t_test(a: Sequence[float] | np.ndarray | Tensor,
                 b: Sequence[float] | np.ndarray | Tensor) -> tuple[float, float]:
    """Welch's t-test (scipy.stats.ttest_ind, equal_var=False) of a vs b; (nan, nan) when either
    group has fewer than 2 values."""
    from scipy.stats import ttest_ind

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return float("nan"), float("nan")
    res = ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, kw_only=True)
class ConsistencyConfig:
    score: Literal["cs1", "cs2"] = "cs2"  # QL §2.1: the K_I/K_II split thresholds CS2
    static_threshold: float = 0.1  # QL App. Table 4 ("Static": 0.1 for every PLM and locator)
    otsu_bins: int | None = None  # None: exact Otsu over distinct values (QL ref. [1])
    otsu_per_relation: bool = False  # per-relation rows reuse the overall threshold by default

    def __post_init__(self) -> None:
        if self.score not in ("cs1", "cs2"):
            raise ConfigError(f"score must be 'cs1' or 'cs2', not {self.score!r}")
        if not 0 <= self.static_threshold <= 1:
            raise ConfigError(f"static_threshold must be in [0, 1], got {self.static_threshold}")


@dataclass(frozen=True)
class FactConsistency:
    """CS1 and CS2 of one fact (NaN when all its KN sets are empty)."""

    fact: Fact
    set_sizes: tuple[int, ...]
    union_size: int
    intersection_size: int
    shared_size: int  # neurons in more than one set (CS2's numerator)
    cs1: float
    cs2: float

    @property
    def relation(self) -> str:
        return self.fact.relation

    def score(self, which: str) -> float:
        return self.cs1 if which == "cs1" else self.cs2


@dataclass(frozen=True)
class GroupRow:
    """One row of QL Table 1: a scope (relation id or "overall") under one threshold."""

    scope: str
    threshold_kind: str  # "static" | "otsu"
    threshold: float
    n_facts: int  # facts with a defined CS (non-empty union)
    n_k1: int
    n_k2: int
    ratio_k1: float  # "R: I"
    ratio_k2: float  # "R: II"
    mean_cs_k1: float  # "S: I" (mean of the thresholded CS, CS2 by default)
    mean_cs_k2: float  # "S: II"
    t: float  # Welch's t of CS(K_I) vs CS(K_II)
    p: float


@dataclass(frozen=True)
class ConsistencyResult:
    facts: tuple[FactConsistency, ...]
    rows: tuple[GroupRow, ...]
    config: ConsistencyConfig
    method: str = ""
    model: ModelInfo | None = None
    n_undefined: int = 0  # facts whose KN sets were all empty (CS = 0/0), left out of the rows
    labels: dict = field(default_factory=dict, compare=False)  # kind -> {fact: "K_I"|"K_II"}

    def row(self, scope: str = "overall", kind: str = "static") -> GroupRow:
        for r in self.rows:
            if r.scope == scope and r.threshold_kind == kind:
                return r
        raise KeyError(f"no row for scope={scope!r}, threshold={kind!r}")

    def label(self, fact: Fact, kind: str = "static") -> str:
        """"K_I" or "K_II" for ``fact`` under the static or Otsu threshold."""
        return self.labels[kind][fact]

    def k1(self, kind: str = "static") -> list[Fact]:
        return [f for f, g in self.labels[kind].items() if g == "K_I"]

    def k2(self, kind: str = "static") -> list[Fact]:
        return [f for f, g in self.labels[kind].items() if g == "K_II"]

    def table(self) -> list[dict]:
        """Rows for a markdown table (QL Table 1 columns)."""
        out = []
        for r in self.rows:
            out.append({
                "scope": r.scope, "T": "St" if r.threshold_kind == "static" else "Ot",
                "threshold": round(r.threshold, 4), "n": r.n_facts,
                "R: I": round(r.ratio_k1, 3), "S: I": _round(r.mean_cs_k1),
                "R: II": round(r.ratio_k2, 3), "S: II": _round(r.mean_cs_k2),
                "t": _round(r.t, 2), "p": _fmt_p(r.p),
            })
        return out

    def to_markdown(self) -> str:
        return markdown_table(self.table())

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "model": None if self.model is None else self.model.to_dict(),
            "config": asdict(self.config),
            "n_undefined": self.n_undefined,
            "facts": [{"fact": asdict(fc.fact), "set_sizes": list(fc.set_sizes),
                       "union": fc.union_size, "intersection": fc.intersection_size,
                       "shared": fc.shared_size, "cs1": _nan_none(fc.cs1),
                       "cs2": _nan_none(fc.cs2),
                       "label_static": self.labels.get("static", {}).get(fc.fact),
                       "label_otsu": self.labels.get("otsu", {}).get(fc.fact)}
                      for fc in self.facts],
            "rows": [{k: _nan_none(v) for k, v in asdict(r).items()} for r in self.rows],
        }


def _nan_none(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def _round(x: float, nd: int = 3):
    return None if math.isnan(x) else round(x, nd)


def _fmt_p(p: float) -> str:
    return "nan" if math.isnan(p) else f"{p:.2e}"


def markdown_table(rows: Sequence[dict]) -> str:
    """A GitHub markdown table of dict rows (keys of the first row are the columns)."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _fact_consistency(fact: Fact, sets: Sequence[NeuronSet]) -> FactConsistency:
    sets = _check_sets(sets)
    counts = Counter(n for s in sets for n in s)
    u = len(counts)
    inter = sum(1 for c in counts.values() if c == len(sets))
    shared = sum(1 for c in counts.values() if c > 1)
    return FactConsistency(fact, tuple(len(s) for s in sets), u, inter, shared,
                           inter / u if u else float("nan"), shared / u if u else float("nan"))


def _row(scope: str, kind: str, thr: float, facts: Sequence[FactConsistency],
         which: str) -> GroupRow:
    vals = np.array([fc.score(which) for fc in facts], dtype=np.float64)
    hi, lo = vals[vals > thr], vals[vals <= thr]
    n = vals.size
    t, p = welch_t_test(hi, lo)
    return GroupRow(scope, kind, float(thr), int(n), int(hi.size), int(lo.size),
                    hi.size / n if n else float("nan"), lo.size / n if n else float("nan"),
                    float(hi.mean()) if hi.size else float("nan"),
                    float(lo.mean()) if lo.size else float("nan"), t, p)


def consistency_analysis(kn_sets: Mapping[Fact, Sequence[NeuronSet]], *,
                         config: ConsistencyConfig = ConsistencyConfig(), method: str = "",
                         model: ModelInfo | None = None) -> ConsistencyResult:
    """QL §2.1: CS1/CS2 per fact, the K_I/K_II split (static and Otsu thresholds on CS2) and
    Welch's t-test of CS2 between the groups, overall and per relation.

    ``kn_sets`` maps each fact to the KN sets of its neighbour queries (one per template, any
    locator; see :func:`kn_sets_from_scores`). A fact is K_I when its CS is *above* the threshold,
    K_II otherwise. Facts whose sets are all empty have no CS (0/0): they are counted in
    ``n_undefined`` and left out of the rows and labels.
    """
    if not kn_sets:
        raise InvalidFactError("consistency_analysis needs at least one fact with KN sets")
    all_facts = [_fact_consistency(f, s) for f, s in kn_sets.items()]
    which = config.score
    defined = [fc for fc in all_facts if not math.isnan(fc.score(which))]
    if not defined:
        raise NumericalError("every fact has empty KN sets: nothing to analyse (loosen the "
                             "selection, e.g. a lower ratio)")
    overall_otsu = otsu_threshold([fc.score(which) for fc in defined], bins=config.otsu_bins)
    rows = [_row("overall", "static", config.static_threshold, defined, which),
            _row("overall", "otsu", overall_otsu, defined, which)]
    by_rel: dict[str, list[FactConsistency]] = {}
    for fc in defined:
        by_rel.setdefault(fc.relation, []).append(fc)
    for rel in sorted(by_rel):
        fcs = by_rel[rel]
        rows.append(_row(rel, "static", config.static_threshold, fcs, which))
        thr = (otsu_threshold([fc.score(which) for fc in fcs], bins=config.otsu_bins)
               if config.otsu_per_relation else overall_otsu)
        rows.append(_row(rel, "otsu", thr, fcs, which))
    labels: dict[str, dict[Fact, str]] = {"static": {}, "otsu": {}}
    for fc in defined:
        s = fc.score(which)
        labels["static"][fc.fact] = "K_I" if s > config.static_threshold else "K_II"
        thr = overall_otsu
        if config.otsu_per_relation:
            thr = next(r.threshold for r in rows
                       if r.scope == fc.relation and r.threshold_kind == "otsu")
        labels["otsu"][fc.fact] = "K_I" if s > thr else "K_II"
    return ConsistencyResult(tuple(all_facts), tuple(rows), config, method, model,
                             len(all_facts) - len(defined), labels)


def consistency_by_method(scores: Mapping[str, Mapping[Fact, Sequence[NeuronScores]]], model, *,
                          config: ConsistencyConfig = ConsistencyConfig()
                          ) -> dict[str, ConsistencyResult]:
    """``{method: ConsistencyResult}`` from ``{method: {fact: [NeuronScores per query]}}``, each
    locator's KN sets selected with its authors' preset (:func:`default_selection`)."""
    from kn_lens.models import model_info

    info, n_layers = model_info(model), model.cfg.n_layers
    return {m: consistency_analysis(kn_sets_from_scores(by_fact, default_selection(m, n_layers)),
                                    config=config, method=m, model=info)
            for m, by_fact in scores.items()}


def shared_k2_ratio(results: Iterable[ConsistencyResult], kind: str = "static") -> float:
    """QL Table 1 "∩: II": the share of facts classified K_II by every locator's result (over the
    facts all results define)."""
    results = list(results)
    if not results:
        raise ConfigError("shared_k2_ratio needs at least one result")
    common = set(results[0].labels[kind])
    for r in results[1:]:
        common &= set(r.labels[kind])
    if not common:
        return float("nan")
    k2 = [f for f in common if all(r.labels[kind][f] == "K_II" for r in results)]
    return len(k2) / len(common)

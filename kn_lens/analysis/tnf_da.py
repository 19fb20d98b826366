"""Neuron analyses of the TNF-DA paper ("Analysis of the Relationship Between Neurons and
Knowledge", Fig. 3, Table 1).

The scores are per-neuron indirect effects IE_{l,i} = P_{*,clean h_l^i}(o) − P_*(o) from causal
mediation (TNF-DA eq. 3-4; ``kn_lens.locate`` mediation or AtP), but any locator's
:class:`NeuronScores` work.

(a) :func:`ie_concentration` — the "1 %" claim (Fig. 3): the cumulative share of the total effect
    covered by the top x % of neurons, with the 1 % mark, and the share of negative-IE neurons.
(b) :func:`targeted_neuron_repetition` — Table 1. For each relation r with descriptions
    (facts) j = 1..n_r and their targeted-neuron sets T_j (the top 1 % by IE), count how many
    descriptions each neuron is targeted in, c(u) = #{j : u ∈ T_j}. Then, in percent:
      Top1       = the largest c(u) / n_r      ("frequency of the top 2 targeted neurons")
      Top2       = the second largest c(u) / n_r
      Base       = the smallest c(u) / n_r over targeted neurons ("the lowest value of frequency")
      Repetition = |∪_j T_j| / Σ_j |T_j|       ("the average number of targeted neurons with the
                   same r, relative to the total number of targeted neurons that may appear";
                   lower = more repetition)
    each averaged over relations (unweighted).
(c) :func:`relation_overlap` — neurons shared between relations: a relation-level set (the
    neurons targeted in at least ``min_frequency`` of its descriptions, "the common neurons of
    each r") per relation, pairwise overlap, and the mean overlap of pairs in the same semantic
    group vs pairs in different groups (TNF-DA: "not only limited to the same r, but also the
    semantically similar ones").
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens.errors import ConfigError, InvalidFactError, NumericalError
from kn_lens.facts import Fact, Relation
from kn_lens.neurons import Neuron, NeuronScores, NeuronSet, top_fraction

__all__ = ["IEConcentration", "ie_concentration", "mean_ie_concentration", "targeted_neurons",
           "RelationRepetition", "RepetitionResult", "targeted_neuron_repetition",
           "RelationOverlapResult", "relation_level_sets", "relation_overlap", "set_overlap"]

TARGETED_FRACTION = 0.01  # TNF-DA: "only 1 % neurons have significant contributions"
DEFAULT_FRACTIONS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def _t(scores: NeuronScores | Tensor) -> Tensor:
    t = (scores.scores if isinstance(scores, NeuronScores) else scores).detach().float().cpu()
    if not torch.isfinite(t).all():
        raise NumericalError("non-finite indirect effects")
    return t


# --------------------------------------------------------------------------- (a) 1 % claim


@dataclass(frozen=True)
class IEConcentration:
    """How concentrated a fact's indirect effect is (TNF-DA Fig. 3)."""

    by: str  # "abs" | "positive"
    n_neurons: int
    fractions: tuple[float, ...]
    shares: tuple[float, ...]  # share of the total covered by the top fraction of neurons
    share_at_1pct: float
    frac_negative: float  # share of neurons with IE < 0
    frac_positive: float
    total: float  # Σ|IE| ("abs") or Σ max(IE, 0) ("positive")
    curve: Float[Tensor, "n"] | None = field(repr=False, compare=False, default=None)  # cumulative share

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("curve")
        return d


def ie_concentration(scores: NeuronScores | Tensor, *, by: Literal["abs", "positive"] = "abs",
                     fractions: Sequence[float] = DEFAULT_FRACTIONS,
                     keep_curve: bool = True) -> IEConcentration:
    """The cumulative share of the total effect covered by the top x % of neurons.

    ``by="abs"``: neurons sorted by |IE|, share of Σ|IE|. ``by="positive"``: neurons sorted by IE,
    share of the positive mass Σ max(IE, 0) (negative neurons contribute nothing). The top
    fraction f means the ``ceil(f x N)`` highest neurons.
    """
    t = _t(scores).flatten()
    if by == "abs":
        v = t.abs()
    elif by == "positive":
        v = t.clamp_min(0)
    else:
        raise ConfigError(f"by must be 'abs' or 'positive', not {by!r}")
    n = v.numel()
    total = float(v.sum())
    if total <= 0:
        raise NumericalError("the total effect is zero: concentration is undefined")
    srt = v.sort(descending=True).values.double()
    curve = (srt.cumsum(0) / srt.sum()).float()
    shares = []
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"fractions must be in (0, 1], got {f}")
        shares.append(float(curve[max(1, math.ceil(f * n - 1e-9)) - 1]))
    at1 = float(curve[max(1, math.ceil(TARGETED_FRACTION * n - 1e-9)) - 1])
    return IEConcentration(by, n, tuple(float(f) for f in fractions), tuple(shares), at1,
                           float((t < 0).float().mean()), float((t > 0).float().mean()), total,
                           curve if keep_curve else None)


def mean_ie_concentration(all_scores: Sequence[NeuronScores | Tensor], **kw) -> dict:
    """Mean (and std) over facts of the shares at each fraction and at the 1 % mark."""
    res = [ie_concentration(s, keep_curve=False, **kw) for s in all_scores]
    if not res:
        raise InvalidFactError("mean_ie_concentration needs at least one score map")
    shares = np.array([r.shares for r in res])
    return {
        "n_facts": len(res), "by": res[0].by, "fractions": list(res[0].fractions),
        "mean_shares": shares.mean(0).tolist(), "std_shares": shares.std(0).tolist(),
        "mean_share_at_1pct": float(np.mean([r.share_at_1pct for r in res])),
        "mean_frac_negative": float(np.mean([r.frac_negative for r in res])),
    }


def targeted_neurons(scores: NeuronScores | Tensor,
                     fraction: float = TARGETED_FRACTION) -> NeuronSet:
    """The targeted neurons of one description: the top ``fraction`` (1 %) of neurons by IE."""
    return top_fraction(scores, fraction)


# --------------------------------------------------------------------------- (b) Table 1


@dataclass(frozen=True)
class RelationRepetition:
    relation: str
    n_descriptions: int
    n_targeted_total: int  # Σ_j |T_j|
    n_unique: int  # |∪_j T_j|
    top1: float  # percent
    top2: float
    base: float
    repetition: float
    top_neurons: tuple[tuple[Neuron, int], ...]  # the most frequent neurons and their counts


@dataclass(frozen=True)
class RepetitionResult:
    relations: tuple[RelationRepetition, ...]
    top1: float  # mean over relations, percent
    top2: float
    base: float
    repetition: float
    skipped: tuple[str, ...] = ()  # relations with fewer than min_descriptions

    def table(self) -> list[dict]:
        rows = [{"relation": r.relation, "n": r.n_descriptions, "Top1": round(r.top1, 2),
                 "Top2": round(r.top2, 2), "Base": round(r.base, 2),
                 "Repetition": round(r.repetition, 2)} for r in self.relations]
        rows.append({"relation": "mean", "n": sum(r.n_descriptions for r in self.relations),
                     "Top1": round(self.top1, 2), "Top2": round(self.top2, 2),
                     "Base": round(self.base, 2), "Repetition": round(self.repetition, 2)})
        return rows

    def to_markdown(self) -> str:
        from kn_lens.analysis.consistency import markdown_table

        return markdown_table(self.table())

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top2": self.top2, "base": self.base,
                "repetition": self.repetition, "skipped": list(self.skipped),
                "relations": [{**{k: v for k, v in asdict(r).items() if k != "top_neurons"},
                               "top_neurons": [[n.layer, n.index, c] for n, c in r.top_neurons]}
                              for r in self.relations]}


def _by_relation(targeted: Mapping[Fact, NeuronSet]) -> dict[str, list[NeuronSet]]:
    out: dict[str, list[NeuronSet]] = {}
    for f, s in targeted.items():
        out.setdefault(f.relation, []).append(s)
    return out


def targeted_neuron_repetition(targeted: Mapping[Fact, NeuronSet], *,
                               min_descriptions: int = 2, n_top: int = 5) -> RepetitionResult:
    """TNF-DA Table 1 from each description's targeted-neuron set (see module docstring).

    ``targeted`` maps each fact (description) to its targeted neurons, e.g.
    ``{f: targeted_neurons(ie[f]) for f in facts}``; facts are grouped by ``fact.relation``.
    Relations with fewer than ``min_descriptions`` descriptions (Top1 would be 100 % trivially)
    or with no targeted neuron are skipped and listed in ``skipped``.
    """
    if min_descriptions < 1:
        raise ConfigError("min_descriptions must be >= 1")
    rows, skipped = [], []
    for rel, sets in sorted(_by_relation(targeted).items()):
        counts = Counter(n for s in sets for n in s)
        if len(sets) < min_descriptions or not counts:
            skipped.append(rel)
            continue
        n = len(sets)
        freq = sorted(counts.values(), reverse=True)
        total = sum(len(s) for s in sets)
        rows.append(RelationRepetition(
            rel, n, total, len(counts), 100 * freq[0] / n,
            100 * (freq[1] if len(freq) > 1 else 0) / n, 100 * freq[-1] / n,
            100 * len(counts) / total, tuple(counts.most_common(n_top))))
    if not rows:
        raise InvalidFactError(f"no relation has >= {min_descriptions} descriptions with targeted "
                               "neurons")
    mean = lambda attr: float(np.mean([getattr(r, attr) for r in rows]))  # noqa: E731
    return RepetitionResult(tuple(rows), mean("top1"), mean("top2"), mean("base"),
                            mean("repetition"), tuple(skipped))


# --------------------------------------------------------------------------- (c) overlap


def relation_level_sets(targeted: Mapping[Fact, NeuronSet], *,
                        min_frequency: float = 0.5) -> dict[str, NeuronSet]:
    """Per relation, the neurons targeted in at least ``min_frequency`` of its descriptions."""
    if not 0 < min_frequency <= 1:
        raise ConfigError(f"min_frequency must be in (0, 1], got {min_frequency}")
    out = {}
    for rel, sets in _by_relation(targeted).items():
        counts = Counter(n for s in sets for n in s)
        need = min_frequency * len(sets) - 1e-9
        out[rel] = NeuronSet((n for n, c in counts.items() if c >= need), label=rel)
    return out


def set_overlap(a: NeuronSet, b: NeuronSet, metric: str = "jaccard") -> float:
    """Jaccard |A∩B|/|A∪B| or the overlap coefficient |A∩B|/min(|A|,|B|); NaN when undefined."""
    if metric == "jaccard":
        u = len(a | b)
        return len(a & b) / u if u else float("nan")
    m = min(len(a), len(b))
    return len(a & b) / m if m else float("nan")


@dataclass(frozen=True)
class RelationOverlapResult:
    metric: str
    min_frequency: float
    relation_ids: tuple[str, ...]
    groups: dict  # relation id -> group
    set_sizes: dict  # relation id -> |relation-level set|
    matrix: tuple[tuple[float, ...], ...]  # pairwise overlap, relation_ids order
    same_group_mean: float
    different_group_mean: float
    n_same_pairs: int
    n_different_pairs: int
    mann_whitney_p: float  # one-sided, same > different (nan when a side is empty)
    pairs: tuple[dict, ...] = ()

    def table(self) -> list[dict]:
        return [{"pairs": "same group", "n": self.n_same_pairs,
                 self.metric: _r(self.same_group_mean)},
                {"pairs": "different groups", "n": self.n_different_pairs,
                 self.metric: _r(self.different_group_mean)}]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["matrix"] = [[None if math.isnan(x) else x for x in row] for row in self.matrix]
        return d


def _r(x: float):
    return None if math.isnan(x) else round(x, 4)


def relation_overlap(targeted: Mapping[Fact, NeuronSet],
                     groups: Mapping[str, str | None] | Sequence[Relation], *,
                     min_frequency: float = 0.5,
                     metric: Literal["jaccard", "overlap"] = "jaccard") -> RelationOverlapResult:
    """Overlap of relation-level targeted-neuron sets for relations in the same semantic group vs
    in different groups. ``groups`` maps relation id -> group (or give the ``Relation`` objects,
    whose ``group`` is used); relations without a group are left out of both means. ``metric``:
    Jaccard |A∩B|/|A∪B| or the overlap coefficient |A∩B|/min(|A|,|B|). Pairs with an undefined
    overlap (empty sets) are left out of the means."""
    from scipy.stats import mannwhitneyu

    if metric not in ("jaccard", "overlap"):
        raise ConfigError(f"metric must be 'jaccard' or 'overlap', not {metric!r}")
    gmap = ({r.id: r.group for r in groups} if not isinstance(groups, Mapping) else dict(groups))
    rel_sets = relation_level_sets(targeted, min_frequency=min_frequency)
    ids = tuple(sorted(rel_sets))
    mat = [[set_overlap(rel_sets[a], rel_sets[b], metric) for b in ids] for a in ids]
    same, diff, pairs = [], [], []
    for (i, a), (j, b) in itertools.combinations(enumerate(ids), 2):
        ga, gb = gmap.get(a), gmap.get(b)
        v = mat[i][j]
        kind = None if ga is None or gb is None else ("same" if ga == gb else "different")
        pairs.append({"a": a, "b": b, "group_a": ga, "group_b": gb, "kind": kind,
                      metric: None if math.isnan(v) else v,
                      "shared": len(rel_sets[a] & rel_sets[b])})
        if kind is None or math.isnan(v):
            continue
        (same if kind == "same" else diff).append(v)
    p = float("nan")
    if same and diff:
        p = float(mannwhitneyu(same, diff, alternative="greater").pvalue)
    return RelationOverlapResult(
        metric, min_frequency, ids, {r: gmap.get(r) for r in ids},
        {r: len(rel_sets[r]) for r in ids}, tuple(tuple(row) for row in mat),
        float(np.mean(same)) if same else float("nan"),
        float(np.mean(diff)) if diff else float("nan"), len(same), len(diff), p, tuple(pairs))

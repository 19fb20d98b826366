"""How much do locators agree? Top-k overlap and rank correlation of score maps, per query pair.

For methods A and B run on the same queries, each query gives:

- ``jaccard``: |top_k(A) & top_k(B)| / |top_k(A) | top_k(B)|
- ``overlap``: |top_k(A) & top_k(B)| / k (the fraction of A's top-k that B also picks)
- ``spearman``: Spearman rank correlation of the two full ``[layer, d_mlp]`` maps (scipy)

averaged over queries into ``[method, method]`` matrices (the per-query values are kept too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np

from kn_lens.errors import ConfigError
from kn_lens.neurons import NeuronScores, top_k


@dataclass(frozen=True)
class AgreementResult:
    methods: tuple[str, ...]
    k: int
    by: str
    n_queries: int
    jaccard: np.ndarray  # [method, method], mean over queries
    overlap: np.ndarray  # [method, method], mean over queries
    spearman: np.ndarray  # [method, method], mean over queries
    per_query: dict  # metric -> [query, method, method]

    def to_dict(self) -> dict:
        return {"methods": list(self.methods), "k": self.k, "by": self.by,
                "n_queries": self.n_queries, "jaccard": self.jaccard.tolist(),
                "overlap": self.overlap.tolist(), "spearman": self.spearman.tolist()}

    def table(self, metric: str = "jaccard") -> str:
        m = getattr(self, metric)
        head = "| | " + " | ".join(self.methods) + " |"
        sep = "|---" * (len(self.methods) + 1) + "|"
        rows = [f"| {a} | " + " | ".join(f"{v:.3f}" for v in m[i]) + " |"
                for i, a in enumerate(self.methods)]
        return "\n".join([head, sep, *rows])


def _key(s: NeuronScores):
    q = s.query
    return None if q is None else (q.input_ids, q.answer_ids)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.all(a == a.flat[0]) or np.all(b == b.flat[0]):
        return float("nan")  # constant map: rank correlation undefined
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def agreement(results: Mapping[str, Sequence[NeuronScores]], *, k: int = 50,
              by: Literal["value", "abs"] = "value") -> AgreementResult:
    """Pairwise agreement between methods' scores for the same queries (same order)."""
    if len(results) < 1:
        raise ConfigError("agreement() needs results of at least one method")
    if k < 1:
        raise ConfigError(f"k must be positive, got {k}")
    methods = tuple(results)
    lists = [list(results[m]) for m in methods]
    n = len(lists[0])
    if n == 0 or any(len(x) != n for x in lists):
        raise ConfigError("every method needs scores for the same, non-empty list of queries; got "
                          + ", ".join(f"{m}: {len(x)}" for m, x in zip(methods, lists)))
    for i in range(n):
        keys = {_key(x[i]) for x in lists}
        shapes = {x[i].shape for x in lists}
        if len(keys) > 1 or len(shapes) > 1:
            raise ConfigError(f"query {i}: the methods' scores are for different queries or shapes")
    M = len(methods)
    per = {name: np.full((n, M, M), np.nan) for name in ("jaccard", "overlap", "spearman")}
    for q in range(n):
        sets = [top_k(x[q], k, by=by) for x in lists]
        maps = [x[q].scores.float().abs().numpy() if by == "abs" else x[q].scores.float().numpy()
                for x in lists]
        for a in range(M):
            for b in range(M):
                inter = len(sets[a] & sets[b])
                per["jaccard"][q, a, b] = sets[a].jaccard(sets[b])
                per["overlap"][q, a, b] = inter / max(1, min(len(sets[a]), len(sets[b])))
                per["spearman"][q, a, b] = 1.0 if a == b else _spearman(maps[a], maps[b])
    with np.errstate(all="ignore"):
        means = {name: np.nanmean(v, axis=0) for name, v in per.items()}
    return AgreementResult(methods, k, by, n, means["jaccard"], means["overlap"],
                           means["spearman"], per)

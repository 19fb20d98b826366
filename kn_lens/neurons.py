"""Neurons, score maps and neuron sets, and the ways to select sets from scores.

``NeuronScores`` is what every locator returns: a ``[layer, d_mlp]`` map plus the query, the
method, its config and the model's metadata, so any analysis or edit works with any locator.
``NeuronSet`` is an immutable set of ``Neuron(layer, index)`` with set algebra.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kn_lens.errors import ConfigError, NumericalError
from kn_lens.facts import Query
from kn_lens.models import ModelInfo


@dataclass(frozen=True, order=True)
class Neuron:
    layer: int
    index: int

    def __str__(self) -> str:
        return f"L{self.layer}.N{self.index}"


@dataclass(frozen=True)
class NeuronScores:
    """A score for every FFN neuron (``blocks.{l}.mlp.hook_post`` unit) for one query."""

    scores: Float[Tensor, "layer d_mlp"]
    method: str
    query: Query | None
    config: Any
    model: ModelInfo
    per_token: Float[Tensor, "answer layer d_mlp"] | None = None
    extras: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # results live on the CPU in float32, whatever device and dtype the model computed in
        for name in ("scores", "per_token"):
            t = getattr(self, name)
            if t is not None:
                object.__setattr__(self, name, t.detach().to("cpu", torch.float32))
        if self.scores.ndim != 2:
            raise ValueError(f"scores must be [layer, d_mlp], got {tuple(self.scores.shape)}")
        if not torch.isfinite(self.scores).all():
            raise NumericalError(f"{self.method} produced non-finite neuron scores")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.scores.shape)  # type: ignore[return-value]

    def top_k(self, k: int, **kw) -> "NeuronSet":
        return top_k(self, k, **kw)

    def to_dict(self) -> dict:
        cfg = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else self.config
        return {
            "method": self.method,
            "config": cfg,
            "model": self.model.to_dict(),
            "prompt": None if self.query is None else self.query.prompt,
            "answer": None if self.query is None else self.query.answer,
            "scores": self.scores.tolist(),
        }


class NeuronSet:
    """An immutable set of neurons with set algebra. Iterates in (layer, index) order."""

    __slots__ = ("_neurons", "label")

    def __init__(self, neurons: Iterable[Neuron | tuple[int, int]] = (), label: str = "") -> None:
        self._neurons = frozenset(n if isinstance(n, Neuron) else Neuron(int(n[0]), int(n[1]))
                                  for n in neurons)
        self.label = label

    def __iter__(self) -> Iterator[Neuron]:
        return iter(sorted(self._neurons))

    def __len__(self) -> int:
        return len(self._neurons)

    def __contains__(self, n: object) -> bool:
        return n in self._neurons

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NeuronSet) and self._neurons == other._neurons

    def __hash__(self) -> int:
        return hash(self._neurons)

    def __repr__(self) -> str:
        head = ", ".join(str(n) for n in list(self)[:6])
        more = "" if len(self) <= 6 else f", ... (+{len(self) - 6})"
        return f"NeuronSet({head}{more}{', label=' + repr(self.label) if self.label else ''})"

    def __or__(self, other: "NeuronSet") -> "NeuronSet":
        return NeuronSet(self._neurons | other._neurons)

    def __and__(self, other: "NeuronSet") -> "NeuronSet":
        return NeuronSet(self._neurons & other._neurons)

    def __sub__(self, other: "NeuronSet") -> "NeuronSet":
        return NeuronSet(self._neurons - other._neurons)

    def layers(self) -> Counter:
        return Counter(n.layer for n in self._neurons)

    def mask(self, n_layers: int, d_mlp: int) -> Bool[Tensor, "layer d_mlp"]:
        m = torch.zeros(n_layers, d_mlp, dtype=torch.bool, device="cpu")
        for n in self._neurons:
            m[n.layer, n.index] = True
        return m

    @classmethod
    def from_mask(cls, mask: Bool[Tensor, "layer d_mlp"], label: str = "") -> "NeuronSet":
        return cls((int(a), int(b)) for a, b in mask.nonzero().tolist())

    def to_list(self) -> list[list[int]]:
        return [[n.layer, n.index] for n in self]

    @classmethod
    def from_list(cls, items: Sequence[Sequence[int]], label: str = "") -> "NeuronSet":
        return cls(((int(a), int(b)) for a, b in items), label=label)

    def jaccard(self, other: "NeuronSet") -> float:
        union = len(self | other)
        return len(self & other) / union if union else 1.0


def union(sets: Iterable[NeuronSet]) -> NeuronSet:
    out: frozenset[Neuron] = frozenset()
    for s in sets:
        out = out | frozenset(s)
    return NeuronSet(out)


def intersection(sets: Iterable[NeuronSet]) -> NeuronSet:
    sets = list(sets)
    if not sets:
        return NeuronSet()
    out = frozenset(sets[0])
    for s in sets[1:]:
        out = out & frozenset(s)
    return NeuronSet(out)


def refine(sets: Iterable[NeuronSet], min_count: int = 2) -> NeuronSet:
    """Neurons that appear in at least ``min_count`` of the sets (QL eq. 3 "refine")."""
    counts = Counter(n for s in sets for n in s)
    return NeuronSet(n for n, c in counts.items() if c >= min_count)


# --------------------------------------------------------------------------- selection

Score = NeuronScores | Tensor


def _tensor(scores: Score) -> Tensor:
    return scores.scores if isinstance(scores, NeuronScores) else scores


def freeze_layers(scores: Float[Tensor, "layer d_mlp"], last: int = 0,
                  layers: Iterable[int] = ()) -> Float[Tensor, "layer d_mlp"]:
    """Scores with the last ``last`` layers (FiNE's layer freezing, l_f) and ``layers`` masked to
    -inf, so no selection picks them."""
    out = scores.clone().float()
    n = out.shape[0]
    if last < 0 or last >= n:
        raise ConfigError(f"cannot freeze the last {last} of {n} layers")
    if last:
        out[n - last:] = float("-inf")
    for layer in layers:
        out[layer] = float("-inf")
    return out


def _prepare(scores: Score, by: str, freeze_last: int) -> Tensor:
    t = _tensor(scores).float()
    if by == "abs":
        t = t.abs()
    elif by != "value":
        raise ConfigError(f"by must be 'value' or 'abs', not {by!r}")
    return freeze_layers(t, last=freeze_last) if freeze_last else t


def top_k(scores: Score, k: int, *, by: Literal["value", "abs"] = "value",
          freeze_last: int = 0) -> NeuronSet:
    """The k highest-scoring neurons overall."""
    t = _prepare(scores, by, freeze_last)
    if k <= 0:
        return NeuronSet()
    flat = t.flatten()
    k = min(k, int(torch.isfinite(flat).sum()))
    idx = flat.topk(k).indices
    d = t.shape[1]
    return NeuronSet((int(i) // d, int(i) % d) for i in idx)


def top_fraction(scores: Score, fraction: float, **kw) -> NeuronSet:
    """The top ``fraction`` of all neurons (e.g. 0.001 for the top 0.1 %), at least one."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    t = _tensor(scores)
    return top_k(scores, max(1, round(fraction * t.numel())), **kw)


def top_k_per_token(scores: NeuronScores, k: int = 5, *, by: Literal["value", "abs"] = "value",
                    freeze_last: int = 0) -> NeuronSet:
    """FiNE: top-k neurons for each answer token, united over tokens (needs ``per_token``)."""
    if scores.per_token is None:
        return top_k(scores, k, by=by, freeze_last=freeze_last)
    return union(top_k(t, k, by=by, freeze_last=freeze_last) for t in scores.per_token)


def threshold_relative(scores: Score, ratio: float = 0.2, *, freeze_last: int = 0) -> NeuronSet:
    """Neurons scoring above ``ratio`` x the maximum score (Dai et al. use 0.2)."""
    t = _prepare(scores, "value", freeze_last)
    m = t[torch.isfinite(t)].max()
    if m <= 0:
        return NeuronSet()
    return NeuronSet.from_mask(t > ratio * m)


def quantile(scores: Score, q: float = 0.99, *, per_layer: bool = False,
             freeze_last: int = 0) -> NeuronSet:
    """Neurons at or above the ``q`` quantile of the scores (KNE eq. 6-7): over all neurons, or
    within each layer when ``per_layer``. Only positive scores are kept."""
    if not 0 <= q < 1:
        raise ConfigError(f"quantile must be in [0, 1), got {q}")
    t = _prepare(scores, "value", freeze_last)
    if per_layer:
        rows = []
        for row in t:
            fin = row[torch.isfinite(row)]
            thr = torch.quantile(fin, q) if fin.numel() else torch.tensor(float("inf"),
                                                                           device=row.device)
            rows.append((row >= thr) & (row > 0))
        return NeuronSet.from_mask(torch.stack(rows))
    fin = t[torch.isfinite(t)]
    thr = torch.quantile(fin, q)
    return NeuronSet.from_mask((t >= thr) & (t > 0))


def random_like(neurons: NeuronSet | int, n_layers: int, d_mlp: int, *,
                generator: torch.Generator, exclude: NeuronSet | None = None) -> NeuronSet:
    """As many random neurons as ``neurons`` (or the given count), disjoint from ``exclude``."""
    k = neurons if isinstance(neurons, int) else len(neurons)
    excluded = NeuronSet() if exclude is None else exclude
    picked: set[Neuron] = set()
    while len(picked) < k:
        flat = torch.randperm(n_layers * d_mlp, generator=generator, device="cpu")[: 2 * k]
        for i in flat.tolist():
            n = Neuron(i // d_mlp, i % d_mlp)
            if n not in excluded:
                picked.add(n)
            if len(picked) == k:
                break
    return NeuronSet(picked)


def save_sets(path: str | Path, sets: dict[str, NeuronSet]) -> None:
    Path(path).write_text(json.dumps({k: v.to_list() for k, v in sets.items()}))


def load_sets(path: str | Path) -> dict[str, NeuronSet]:
    return {k: NeuronSet.from_list(v, k) for k, v in json.loads(Path(path).read_text()).items()}

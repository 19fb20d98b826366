"""Localisation analyses of the FiNE paper (§5.4 "Localization analyses", Fig. 4/6, Tables 6/8).

(1) :func:`layer_distribution` — how the located neurons distribute over layers (Fig. 4: "the
    distribution of unique neurons located by FiNE ... aggregated over the whole dataset"): counts
    and normalised shares per layer, of unique neurons by default.
(2) :func:`neuron_top_tokens` — a neuron's "textual meaning" (Table 6): the rows of
    W_u W_out^l, i.e. the vocabulary logits W_out^l[i] @ W_U written by neuron i of layer l per
    unit activation (FiNE eq. 3 / App. A, following Pan et al. 2024), and their top-k tokens.
    No final normalisation is applied (as in the paper); with ``fold_ln`` the final norm's weight
    is already folded into ``W_U``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

from kn_lens.errors import ConfigError
from kn_lens.neurons import Neuron, NeuronScores, NeuronSet, union

__all__ = ["LayerDistribution", "layer_distribution", "NeuronTokens", "neuron_top_tokens",
           "neuron_vocab_logits"]


@dataclass(frozen=True)
class LayerDistribution:
    n_layers: int
    counts: tuple[int, ...]
    shares: tuple[float, ...]  # counts / total
    total: int
    unique: bool
    n_sets: int

    def mean_layer(self) -> float:
        return sum(l * c for l, c in enumerate(self.counts)) / self.total if self.total else float("nan")

    def table(self) -> list[dict]:
        return [{"layer": l, "count": c, "share": round(s, 4)}
                for l, (c, s) in enumerate(zip(self.counts, self.shares))]

    def to_dict(self) -> dict:
        return asdict(self)


def layer_distribution(sets: Iterable[NeuronSet], n_layers: int, *,
                       unique: bool = True) -> LayerDistribution:
    """Per-layer counts and shares of the neurons in ``sets`` (e.g. FiNE's located set per fact).

    ``unique=True`` (FiNE Fig. 4): each distinct neuron counts once over all sets.
    ``unique=False``: a neuron counts once per set it appears in.
    """
    sets = list(sets)
    if n_layers < 1:
        raise ConfigError(f"n_layers must be >= 1, got {n_layers}")
    if unique:
        c = union(sets).layers()
    else:
        c = Counter()
        for s in sets:
            c.update(s.layers())
    bad = [l for l in c if not 0 <= l < n_layers]
    if bad:
        raise ConfigError(f"neurons in layers {sorted(bad)} outside 0..{n_layers - 1}")
    counts = tuple(int(c.get(l, 0)) for l in range(n_layers))
    total = sum(counts)
    shares = tuple(x / total if total else 0.0 for x in counts)
    return LayerDistribution(n_layers, counts, shares, total, unique, len(sets))


@dataclass(frozen=True)
class NeuronTokens:
    """A neuron's top tokens through W_out[l][i] @ W_U (FiNE Table 6 row)."""

    neuron: Neuron
    score: float | None  # the locator's score for the neuron when given
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    logits: tuple[float, ...]

    def row(self) -> dict:
        return {"neuron": f"L{self.neuron.layer}.U{self.neuron.index}",
                "score": None if self.score is None else round(self.score, 4),
                "top tokens": list(self.tokens)}


def neuron_vocab_logits(model, neuron: Neuron | tuple[int, int]) -> Tensor:
    """W_out[l][i] @ W_U: the direct vocabulary logits a unit activation of the neuron writes."""
    layer, index = (neuron.layer, neuron.index) if isinstance(neuron, Neuron) else neuron
    if not 0 <= layer < model.cfg.n_layers or not 0 <= index < model.cfg.d_mlp:
        raise ConfigError(f"neuron ({layer}, {index}) outside the model "
                          f"({model.cfg.n_layers} layers x {model.cfg.d_mlp})")
    with torch.no_grad():
        return model.W_out[layer][index] @ model.W_U


def neuron_top_tokens(model, neurons: Iterable[Neuron | tuple[int, int]] | NeuronSet, *, k: int = 5,
                      scores: NeuronScores | Tensor | None = None,
                      order: str = "score") -> list[NeuronTokens]:
    """Top-``k`` tokens (FiNE Table 6 uses 5) of each neuron's W_out[l][i] @ W_U row.

    With ``scores`` given, each row carries the neuron's score and ``order="score"`` sorts rows by
    descending score (FiNE reports "top neurons"); otherwise rows follow the input order.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    ns = [n if isinstance(n, Neuron) else Neuron(int(n[0]), int(n[1])) for n in neurons]
    t = None if scores is None else (scores.scores if isinstance(scores, NeuronScores) else scores)
    out = []
    for n in ns:
        logits = neuron_vocab_logits(model, n).float()
        vals, ids = logits.topk(min(k, logits.numel()))
        toks = tuple(model.tokenizer.decode([int(i)]) for i in ids)
        sc = None if t is None else float(t[n.layer, n.index])
        out.append(NeuronTokens(n, sc, tuple(int(i) for i in ids), toks,
                                tuple(float(v) for v in vals)))
    if t is not None and order == "score":
        out.sort(key=lambda r: -r.score)
    return out

"""Consistency-Aware Score (QL §3.3, eq. 7, App. A.1) and the comparison of KN selections for
editing (QL Table 3).

For a fact with k neighbour queries and per-query neuron scores as^{(i)}_{lp} (any locator; IG in
the paper), QL eq. 7 defines

    CAS_{lp} = β1 μ_{lp} − β2 σ_{lp},   μ_{lp} = (1/k) Σ_i as^{(i)}_{lp},
                                        σ_{lp} = sqrt((1/k) Σ_i (as^{(i)}_{lp} − μ_{lp})²)

(σ is the population standard deviation, 1/k) with β1 = 0.7, β2 = 0.3 (App. A.1), rewarding
high scores and penalising inconsistency across queries. The KNs to edit are the neurons whose CAS
exceeds 0.3 x the maximum CAS (App. A.1: "neurons larger than 0.3 times are selected as KNs").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens.errors import ConfigError, InvalidFactError, NumericalError
from kn_lens.facts import Fact
from kn_lens.neurons import NeuronScores, NeuronSet, freeze_layers

__all__ = ["CASConfig", "CASResult", "consistency_aware_score", "cas_neurons",
           "cas_neurons_by_fact", "compare_kn_selections", "SelectionComparison"]


@dataclass(frozen=True)
class CASConfig:
    beta1: float = 0.7  # QL App. A.1, eq. 7
    beta2: float = 0.3  # QL App. A.1, eq. 7
    ratio: float = 0.3  # QL App. A.1: CAS > 0.3 x max CAS
    normalize: Literal["none", "max"] = "none"  # QL uses raw scores; "max": divide each by its max
    freeze_last: int = 0  # optionally exclude the last l_f layers from selection

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.normalize not in ("none", "max"):
            raise ConfigError(f"normalize must be 'none' or 'max', not {self.normalize!r}")


@dataclass(frozen=True)
class CASResult:
    cas: Float[Tensor, "layer d_mlp"]
    mean: Float[Tensor, "layer d_mlp"]
    std: Float[Tensor, "layer d_mlp"]
    neurons: NeuronSet
    config: CASConfig
    n_queries: int
    extras: dict = field(default_factory=dict, compare=False)


def _stack(scores: Sequence[NeuronScores | Tensor], normalize: str) -> Tensor:
    ts = [(s.scores if isinstance(s, NeuronScores) else s).float() for s in scores]
    if len(ts) < 1:
        raise InvalidFactError("CAS needs the scores of at least one query")
    shapes = {tuple(t.shape) for t in ts}
    if len(shapes) != 1:
        raise InvalidFactError(f"score maps of different shapes: {sorted(shapes)}")
    x = torch.stack(ts)
    if not torch.isfinite(x).all():
        raise NumericalError("non-finite neuron scores given to CAS")
    if normalize == "max":
        m = x.flatten(1).max(dim=1).values.clamp_min(1e-30)
        x = x / m[:, None, None]
    return x


def consistency_aware_score(scores: Sequence[NeuronScores | Tensor], *,
                            config: CASConfig = CASConfig()) -> CASResult:
    """QL eq. 7 over the score maps of a fact's neighbour queries, and the selected KNs
    (CAS > ratio x max CAS; none when the maximum CAS is not positive)."""
    x = _stack(scores, config.normalize)
    mu = x.mean(dim=0)
    sigma = x.std(dim=0, unbiased=False)  # 1/k, as eq. 7
    cas = config.beta1 * mu - config.beta2 * sigma
    sel = freeze_layers(cas, last=config.freeze_last) if config.freeze_last else cas
    top = sel.max()
    neurons = NeuronSet.from_mask(sel > config.ratio * top) if top > 0 else NeuronSet()
    return CASResult(cas, mu, sigma, neurons, config, x.shape[0])


def cas_neurons(scores: Sequence[NeuronScores | Tensor], *,
                config: CASConfig = CASConfig()) -> NeuronSet:
    """The CAS-selected KN set of one fact."""
    return consistency_aware_score(scores, config=config).neurons


def cas_neurons_by_fact(scores_by_fact: Mapping[Fact, Sequence[NeuronScores | Tensor]], *,
                        config: CASConfig = CASConfig()) -> dict[Fact, NeuronSet]:
    """A CAS NeuronSet per fact."""
    return {f: cas_neurons(s, config=config) for f, s in scores_by_fact.items()}


# --------------------------------------------------------------------------- QL Table 3


@dataclass(frozen=True)
class SelectionComparison:
    """Erasure / update metrics of each KN selection (QL Table 3 rows), per group."""

    rows: tuple[dict, ...]  # {"operation", "selection", "group", "n", metric means...}
    per_edit: tuple[dict, ...]
    config: dict

    def table(self) -> list[dict]:
        return [dict(r) for r in self.rows]

    def to_markdown(self) -> str:
        from kn_lens.analysis.consistency import markdown_table

        return markdown_table(self.table())

    def to_dict(self) -> dict:
        return {"config": self.config, "rows": list(self.rows), "per_edit": list(self.per_edit)}


def compare_kn_selections(*args, **kwargs) -> SelectionComparison:  # pragma: no cover - replaced below
    raise NotImplementedError

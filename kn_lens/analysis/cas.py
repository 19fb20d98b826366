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
from kn_lens.evaluate.perplexity import PreparedReference
from kn_lens.facts import Fact
from kn_lens.neurons import NeuronScores, NeuronSet, freeze_layers, union

__all__ = ["CASConfig", "CASResult", "consistency_aware_score", "cas_neurons",
           "cas_neurons_by_fact", "compare_kn_selections", "kn_selection_edits", "CompareConfig",
           "SelectionComparison"]


@dataclass(frozen=True, kw_only=True)
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
        return [{k: _clean(v, 3) for k, v in r.items()} for r in self.rows]

    def regroup(self, groups: Mapping[Fact | str, str]) -> "SelectionComparison":
        """The same edits summarised under another grouping of the facts (e.g. the Otsu K_I / K_II
        labels instead of the static ones): ``groups`` maps a fact (or its ``key()``) to a label;
        facts it does not name get no group. No edit is re-run."""
        by_key = {(k.key() if isinstance(k, Fact) else k): v for k, v in groups.items()}
        per_edit = tuple({**r, "group": by_key.get(r["fact"])} for r in self.per_edit)
        ops = tuple(dict.fromkeys(r["operation"] for r in self.rows))
        sels = tuple(dict.fromkeys(r["selection"] for r in self.rows))
        return SelectionComparison(tuple(_rows(per_edit, ops, sels)), per_edit, self.config)

    def to_markdown(self) -> str:
        from kn_lens.analysis.consistency import markdown_table

        return markdown_table(self.table())

    def to_dict(self) -> dict:
        return {"config": self.config,
                "rows": [{k: _clean(v) for k, v in r.items()} for r in self.rows],
                "per_edit": [{k: _clean(v) for k, v in r.items()} for r in self.per_edit]}


def _clean(v, nd: int | None = None):
    """NaN -> None (valid JSON, empty markdown cell); floats rounded to ``nd`` when given."""
    if isinstance(v, float):
        if v != v:
            return None
        return round(v, nd) if nd is not None else v
    return v


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    selections: tuple[str, ...] = ("N_i", "N_g", "CAS")  # QL Table 3 rows: local, global, ours
    operations: tuple[str, ...] = ("erasure", "update")  # QL eq. 2
    edit_queries: Literal["all", "first"] = "all"  # edit each q_i in turn, or only q_1
    n_locality: int = 8  # out-of-scope queries (other facts' first template) when none are given
    seed: int = 0  # picks the out-of-scope facts and default new objects

    def __post_init__(self) -> None:
        bad = [x for x in self.selections if x not in ("N_i", "N_g", "CAS")]
        if bad:
            raise ConfigError(f"unknown selections {bad}; choose from N_i, N_g, CAS")
        bad = [x for x in self.operations if x not in ("erasure", "update")]
        if bad:
            raise ConfigError(f"unknown operations {bad}; choose from erasure, update")
        if self.edit_queries not in ("all", "first"):
            raise ConfigError("edit_queries must be 'all' or 'first'")


def compare_kn_selections(model, scores_by_fact: Mapping[Fact, Sequence[NeuronScores]], *,
                          selection=None, cas_config: CASConfig = CASConfig(),
                          config: CompareConfig = CompareConfig(),
                          groups: Mapping[Fact, str] | None = None,
                          new_objects: Mapping[Fact, str] | None = None,
                          locality: Sequence | None = None,
                          reference: PreparedReference | Tensor | Sequence[Tensor] | None = None,
                          edit_config=None,
                          done: Mapping[Fact, Sequence[dict]] | None = None
                          ) -> SelectionComparison:
    """QL Table 3: erase / update a fact through three KN selections and measure the edits.

    For every fact (its neighbour queries' ``NeuronScores``, each carrying its query) and every
    edited query q_i: N_i = the query's own KNs (``selection``, Dai et al.'s 0.2 x max by
    default), N_g = the union over the fact's queries, CAS = :func:`cas_neurons` of the fact's
    scores. Each set is erased or updated with ``kn_lens.edit.kn`` (QL eq. 2) and judged with
    ``kn_lens.evaluate.evaluate_edit``: reliability on q_i, generalisation on the other queries,
    locality on ``locality`` queries (default: the first query of up to ``n_locality`` other
    facts), dPPL on ``reference`` token slices when given. Update targets ``new_objects[fact]``
    (default: :func:`kn_lens.datasets.new_objects` over ``facts``: another object of the same
    relation, else any, with a different first token).

    Rows are means per (operation, selection, group), group "all" plus each label in ``groups``
    (e.g. ``ConsistencyResult.labels["static"]``). Edits whose set is empty are skipped and counted.
    ``done``: per-edit records of some facts already computed by :func:`kn_selection_edits` with
    the same settings (a sweep's ``kn_modification`` items): those facts are not edited again.
    """
    from kn_lens.analysis.consistency import KNSelection

    selection = selection or KNSelection()
    facts = list(scores_by_fact)
    if not facts:
        raise InvalidFactError("compare_kn_selections needs at least one fact")
    for f in facts:
        if len(scores_by_fact[f]) < 2 or any(s.query is None for s in scores_by_fact[f]):
            raise InvalidFactError(f"fact {f.key()!r} needs >= 2 NeuronScores, each with its query")
    if "update" in config.operations and new_objects is None:
        from kn_lens.datasets.edits import new_objects as draw_new_objects

        new_objects = draw_new_objects(facts, seed=config.seed, model=model)
    g = torch.Generator(device="cpu").manual_seed(config.seed)
    per_edit = []
    for f in facts:
        if locality is None:  # drawn for every fact (done or not): the same draws either way
            others = [o for o in facts if o != f]
            perm = torch.randperm(len(others), generator=g,
                                  device="cpu")[:config.n_locality].tolist()
            loc = [scores_by_fact[others[j]][0].query for j in perm]
        else:
            loc = [q for q in locality if q.fact != f]
        if done is not None and f in done:  # computed elsewhere (e.g. a sweep): just regroup
            per_edit += [{**r, "group": None if groups is None else groups.get(f)}
                         for r in done[f]]
            continue
        per_edit += kn_selection_edits(
            model, scores_by_fact[f], selection=selection, cas_config=cas_config, config=config,
            group=None if groups is None else groups.get(f),
            new_object=None if new_objects is None else new_objects[f], locality=loc,
            reference=reference, edit_config=edit_config)
    rows = _rows(per_edit, config.operations, config.selections)
    cfg = {"compare": asdict(config), "cas": asdict(cas_config), "selection": asdict(selection),
           "n_facts": len(facts), "reference": reference is not None}
    return SelectionComparison(tuple(rows), tuple(per_edit), cfg)


def kn_selection_edits(model, scores: Sequence[NeuronScores], *, selection=None,
                       cas_config: CASConfig = CASConfig(), config: CompareConfig = CompareConfig(),
                       group: str | None = None, new_object: str | None = None,
                       locality: Sequence = (),
                       reference: PreparedReference | Tensor | Sequence[Tensor] | None = None,
                       edit_config=None) -> list[dict]:
    """One fact's part of :func:`compare_kn_selections`: its neighbour queries' ``scores`` (each
    with its query), every edited query x selection x operation erased / updated and judged;
    ``locality``: the out-of-scope queries; ``new_object``: the update target. Returns one record
    per edit (``skipped`` when the selected set is empty)."""
    from kn_lens.analysis.consistency import KNSelection, select_kns
    from kn_lens.edit import kn as kn_edit
    from kn_lens.evaluate import evaluate_edit, retarget

    selection = selection or KNSelection()
    scores = list(scores)
    if len(scores) < 2 or any(s.query is None for s in scores):
        raise InvalidFactError("kn_selection_edits needs >= 2 NeuronScores, each with its query")
    if "update" in config.operations and new_object is None:
        raise InvalidFactError("kn_selection_edits: an update needs new_object")
    fact = scores[0].query.fact
    ekw = {} if edit_config is None else {"config": edit_config}
    queries = [s.query for s in scores]
    local = [select_kns(s, selection) for s in scores]
    sets = {"N_g": union(local), "CAS": cas_neurons(scores, config=cas_config)}
    loc = list(locality)
    out = []
    targets = range(len(queries)) if config.edit_queries == "all" else range(1)
    for i in targets:
        neighbours = [q for j, q in enumerate(queries) if j != i]
        for sel in config.selections:
            ns = local[i] if sel == "N_i" else sets[sel]
            for op in config.operations:
                rec = {"fact": fact.key(), "query_index": i, "selection": sel, "operation": op,
                       "group": group, "n_neurons": len(ns)}
                if not len(ns):
                    rec["skipped"] = True
                    out.append(rec)
                    continue
                if op == "erasure":
                    edit = kn_edit.erase(model, ns)
                    m = evaluate_edit(model, edit, edited=[queries[i]], generalisation=neighbours,
                                      locality=loc, mode="erasure", reference=reference)
                else:
                    edit = kn_edit.update(model, ns, queries[i], new_object, **ekw)
                    m = evaluate_edit(model, edit, edited=[retarget(model, queries[i], new_object)],
                                      generalisation=[retarget(model, q, new_object)
                                                      for q in neighbours],
                                      locality=loc, mode="update", reference=reference)
                rec.update(m.summary())
                rec["skipped"] = False
                out.append(rec)
    return out


def _rows(per_edit: Sequence[dict], operations: Sequence[str], selections: Sequence[str]
          ) -> list[dict]:
    """Mean metrics per (operation, group, selection); group "all" plus each edit's "group"."""
    rows = []
    group_names = ["all"] + sorted({r["group"] for r in per_edit if r["group"] is not None})
    for op in operations:
        for grp in group_names:
            for sel in selections:
                rs = [r for r in per_edit if r["operation"] == op and r["selection"] == sel
                      and (grp == "all" or r["group"] == grp)]
                done = [r for r in rs if not r["skipped"]]
                row = {"operation": op, "group": grp, "selection": sel, "n": len(done),
                       "skipped": len(rs) - len(done),
                       "mean |set|": _mean([r["n_neurons"] for r in rs])}
                for key, col in (("reliability", "Rel"), ("generalisation", "Gen"),
                                 ("locality", "Loc"), ("average", "Avg"), ("dppl", "dPPL")):
                    row[col] = _mean([r[key] for r in done if r.get(key) is not None])
                rows.append(row)
    return rows


def _mean(xs) -> float:
    import math

    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    return sum(xs) / len(xs) if xs else float("nan")

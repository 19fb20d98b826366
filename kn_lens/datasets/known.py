"""Which facts does a model know? Rank and probability of the answer for every fact x template.

For each fact and each template of its relation, one :class:`~kn_lens.facts.Query` is scored:

- ``rank``: the rank of the answer's FIRST token among all tokens at the prompt's last position
  (0 = top-1; ties count in the answer's favour, as in :func:`kn_lens.facts.predict`);
- ``log_prob``: log P(whole answer | prompt), teacher-forced over all answer tokens.

A fact is *known* when ``rank <= max_rank`` on at least ``min_share`` of its templates (ParaRel /
KN papers keep facts the model gets right on most paraphrases). Queries are scored in batches with
right padding (exact for causal LMs) and one forward pass per batch; only the answer positions are
unembedded, so memory does not grow with the vocabulary (Gemma-3 has 262k tokens).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence


from kn_lens.errors import ConfigError, DataFileError, InvalidFactError, KnLensError
from kn_lens.facts import Fact, Query, Relation, make_query
from kn_lens.models import ModelInfo, model_info

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from kn_lens.datasets.core import Dataset


@dataclass(frozen=True, kw_only=True)
class KnownFactsConfig:
    max_rank: int = 0  # answer's first token must be top-(max_rank+1); 0 = top-1 (KN / ParaRel)
    min_share: float = 0.6  # share of a fact's templates that must pass ("most templates")
    batch_size: int = 32  # queries per forward pass; never changes the result

    def __post_init__(self) -> None:
        if self.max_rank < 0:
            raise ConfigError(f"max_rank must be >= 0 (0 = top-1), got {self.max_rank}")
        if not 0.0 < self.min_share <= 1.0:
            raise ConfigError(f"min_share must be in (0, 1], got {self.min_share}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class RelationSummary:
    relation: str
    n_facts: int
    n_known: int
    top1_per_template: tuple[float, ...]  # share of the relation's facts with rank 0, per template

    @property
    def share(self) -> float:
        return self.n_known / self.n_facts if self.n_facts else 0.0


@dataclass(frozen=True)
class KnownFacts:
    """Per-query ranks/probabilities and the known/unknown verdict per fact.

    ``ranks[i][t]`` / ``log_probs[i][t]`` belong to ``facts[i]`` rendered with template ``t`` of its
    relation (``templates[facts[i].relation][t]``). Facts the model's tokenizer cannot encode
    (answer or prompt) are left out of ``facts`` and listed in ``skipped`` with the reason.
    """

    facts: tuple[Fact, ...]
    templates: Mapping[str, tuple[str, ...]]
    ranks: tuple[tuple[int, ...], ...]
    log_probs: tuple[tuple[float, ...], ...]
    known: tuple[bool, ...]
    config: KnownFactsConfig
    model: ModelInfo
    skipped: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.facts)

    def known_facts(self) -> tuple[Fact, ...]:
        return tuple(f for f, k in zip(self.facts, self.known) if k)

    def unknown_facts(self) -> tuple[Fact, ...]:
        return tuple(f for f, k in zip(self.facts, self.known) if not k)

    def pass_share(self, i: int) -> float:
        """Share of fact i's templates where the answer's first token has rank <= max_rank."""
        r = self.ranks[i]
        return sum(0 <= x <= self.config.max_rank for x in r) / len(r) if r else 0.0

    def best_template(self, i: int) -> int:
        """Index of the template with the highest P(answer) for fact i."""
        lp = self.log_probs[i]
        return max(range(len(lp)), key=lambda t: lp[t])

    @property
    def n_known(self) -> int:
        return sum(self.known)

    def per_relation(self) -> tuple[RelationSummary, ...]:
        out = []
        for rel, temps in self.templates.items():
            idx = [i for i, f in enumerate(self.facts) if f.relation == rel]
            if not idx:
                continue
            top1 = tuple(sum(self.ranks[i][t] == 0 for i in idx) / len(idx) for t in range(len(temps)))
            out.append(RelationSummary(rel, len(idx), sum(self.known[i] for i in idx), top1))
        return tuple(out)

    def to_markdown(self, *, templates: bool = True) -> str:
        """Per-relation table: facts, known, share, top-1 accuracy per template."""
        rows = self.per_relation()
        n_t = max((len(r.top1_per_template) for r in rows), default=0)
        head = "| relation | facts | known | share |"
        sep = "|---|---:|---:|---:|"
        if templates:
            head += "".join(f" top-1 t{t} |" for t in range(n_t))
            sep += "---:|" * n_t
        lines = [head, sep]
        for r in rows:
            line = f"| {r.relation} | {r.n_facts} | {r.n_known} | {r.share:.0%} |"
            if templates:
                cells = [f" {x:.0%} |" for x in r.top1_per_template]
                cells += [" |"] * (n_t - len(cells))
                line += "".join(cells)
            lines.append(line)
        total = sum(r.n_facts for r in rows)
        known = sum(r.n_known for r in rows)
        lines.append(f"| **all** | {total} | {known} | {known / total if total else 0:.0%} |"
                     + (" |" * n_t if templates else ""))
        return "\n".join(lines)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "model": self.model.to_dict(),
            "templates": {k: list(v) for k, v in self.templates.items()},
            "seconds": self.seconds,
            "n_facts": len(self.facts),
            "n_known": self.n_known,
            "skipped": [list(s) for s in self.skipped],
            "facts": [
                {"subject": f.subject, "relation": f.relation, "object": f.object,
                 "aliases": list(f.aliases), "known": k, "ranks": list(r),
                 "log_probs": [None if not math.isfinite(x) else round(x, 5) for x in lp]}
                for f, k, r, lp in zip(self.facts, self.known, self.ranks, self.log_probs)
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "KnownFacts":
        try:
            facts = tuple(Fact(r["subject"], r["relation"], r["object"], tuple(r.get("aliases", ())))
                          for r in d["facts"])
            return cls(
                facts=facts,
                templates={k: tuple(v) for k, v in d["templates"].items()},
                ranks=tuple(tuple(int(x) for x in r["ranks"]) for r in d["facts"]),
                log_probs=tuple(tuple(-math.inf if x is None else float(x) for x in r["log_probs"])
                                for r in d["facts"]),
                known=tuple(bool(r["known"]) for r in d["facts"]),
                config=KnownFactsConfig(**d["config"]),
                model=ModelInfo(**d["model"]),
                skipped=tuple(tuple(s) for s in d.get("skipped", [])),
                seconds=float(d.get("seconds", 0.0)),
            )
        except (KeyError, TypeError) as e:
            raise DataFileError(f"not a KnownFacts record (missing or malformed field: {e})") from None

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        if extra:
            d = {**extra, **d}
        path.write_text(json.dumps(d, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "KnownFacts":
        path = Path(path)
        if not path.is_file():
            raise DataFileError(f"{path} does not exist; expected a saved KnownFacts JSON file")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(d)


# --------------------------------------------------------------------------- scoring


def score_queries(model: "HookedTransformer", queries: Sequence[Query], *, batch_size: int = 32
                  ) -> tuple[list[int], list[float]]:
    """Rank of each query's first answer token (0 = top-1) and teacher-forced log P(answer),
    from the one scorer (:func:`kn_lens.evaluate.scoring.score`)."""
    from kn_lens.evaluate.scoring import score

    scores = score(model, queries, batch_size=batch_size)
    return [s.ranks[0] for s in scores], [s.logprob for s in scores]


def _relations_map(relations) -> dict[str, Relation]:
    from kn_lens.datasets.core import Dataset

    if isinstance(relations, Dataset):
        return dict(relations.relations)
    if isinstance(relations, Mapping):
        return dict(relations)
    return {r.id: r for r in relations}


def known_facts(
    model: "HookedTransformer",
    facts: Iterable[Fact],
    relations: "Mapping[str, Relation] | Iterable[Relation] | Dataset",
    *,
    max_rank: int = 0,
    min_share: float = 0.6,
    batch_size: int = 32,
    config: KnownFactsConfig | None = None,
) -> KnownFacts:
    """Score every fact with every template of its relation and decide which facts are known.

    ``config`` (if given) overrides ``max_rank``, ``min_share`` and ``batch_size``. Facts whose
    answer or prompts the tokenizer cannot encode are skipped and listed in ``result.skipped``.
    """
    cfg = config or KnownFactsConfig(max_rank=max_rank, min_share=min_share, batch_size=batch_size)
    rels = _relations_map(relations)
    facts = tuple(facts)
    if not facts:
        raise InvalidFactError("known_facts needs at least one fact")
    t0 = time.perf_counter()
    queries: list[Query] = []
    owner: list[tuple[int, int]] = []
    kept: list[Fact] = []
    skipped: list[tuple[str, str]] = []
    for f in facts:
        if f.relation not in rels:
            raise InvalidFactError(f"fact {f.key()!r}: relation {f.relation!r} not in relations")
        rel = rels[f.relation]
        try:
            qs = [make_query(model, f, t, template_index=k) for k, t in enumerate(rel.templates)]
        except KnLensError as e:  # TokenizationError and friends: record, do not guess
            skipped.append((f.key(), str(e)))
            continue
        fi = len(kept)
        kept.append(f)
        for k, q in enumerate(qs):
            queries.append(q)
            owner.append((fi, k))
    if not kept:
        raise InvalidFactError(f"no fact could be tokenised for this model: {skipped[:3]}")
    ranks, logps = score_queries(model, queries, batch_size=cfg.batch_size)
    per_r: list[list[int]] = [[0] * len(rels[f.relation].templates) for f in kept]
    per_lp: list[list[float]] = [[0.0] * len(rels[f.relation].templates) for f in kept]
    for (fi, k), r, lp in zip(owner, ranks, logps):
        per_r[fi][k] = r
        per_lp[fi][k] = lp
    known = tuple(
        sum(x <= cfg.max_rank for x in r) >= cfg.min_share * len(r) - 1e-9 for r in per_r
    )
    used = {f.relation for f in kept}
    return KnownFacts(
        facts=tuple(kept),
        templates={rid: rels[rid].templates for rid in rels if rid in used},
        ranks=tuple(tuple(r) for r in per_r),
        log_probs=tuple(tuple(lp) for lp in per_lp),
        known=known,
        config=cfg,
        model=model_info(model),
        skipped=tuple(skipped),
        seconds=time.perf_counter() - t0,
    )

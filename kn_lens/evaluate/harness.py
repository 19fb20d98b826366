"""The evaluation harness: one edit (or many) judged on three protocols that are never mixed.

For each request a :class:`~kn_lens.evaluate.probes.ProbeSet` is scored once before and once
after the edit by the one scorer (:func:`kn_lens.evaluate.scoring.score`), and greedy
continuations are generated. Every number is tagged with its protocol:

1. ``counterfact`` (ROME, Meng et al. 2022): per prompt the mean per-token NLL of the new and the
   true object; **ES** (rewrite), **PS** (paraphrases) = share of prompts with P(new) > P(true),
   **NS** (neighbourhood) = share with P(true) > P(new), magnitudes **EM / PM** =
   mean(P(new) - P(true)) and **NM** = mean(P(true) - P(new)) with P = exp(-mean NLL) (ROME's
   summarize.py), **Score** = harmonic mean of ES, PS, NS (computed on the aggregates, as ROME).
   TNF-DA's argmax variant (``ES_argmax`` ...): the greedy, teacher-forced answer is the object
   (every token the argmax). ``prefix_success``: ES on held-out random-prefix variants.
2. ``tokens`` (EasyEdit / KnowEdit, teacher-forced token accuracy): ``rewrite_acc``,
   ``paraphrase_acc``, ``prefix_acc`` (share of the new object's tokens that are the argmax),
   ``locality`` (neighbourhood prompts) and ``locality_relation`` (the same subject with other
   relations): share of the true answer's positions whose argmax is unchanged by the edit;
   ``portability``: rewrite accuracy with the subject's aliases (FiNE's portability).
3. ``generation``: greedy continuations of the rewrite prompt and ``n_generation_paraphrases``
   paraphrases; ``rewrite_success`` / ``paraphrase_success`` = the new object appears as text,
   ``old_mentioned`` = the old object does, ``fluency`` = ROME's n-gram entropy (x100), and
   ``dppl`` = relative perplexity change on reference prose (one value per edit).

Per-request rows keep every value before and after; aggregates are means over requests with 95 %
percentile-bootstrap intervals (seeded). Modes: :func:`evaluate` (one edit, any number of
requests: batch editing judges all of them under the one edit), :func:`edit_and_evaluate`
(compute edits in batches of K with a registered editor, judge each request under its batch's
edit) and :func:`sequential` (N edits applied one after another; all earlier requests re-measured
at checkpoints).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from kn_lens.edit.delta import Edit, compose
from kn_lens.errors import ConfigError
from kn_lens.evaluate import generation as G
from kn_lens.evaluate.metrics import edit_active
from kn_lens.evaluate.perplexity import PreparedReference, perplexity, relative_ppl_change
from kn_lens.evaluate.probes import ProbeSet
from kn_lens.evaluate.scoring import AnswerScore, score
from kn_lens.facts import EditRequest
from kn_lens.models import model_info

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

PROTOCOLS = ("counterfact", "tokens", "generation")
METRICS: dict[str, tuple[str, ...]] = {
    "counterfact": ("ES", "PS", "NS", "EM", "PM", "NM", "ES_argmax", "PS_argmax", "NS_argmax",
                    "prefix_success"),
    "tokens": ("rewrite_acc", "paraphrase_acc", "prefix_acc", "locality", "locality_relation",
               "portability"),
    "generation": ("rewrite_success", "paraphrase_success", "old_mentioned", "fluency", "dppl"),
}


@dataclass(frozen=True, kw_only=True)
class HarnessConfig:
    protocols: tuple[str, ...] = PROTOCOLS
    max_new_tokens: int = 32  # greedy continuation length (ROME: 100 tokens incl. the prompt)
    n_generation_paraphrases: int = 2  # generation prompts: the rewrite prompt + this many
    n_prefix_probes: int = 3  # held-out random-prefix variants of the rewrite prompt
    batch_size: int = 32
    n_bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    apply: str = "auto"  # "hooks", "materialise" or "auto" (hooks when they can express the edit)

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocols", tuple(self.protocols))
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ConfigError(f"unknown protocol(s) {bad}; choose from {PROTOCOLS}")
        if self.max_new_tokens < 1 or self.n_generation_paraphrases < 0 or self.n_prefix_probes < 0:
            raise ConfigError("max_new_tokens >= 1, n_generation_paraphrases >= 0, "
                              "n_prefix_probes >= 0")
        if self.batch_size < 1 or self.n_bootstrap < 0 or not 0 < self.ci < 1:
            raise ConfigError("batch_size >= 1, n_bootstrap >= 0, 0 < ci < 1")
        if self.apply not in ("auto", "hooks", "materialise"):
            raise ConfigError(f"apply must be 'auto', 'hooks' or 'materialise', not {self.apply!r}")


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class RequestState:
    """One request's probes scored under one model state (before or after an edit)."""

    true: tuple[AnswerScore, ...]  # per probe, in ProbeSet order
    new: tuple[AnswerScore | None, ...]
    generations: tuple[tuple[str, str], ...]  # (prompt, continuation)

    def to_dict(self) -> dict:
        """JSON-ready (a stored measurement; :meth:`from_dict` reads it back exactly)."""
        from dataclasses import asdict

        return {"true": [asdict(s) for s in self.true],
                "new": [None if s is None else asdict(s) for s in self.new],
                "generations": [list(g) for g in self.generations]}

    @classmethod
    def from_dict(cls, d: dict) -> "RequestState":
        def one(s):
            return None if s is None else AnswerScore(**{k: tuple(v) for k, v in s.items()})
        return cls(tuple(one(s) for s in d["true"]), tuple(one(s) for s in d["new"]),
                   tuple(tuple(g) for g in d["generations"]))

    def matches(self, ps: "ProbeSet") -> bool:
        """Whether this state scored exactly ``ps``'s probes (same answers, same order)."""
        if len(self.true) != len(ps.probes) or len(self.new) != len(ps.probes):
            return False
        for p, t, n in zip(ps.probes, self.true, self.new):
            if tuple(t.answer_ids) != tuple(p.true.answer_ids):
                return False
            if (p.new is None) != (n is None) or (
                    n is not None and tuple(n.answer_ids) != tuple(p.new.answer_ids)):
                return False
        return True


def _generation_probes(ps: ProbeSet, cfg: HarnessConfig):
    return list(ps.of("rewrite")) + list(ps.of("paraphrase"))[: cfg.n_generation_paraphrases]


def measure(model: "HookedTransformer", probesets: Sequence[ProbeSet], *,
            config: HarnessConfig = HarnessConfig(), fwd_hooks: list | None = None
            ) -> list[RequestState]:
    """Score every probe of every set (one batched pass) and generate (if the protocol is on)."""
    queries, owners = [], []
    for i, ps in enumerate(probesets):
        for q in ps.queries():
            queries.append(q)
            owners.append(i)
    # the hooks here are an edit's deltas (alike on every row): identical rows are shared
    scores = score(model, queries, fwd_hooks=fwd_hooks, batch_size=config.batch_size,
                   share_rows=True)
    gen_probes = [_generation_probes(ps, config) if "generation" in config.protocols else []
                  for ps in probesets]
    flat = [p for g in gen_probes for p in g]
    texts = iter(G.continue_texts(model, [p.true.prompt_ids for p in flat], config.max_new_tokens,
                                  fwd_hooks=fwd_hooks) if flat else [])
    out = []
    k = 0
    for ps, gp in zip(probesets, gen_probes):
        true, new = [], []
        for p in ps.probes:
            true.append(scores[k])
            k += 1
            if p.new is not None:
                new.append(scores[k])
                k += 1
            else:
                new.append(None)
        gens = tuple((p.prompt, next(texts)) for p in gp)
        out.append(RequestState(tuple(true), tuple(new), gens))
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(sum(xs) / len(xs)) if xs else float("nan")


def request_metrics(ps: ProbeSet, state: RequestState, before: RequestState, *,
                    config: HarnessConfig = HarnessConfig(), dppl: float | None = None
                    ) -> dict[str, dict[str, float]]:
    """Every protocol's metrics for one request (``state`` judged against ``before``)."""
    idx: dict[str, list[int]] = {}
    for j, p in enumerate(ps.probes):
        idx.setdefault(p.kind, []).append(j)

    def over(kind, fn):
        return _mean([fn(j) for j in idx.get(kind, [])])

    t, n, b = state.true, state.new, before.true
    out: dict[str, dict[str, float]] = {}
    if "counterfact" in config.protocols:
        succ = lambda j: float(n[j].mean_nll < t[j].mean_nll)  # noqa: E731
        mag = lambda j: n[j].mean_prob - t[j].mean_prob  # noqa: E731
        out["counterfact"] = {
            "ES": over("rewrite", succ), "PS": over("paraphrase", succ),
            "NS": over("neighbourhood", lambda j: float(t[j].mean_nll < n[j].mean_nll)),
            "EM": over("rewrite", mag), "PM": over("paraphrase", mag),
            "NM": over("neighbourhood", lambda j: -mag(j)),
            "ES_argmax": over("rewrite", lambda j: float(n[j].exact)),
            "PS_argmax": over("paraphrase", lambda j: float(n[j].exact)),
            "NS_argmax": over("neighbourhood", lambda j: float(t[j].exact)),
            "prefix_success": over("prefix", succ),
        }
    if "tokens" in config.protocols:
        out["tokens"] = {
            "rewrite_acc": over("rewrite", lambda j: n[j].accuracy),
            "paraphrase_acc": over("paraphrase", lambda j: n[j].accuracy),
            "prefix_acc": over("prefix", lambda j: n[j].accuracy),
            "locality": over("neighbourhood", lambda j: t[j].agreement(b[j])),
            "locality_relation": over("relation", lambda j: t[j].agreement(b[j])),
            "portability": over("alias", lambda j: n[j].accuracy),
        }
    if "generation" in config.protocols:
        gens = state.generations
        n_rw = len(ps.of("rewrite"))
        new_obj, old_obj = ps.request.new_object, ps.request.fact.object
        out["generation"] = {
            "rewrite_success": _mean([float(G.mentions(c, new_obj)) for _, c in gens[:n_rw]]),
            "paraphrase_success": _mean([float(G.mentions(c, new_obj)) for _, c in gens[n_rw:]]),
            "old_mentioned": _mean([float(G.mentions(c, old_obj)) for _, c in gens]),
            "fluency": G.fluency([p + c for p, c in gens]),
            "dppl": float("nan") if dppl is None else float(dppl),
        }
    return out


# --------------------------------------------------------------------------- aggregates


@dataclass(frozen=True)
class Aggregate:
    mean: float
    lo: float
    hi: float
    n: int

    def fmt(self, scale: float = 1.0, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.lo):
            return f"{self.mean * scale:.{digits}g}"
        return f"{self.mean * scale:.{digits}g} [{self.lo * scale:.{digits}g}, {self.hi * scale:.{digits}g}]"


def _harmonic(xs: Sequence[float]) -> float:
    if any(math.isnan(x) for x in xs):
        return float("nan")
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def _bootstrap(values: list[list[float]], stat, cfg: HarnessConfig) -> tuple[float, float]:
    """Percentile bootstrap over requests of ``stat(columns)``; rows are requests."""
    n = len(values)
    if n < 2 or cfg.n_bootstrap == 0:
        return float("nan"), float("nan")
    rng = random.Random(cfg.seed)
    stats = []
    for _ in range(cfg.n_bootstrap):
        rows = [values[rng.randrange(n)] for _ in range(n)]
        cols = list(zip(*rows))
        stats.append(stat(cols))
    stats = sorted(s for s in stats if not math.isnan(s))
    if not stats:
        return float("nan"), float("nan")
    a = (1 - cfg.ci) / 2
    return stats[int(a * (len(stats) - 1))], stats[int(round((1 - a) * (len(stats) - 1)))]


def aggregate(rows: Sequence[dict[str, dict[str, float]]], config: HarnessConfig = HarnessConfig()
              ) -> dict[str, dict[str, Aggregate]]:
    """Means over requests with bootstrap intervals, per protocol; ``counterfact`` also gets
    ``Score`` and ``Score_argmax`` (harmonic means of the aggregate ES / PS / NS)."""
    out: dict[str, dict[str, Aggregate]] = {}
    for proto in config.protocols:
        out[proto] = {}
        for m in METRICS[proto]:
            vals = [r[proto][m] for r in rows if proto in r and not math.isnan(r[proto][m])]
            if not vals:
                out[proto][m] = Aggregate(float("nan"), float("nan"), float("nan"), 0)
                continue
            lo, hi = _bootstrap([[v] for v in vals], lambda c: _mean(c[0]), config)
            out[proto][m] = Aggregate(_mean(vals), lo, hi, len(vals))
        if proto == "counterfact":
            for name, keys in (("Score", ("ES", "PS", "NS")),
                               ("Score_argmax", ("ES_argmax", "PS_argmax", "NS_argmax"))):
                table = [[r[proto][k] for k in keys] for r in rows if proto in r]
                value = _harmonic([out[proto][k].mean for k in keys])
                lo, hi = _bootstrap(table, lambda c: _harmonic([_mean(x) for x in c]), config)
                out[proto][name] = Aggregate(value, lo, hi, len(table))
    return out


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class RequestRow:
    case_id: int
    subject: str
    relation: str
    old: str
    new: str
    edit_index: int  # which edit of the report judged this request
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    generations: tuple[dict, ...] = ()  # {"prompt", "before", "after"}

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "subject": self.subject, "relation": self.relation,
                "old": self.old, "new": self.new, "edit_index": self.edit_index,
                "before": self.before, "after": self.after, "generations": list(self.generations)}


@dataclass(frozen=True)
class EditReport:
    """Per-request rows and per-protocol aggregates (before and after) for one method."""

    method: str
    mode: str  # "single" | "batch(K)" | "sequential(N)"
    rows: tuple[RequestRow, ...]
    before: dict[str, dict[str, Aggregate]]
    after: dict[str, dict[str, Aggregate]]
    n_edits: int
    params_changed: float  # mean over edits of the number of weights changed
    params_total: int
    seconds_per_edit: float
    model: Any
    config: HarnessConfig
    extras: dict = field(default_factory=dict, compare=False)

    @property
    def share_changed(self) -> float:
        return self.params_changed / self.params_total if self.params_total else float("nan")

    def value(self, protocol: str, metric: str) -> float:
        return self.after[protocol][metric].mean

    def table(self) -> str:
        """Markdown: one row per (protocol, metric), before and after with 95 % intervals."""
        lines = [f"**{self.method}** ({self.mode}; {len(self.rows)} requests, {self.n_edits} "
                 f"edit(s), {self.seconds_per_edit:.2f} s/edit, {self.share_changed:.2e} of the "
                 "weights changed)", "",
                 "| protocol | metric | before | after [95% CI] | n |", "|---|---|---:|---:|---:|"]
        for proto, metrics in self.after.items():
            for m, agg in metrics.items():
                b = self.before.get(proto, {}).get(m)
                lines.append(f"| {proto} | {m} | {b.fmt() if b else ''} | {agg.fmt()} | {agg.n} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def aggs(d):
            return {p: {m: {"mean": a.mean, "lo": a.lo, "hi": a.hi, "n": a.n}
                        for m, a in ms.items()} for p, ms in d.items()}
        return {"method": self.method, "mode": self.mode, "n_requests": len(self.rows),
                "n_edits": self.n_edits, "params_changed": self.params_changed,
                "params_total": self.params_total, "share_changed": self.share_changed,
                "seconds_per_edit": self.seconds_per_edit,
                "model": self.model.to_dict() if hasattr(self.model, "to_dict") else self.model,
                "before": aggs(self.before), "after": aggs(self.after),
                "rows": [r.to_dict() for r in self.rows], "extras": self.extras}


def _row(ps: ProbeSet, k: int, before: RequestState, after: RequestState, cfg, dppl) -> RequestRow:
    r = ps.request
    gens = tuple({"prompt": p, "before": cb, "after": ca}
                 for (p, cb), (_, ca) in zip(before.generations, after.generations))
    return RequestRow(r.case_id, r.fact.subject, r.fact.relation, r.fact.object, r.new_object, k,
                      request_metrics(ps, before, before, config=cfg,
                                      dppl=None if dppl is None else 0.0),
                      request_metrics(ps, after, before, config=cfg, dppl=dppl), gens)


def _dppl(model, edit: Edit, reference, fwd_hooks) -> float | None:
    if reference is None:
        return None
    if isinstance(reference, PreparedReference):
        start = min(edit.layers) if edit.layers and all(
            d.layer is not None for d in edit.deltas) else 0  # blocks below are unchanged
        return relative_ppl_change(reference.ppl, perplexity(model, reference, fwd_hooks=fwd_hooks,
                                                             start_at_layer=start))
    before = perplexity(model, reference)
    return relative_ppl_change(before, perplexity(model, reference, fwd_hooks=fwd_hooks))


def edit_dppl(model: "HookedTransformer", edit: Edit, reference: PreparedReference, *,
              apply: str = "hooks") -> float:
    """dPPL of ``edit`` on prepared reference prose (the generation protocol's dPPL, for runs
    that judge without generating: sequential and batch curves)."""
    if reference is None:
        raise ConfigError("edit_dppl needs a PreparedReference (prepare_reference)")
    with edit_active(model, edit, apply) as fwd:
        return _dppl(model, edit, reference, fwd)


def _probesets(model, items, cfg: HarnessConfig) -> list[ProbeSet]:
    out = []
    for it in items:
        if isinstance(it, ProbeSet):
            out.append(it)
        elif isinstance(it, EditRequest):
            out.append(ProbeSet.from_request(model, it, n_prefix_probes=cfg.n_prefix_probes,
                                             seed=cfg.seed))
        else:
            raise ConfigError(f"expected EditRequest or ProbeSet, got {type(it).__name__}")
    if not out:
        raise ConfigError("no requests to evaluate")
    return out


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def judge(model: "HookedTransformer", edit: Edit, probesets: Sequence[ProbeSet],
          before: Sequence[RequestState], *, config: HarnessConfig, reference=None,
          edit_index: int = 0) -> list[RequestRow]:
    """Rows for ``probesets`` under ``edit`` (active only inside this call)."""
    with edit_active(model, edit, config.apply) as fwd:
        after = measure(model, probesets, config=config, fwd_hooks=fwd)
        dppl = _dppl(model, edit, reference, fwd) if "generation" in config.protocols else None
    return [_row(ps, edit_index, b, a, config, dppl)
            for ps, b, a in zip(probesets, before, after)]


def _report(method, mode, rows, edits: Sequence[Edit], seconds: Sequence[float], model, cfg,
            extras=None) -> EditReport:
    return EditReport(method, mode, tuple(rows), aggregate([r.before for r in rows], cfg),
                      aggregate([r.after for r in rows], cfg), len(edits),
                      _mean([e.n_params for e in edits]) if edits else 0.0, _n_params(model),
                      _mean(list(seconds)) if seconds else float("nan"), model_info(model), cfg,
                      extras or {})


def evaluate(model: "HookedTransformer", edit: Edit,
             requests: Sequence[EditRequest | ProbeSet], *, config: HarnessConfig = HarnessConfig(),
             reference: PreparedReference | None = None,
             before: Sequence[RequestState] | None = None) -> EditReport:
    """Judge one edit on every request (see the module doc). ``before`` reuses a pre-edit
    measurement (:func:`measure` without hooks) of the same probe sets."""
    pss = _probesets(model, requests, config)
    before = list(before) if before is not None else measure(model, pss, config=config)
    if len(before) != len(pss):
        raise ConfigError(f"{len(before)} pre-edit states for {len(pss)} requests")
    rows = judge(model, edit, pss, before, config=config, reference=reference)
    secs = [edit.config.get("seconds", float("nan"))] if isinstance(edit.config, dict) else []
    return _report(edit.method or "edit", "single" if len(pss) == 1 else f"batch({len(pss)})",
                   rows, [edit], secs, model, config)


def edit_and_evaluate(model: "HookedTransformer", requests: Sequence[EditRequest], *, method: str,
                      editor_config: Any = None, batch_size: int = 1,
                      config: HarnessConfig = HarnessConfig(),
                      reference: PreparedReference | None = None,
                      before: Sequence[RequestState] | None = None, seed: int = 0,
                      on_batch=None) -> EditReport:
    """Edit ``requests`` in batches of ``batch_size`` with editor ``method`` (one edit per
    batch; the model restored between batches) and judge each request under its batch's edit.
    ``on_batch(k, edit, rows)`` is called after each batch (progress, checkpoints)."""
    from kn_lens.edit.registry import edit as make_edit

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    pss = _probesets(model, requests, config)
    before = list(before) if before is not None else measure(model, pss, config=config)
    rows, edits, secs = [], [], []
    for k, s in enumerate(range(0, len(pss), batch_size)):
        chunk = pss[s:s + batch_size]
        t0 = time.perf_counter()
        e = make_edit(model, [ps.request for ps in chunk], method=method, config=editor_config,
                      seed=seed)
        secs.append(time.perf_counter() - t0)
        new_rows = judge(model, e, chunk, before[s:s + batch_size], config=config,
                         reference=reference, edit_index=k)
        rows += new_rows
        edits.append(e)
        if on_batch is not None:
            on_batch(k, e, new_rows)
    mode = "single" if batch_size == 1 else f"batch({batch_size})"
    return _report(method, mode, rows, edits, secs, model, config,
                   {"seconds_per_request": sum(secs) / len(pss)})


@dataclass(frozen=True)
class SequentialReport:
    """Sequential editing: after ``n`` edits (``checkpoints``), every earlier request re-judged
    under the composition of all ``n`` edits."""

    method: str
    checkpoints: tuple[int, ...]
    reports: tuple[EditReport, ...]  # one per checkpoint

    def curve(self, protocol: str, metric: str) -> list[tuple[int, float, float, float]]:
        """(n, mean, lo, hi) at each checkpoint."""
        return [(n, r.after[protocol][metric].mean, r.after[protocol][metric].lo,
                 r.after[protocol][metric].hi) for n, r in zip(self.checkpoints, self.reports)]

    def to_dict(self) -> dict:
        return {"method": self.method, "checkpoints": list(self.checkpoints),
                "reports": [r.to_dict() for r in self.reports]}


def sequential(model: "HookedTransformer", requests: Sequence[EditRequest], *, method: str,
               editor_config: Any = None, checkpoints: Sequence[int] | None = None,
               config: HarnessConfig = HarnessConfig(protocols=("counterfact", "tokens")),
               reference: PreparedReference | None = None, seed: int = 0) -> SequentialReport:
    """Apply ``len(requests)`` edits one after another (each computed on the model with all
    previous edits materialised, then composed) and re-judge requests 1..n at each checkpoint n.
    The model is restored exactly at the end."""
    from kn_lens.edit.registry import edit as make_edit

    pss = _probesets(model, requests, config)
    n_total = len(pss)
    cps = sorted({int(c) for c in (checkpoints or (1, 10, 25, 50, 100, n_total))
                  if 1 <= int(c) <= n_total})
    before = measure(model, pss, config=config)
    total = Edit((), model=model_info(model))
    reports, edits, secs = [], [], []
    for i, ps in enumerate(pss):
        t0 = time.perf_counter()
        with total.applied(model):
            e = make_edit(model, [ps.request], method=method, config=editor_config, seed=seed)
        secs.append(time.perf_counter() - t0)
        edits.append(e)
        total = compose([total, e])
        n = i + 1
        if n in cps:
            rows = judge(model, total, pss[:n], before[:n], config=config, reference=reference,
                         edit_index=i)
            reports.append(_report(method, f"sequential({n})", rows, edits, secs, model, config,
                                   {"n_edits_applied": n, "composite_params": total.n_params}))
    return SequentialReport(method, tuple(cps), tuple(reports))

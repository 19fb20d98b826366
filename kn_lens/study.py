"""``kn_lens.study`` / ``kn-lens study FILE``: test hypotheses on relations of your own.

Input: one relations file (:func:`kn_lens.datasets.load_relations_file`: every problem is listed,
with its location, before any model work). The run, resumable (every per-query locator result is
a sweep item (:mod:`kn_lens.sweep`) in the result store ``OUT/.cache``, keyed by everything that
determines it; a killed run resumes and computes only what is missing; ``sweep=SweepConfig(...)``
computes them on a local pool or on Ray):

1. **known facts** per relation and template (answer's first token top-1 on >= 60 % of the
   templates, the built-in criterion);
2. **knowledge neurons** of the known facts on every template, by each locator (default
   contribution and IG), selected with each locator's authors' preset
   (:func:`kn_lens.analysis.consistency.default_selection`);
3. **consistency** per relation (QL: CS1 / CS2, K_I / K_II by the static and the Otsu threshold,
   Welch's t);
4. the **causal check**: each fact's KNs (first template) scaled x0 and x2 against as many random
   neurons: a fact passes when its KNs lower P(answer) more on suppression *and* raise it more on
   enhancement than the random ones;
5. **sharing with the built-in relations** (TNF-DA's finding that similar relations share
   neurons): relation-level KN sets (neurons in >= half of a relation's facts, contribution) of
   the new relations and of a sample of every built-in relation, Jaccard overlap, the nearest
   built-in relations;
6. optionally (``edit=METHOD``) a sample of known facts edited to another object of their
   relation and judged by the harness.

Output folder: ``report.md`` (tables + figures, readable on its own), ``results.json``,
``figures/*.png``, ``views.html`` (offline circuitsvis views of the strongest facts). Written
atomically; a bad input file writes nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from kn_lens.errors import ConfigError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from kn_lens.sweep import ResultStore, SweepConfig

__all__ = ["StudyConfig", "StudyResult", "study"]


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    locators: tuple[str, ...] = ("contribution", "ig")
    max_facts: int = 20  # known facts per relation whose KNs are located (seeded sample,
    # kn_lens.datasets.sample_facts "balanced")
    known_only: bool = True  # False: every fact (random test models know nothing)
    builtin_facts: int = 3  # known facts per built-in relation for the sharing step (0: skip)
    min_frequency: float = 0.5  # relation-level set: neurons in >= this share of its facts
    edit: str | None = None  # an editor name: step 6
    n_edit: int = 5  # facts per relation edited in step 6
    n_views: int = 2  # facts whose circuitsvis views are written
    seed: int = 0

    def __post_init__(self) -> None:
        from kn_lens.locate import available_methods

        object.__setattr__(self, "locators", tuple(self.locators))
        if not self.locators:
            raise ConfigError("StudyConfig.locators is empty")
        bad = [m for m in self.locators if m not in available_methods()]
        if bad:
            raise ConfigError(f"unknown locator(s) {bad}: choose from {available_methods()}")
        if self.max_facts < 1 or self.builtin_facts < 0 or self.n_edit < 1 or self.n_views < 0:
            raise ConfigError("StudyConfig: max_facts >= 1, builtin_facts >= 0, n_edit >= 1, "
                              "n_views >= 0")
        if not 0 < self.min_frequency <= 1:
            raise ConfigError("StudyConfig.min_frequency must be in (0, 1]")
        if self.edit is not None:
            from kn_lens.edit import available_editors

            if self.edit not in available_editors():
                raise ConfigError(f"unknown editor {self.edit!r}: choose from "
                                  f"{available_editors()}")


@dataclass(frozen=True)
class StudyResult:
    out: Path
    results: dict
    report: str
    computed: int  # per-query results computed in this run (the rest came from the cache)
    cached: int
    seconds: float = 0.0
    files: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------- steps


class _Located:
    """The study's per-query KNs: locator scores through the result store (one sweep per call,
    :func:`kn_lens.locate.cache.locate_many`), selected with each locator's authors' preset;
    counts the queries computed in this run and those stored before."""

    def __init__(self, model, store: "ResultStore", sweep: "SweepConfig | None", progress: bool,
                 log: Callable[[str], None]):
        self.model, self.store, self.sweep = model, store, sweep
        self.progress, self.log = progress, log
        self.computed = self.cached = 0

    def kns(self, jobs: dict[str, list]) -> dict[str, list]:
        """``{method: queries}`` -> ``{method: [NeuronSet per query]}``, every missing score
        computed by one sweep."""
        from kn_lens.analysis.consistency import default_selection, select_kns
        from kn_lens.locate.cache import locate_many

        scores = locate_many(self.model, [(m, None, qs) for m, qs in jobs.items()],
                             store=self.store, sweep_config=self.sweep, progress=self.progress,
                             log=self.log)
        out = {}
        for m, ss in zip(jobs, scores):
            n_cached = sum(bool(s.extras.get("cached")) for s in ss)
            self.cached += n_cached
            self.computed += len(ss) - n_cached
            sel = default_selection(m, self.model.cfg.n_layers)
            out[m] = [select_kns(s, sel) for s in ss]
        return out


def _causal(model, q, kns, seed: int) -> dict | None:
    from kn_lens.analysis.mapping import scaled_probs
    from kn_lens.neurons import random_like

    if not len(kns):
        return None
    rnd = random_like(kns, model.cfg.n_layers, model.cfg.d_mlp,
                      generator=torch.Generator(device="cpu").manual_seed(seed), exclude=kns)
    variants = [(ns, f) for ns in (kns, rnd) for f in (0.0, 2.0)]  # x0 / x2, every position
    base, *probs = scaled_probs(model, q, variants)
    out = {"p": base, "n_kns": len(kns)}
    for key, p in zip(("kn_suppress", "kn_enhance", "random_suppress", "random_enhance"), probs):
        out[key] = (p - base) / max(base, 1e-12)  # relative change
    out["passes"] = bool(out["kn_suppress"] < out["random_suppress"]
                         and out["kn_enhance"] > out["random_enhance"])
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _r(x, nd: int = 3):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- the run


def study(model: "HookedTransformer", relations: "str | os.PathLike | Any", *, out: str | os.PathLike,
          config: StudyConfig = StudyConfig(), progress: bool = True,
          log: Callable[[str], None] = print, sweep: "SweepConfig | None" = None) -> StudyResult:
    """Run the study of ``relations`` (a relations file, see the module doc, or a ``Dataset``)
    on ``model`` into the folder ``out``; returns what was written and how much came from the
    result store ``out/.cache``. ``sweep``: how the locator items are computed (default
    in-process; ``SweepConfig(backend="pool", workers=4)``, Ray, ...). The model is left as it
    was (every intervention is a scoped hook)."""
    from kn_lens.datasets import load_relations_file
    from kn_lens.datasets.core import Dataset
    from kn_lens.models import model_info
    from kn_lens.sweep import ResultStore

    t0 = time.perf_counter()
    ds = relations if isinstance(relations, Dataset) else load_relations_file(relations)
    out = Path(out)
    say = log if progress else (lambda s: None)
    with ResultStore(out / ".cache") as store:  # per-query scores (kn_lens.locate.cache)
        located = _Located(model, store, sweep, progress, log)
        return _study(model, ds, out, model_info(model), located, config, say, t0)


def _study(model, ds, out: Path, info, located: _Located, config: StudyConfig, say,
           t0: float) -> StudyResult:
    from kn_lens.analysis.consistency import ConsistencyConfig, consistency_analysis
    from kn_lens.analysis.tnf_da import relation_level_sets, set_overlap
    from kn_lens.datasets import builtin_dataset, known_facts, sample_facts
    from kn_lens.errors import InvalidFactError, NumericalError
    from kn_lens.facts import make_query, queries_for_fact

    results: dict = {"model": dataclasses.asdict(info), "config": dataclasses.asdict(config),
                     "relations": {}}

    # 1. known facts
    kf = known_facts(model, ds.facts, ds)
    known = set(kf.known_facts())
    say(f"[1/6] known facts: {len(known)} of {len(ds.facts)}")
    results["known_table"] = kf.to_markdown()
    try:  # up to max_facts (known) facts of every relation, seeded
        picked = sample_facts(model, ds, None, seed=config.seed, strategy="balanced",
                              per_relation=config.max_facts, min_per_relation=1,
                              known_only=config.known_only, known=kf).facts
    except InvalidFactError:  # nothing known
        picked = ()
    chosen: dict[str, list] = {}
    for rid in ds.relations:
        chosen[rid] = sorted((f for f in picked if f.relation == rid), key=lambda f: f.subject)
        results["relations"][rid] = {
            "name": ds.relations[rid].name, "n_facts": len(ds.facts_of(rid)),
            "n_known": sum(f in known for f in ds.facts_of(rid)), "n_studied": len(chosen[rid])}

    # 2. KNs of every studied fact on every template, by each locator (one sweep)
    kn_sets: dict[str, dict] = {m: {} for m in config.locators}
    per_fact = {f: queries_for_fact(model, f, ds.relations[rid])
                for rid, facts in chosen.items() for f in facts}
    flat = [q for qs in per_fact.values() for q in qs]
    if flat:
        kns = located.kns({m: flat for m in config.locators})
        for m in config.locators:
            it = iter(kns[m])
            kn_sets[m] = {f: [next(it) for _ in qs] for f, qs in per_fact.items()}
    first_query = {f: qs[0] for f, qs in per_fact.items()}
    say(f"[2/6] knowledge neurons: {len(flat)} queries x {len(config.locators)} locators "
        f"({located.computed} computed, {located.cached} stored before)")

    # 3. consistency per relation and locator
    cons: dict = {}
    one_template = sorted(r for r in ds.relations if len(ds.relations[r].templates) < 2)
    for m in config.locators:
        sets = {f: s for f, s in kn_sets[m].items() if len(s) >= 2}  # CS needs >= 2 templates
        if not sets:
            cons[m] = {"error": "no studied fact has KN sets on two or more templates"}
            continue
        try:
            res = consistency_analysis(sets, config=ConsistencyConfig(), method=m, model=info)
        except NumericalError as e:  # every set empty
            cons[m] = {"error": str(e)}
            continue
        cons[m] = {"table": res.table(), "markdown": res.to_markdown(),
                   "k1_static": [f.subject for f in res.k1("static")],
                   "k2_static": [f.subject for f in res.k2("static")]}
    results["consistency"] = cons
    results["consistency_skipped_relations"] = one_template  # one template: no consistency
    say("[3/6] consistency done")

    # 4. causal check on each fact's first template
    causal: dict = {}
    for m in config.locators:
        rows = []
        for f, sets in kn_sets[m].items():
            c = _causal(model, first_query[f], sets[0], config.seed)
            if c is not None:
                rows.append({"relation": f.relation, "subject": f.subject, "object": f.object,
                             **{k: (_r(v, 4) if isinstance(v, float) else v) for k, v in c.items()}})
        by_rel = {}
        for rid in ds.relations:
            rr = [r for r in rows if r["relation"] == rid]
            by_rel[rid] = {"n": len(rr), "pass": sum(r["passes"] for r in rr),
                           **{k: _r(_mean([r[k] for r in rr]))
                              for k in ("kn_suppress", "random_suppress", "kn_enhance",
                                        "random_enhance")}}
        causal[m] = {"facts": rows, "by_relation": by_rel}
    results["causal"] = causal
    say("[4/6] causal check done")

    # 5. sharing with the built-in relations (contribution KNs, relation-level sets)
    sharing: dict = {}
    if config.builtin_facts:
        bds = builtin_dataset()
        sample = bds.filter(limit_per_relation=max(8, 3 * config.builtin_facts))
        if config.known_only:  # which built-in facts this model knows: shared by every study
            bkf = list(_builtin_known(model, sample, bds).known_facts())
        else:
            bkf = list(sample.facts)
        ref_facts = [f for rid in bds.relations
                     for f in [g for g in bkf if g.relation == rid][:config.builtin_facts]]
        ref_queries = [make_query(model, f, bds.relations[f.relation].templates[0])
                       for f in ref_facts]
        new_facts = [f for facts in chosen.values() for f in facts]
        # the new facts' first queries: already stored by step 2 when it used contribution
        kns = located.kns({"contribution": ref_queries + [first_query[f] for f in new_facts]})
        sets = kns["contribution"]
        ref_sets = dict(zip(ref_facts, sets[:len(ref_facts)]))
        new_sets = dict(zip(new_facts, sets[len(ref_facts):]))
        levels_new = relation_level_sets(new_sets, min_frequency=config.min_frequency) \
            if new_sets else {}
        levels_ref = relation_level_sets(ref_sets, min_frequency=config.min_frequency) \
            if ref_sets else {}
        for rid, s in levels_new.items():
            sims = []
            for bid, b in levels_ref.items():
                sims.append({"builtin": bid, "group": bds.relations[bid].group,
                             "jaccard": _r(set_overlap(s, b, "jaccard"), 4),
                             "shared": len(s & b), "size": len(b)})
            sims.sort(key=lambda d: -(d["jaccard"] or 0))
            sharing[rid] = {"size": len(s), "nearest": sims[:3], "all": sims}
        say(f"[5/6] sharing: {len(levels_ref)} built-in relations "
            f"({sum(1 for _ in ref_sets)} facts)")
    results["sharing"] = sharing

    # 6. optional edits
    if config.edit is not None:
        results["edit"] = _edits(model, ds, chosen, config, say)
    say("[6/6] writing the report")
    files = _write_outputs(model, ds, out, results, kn_sets, first_query, config)
    secs = time.perf_counter() - t0
    results["seconds"] = round(secs, 1)
    results["cache"] = {"computed": located.computed, "cached": located.cached}
    _write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    report = (out / "report.md").read_text()
    return StudyResult(out, results, report, located.computed, located.cached, secs,
                       tuple(files) + ("results.json",))


def _builtin_known(model, sample, bds):
    """Which facts of the built-in sample ``model`` knows: a ``known`` sweep item in the store
    ``<kn-lens cache>/study`` shared by every study of the model (computed once)."""
    from kn_lens.models import cache_dir
    from kn_lens.sweep import known_item, sweep_results

    item = known_item(model, sample.facts, bds)
    (kf,) = sweep_results([item], cache_dir() / "study", model=model, progress=False)
    return kf


def _edits(model, ds, chosen, config: StudyConfig, say) -> dict:
    from kn_lens.datasets import build_edit_requests
    from kn_lens.evaluate.harness import HarnessConfig, edit_and_evaluate

    out = {}
    for rid, facts in chosen.items():
        objects = sorted({f.object for f in ds.facts_of(rid)})
        facts = [f for f in facts if len(objects) > 1][:config.n_edit]
        if not facts:
            out[rid] = {"skipped": "needs facts with at least two different objects"}
            continue
        reqs = list(build_edit_requests(ds, facts, seed=config.seed, n_prefixes=3))
        rep = edit_and_evaluate(model, reqs, method=config.edit, seed=config.seed,
                                config=HarnessConfig(n_bootstrap=200, max_new_tokens=16))
        out[rid] = {"n": len(reqs), "table": rep.table(),
                    "after": {p: {m: _r(a.mean) for m, a in ms.items()}
                              for p, ms in rep.after.items()}}
        say(f"[6/6] edited {len(reqs)} facts of {rid} with {config.edit}")
    return out


def _write_outputs(model, ds, out: Path, results: dict, kn_sets, first_query,
                   config: StudyConfig) -> list[str]:
    from kn_lens import viz

    figs = out / "figures"
    files = []
    rels = list(ds.relations)
    data = {"known": {r: results["relations"][r]["n_known"] / max(1, results["relations"][r]["n_facts"])
                      for r in rels}}
    p = viz.plot_grouped_bars(data, figs / "known.png", title="share of facts known",
                              ylabel="share")
    files.append(str(p.relative_to(out)))
    causal_figs = {}
    for m, c in results["causal"].items():
        d = {rid: {k: (c["by_relation"][rid][k] or 0.0) for k in
                   ("kn_suppress", "random_suppress", "kn_enhance", "random_enhance")}
             for rid in rels if c["by_relation"][rid]["n"]}
        if d:
            p = viz.plot_grouped_bars(d, figs / f"causal_{m}.png", ylabel="relative change of P",
                                      title=f"KNs ({m}) vs random neurons: x0 and x2")
            causal_figs[m] = str(p.relative_to(out))
            files.append(causal_figs[m])
    views = _views(model, out, kn_sets, first_query, config)
    if views:
        files.append(views)
    lines = [f"# kn-lens study: {', '.join(rels)}", "",
             f"Model **{results['model']['name']}**; locators {', '.join(config.locators)}; "
             f"up to {config.max_facts} {'known ' if config.known_only else ''}facts per "
             f"relation; seed {config.seed}.", "",
             "## 1. Known facts (answer's first token top-1 on >= 60 % of the templates)", "",
             results["known_table"], "", "![known](figures/known.png)", "",
             "## 2-3. Knowledge neurons and their consistency across templates (QL)", ""]
    lines += ["Per locator: CS2 (the share of a fact's KNs found on more than one of its templates) "
              "splits the facts into K_I (CS2 above the threshold T: St = static 0.1, Ot = Otsu) "
              "and K_II; R = share of facts in the group, S = its mean CS2, t / p = Welch's test "
              "of CS2 between the groups (QL Table 1).", ""]
    for m, c in results["consistency"].items():
        lines += [f"**{m}**", "", c.get("markdown", c.get("error", "")), ""]
    lines += ["## 4. Causal check: each fact's KNs x0 / x2 vs as many random neurons", "",
              "| locator | relation | facts | pass | KN x0 | random x0 | KN x2 | random x2 |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m, c in results["causal"].items():
        for rid, r in c["by_relation"].items():
            lines.append(f"| {m} | {rid} | {r['n']} | {r['pass']} | {r['kn_suppress']} | "
                         f"{r['random_suppress']} | {r['kn_enhance']} | {r['random_enhance']} |")
    lines += [""] + [f"![causal {m}]({p})" for m, p in causal_figs.items()] + [""]
    if results["sharing"]:
        lines += ["## 5. Neurons shared with the built-in relations (contribution, relation-level "
                  f"sets: neurons in >= {config.min_frequency:.0%} of the facts)", "",
                  "| relation | set size | nearest built-in relations (Jaccard, shared) |",
                  "|---|---:|---|"]
        for rid, s in results["sharing"].items():
            near = "; ".join(f"{d['builtin']} ({d['group']}): {d['jaccard']}, {d['shared']}"
                             for d in s["nearest"])
            lines.append(f"| {rid} | {s['size']} | {near} |")
        lines.append("")
    if "edit" in results:
        lines += [f"## 6. Editing with {config.edit}", ""]
        for rid, e in results["edit"].items():
            lines += [f"**{rid}**", "", e.get("table", e.get("skipped", "")), ""]
    if views:
        lines += [f"Views: [{views}]({views}) (circuitsvis, renders offline).", ""]
    _write_text(out / "report.md", "\n".join(lines))
    return ["report.md"] + files


def _views(model, out: Path, kn_sets, first_query, config: StudyConfig) -> str | None:
    """Offline views (:func:`kn_lens.viz.fact_views`) of the ``n_views`` facts the model is
    surest of: their first template's synapses and their KNs (first locator) along the prompt."""
    from kn_lens import viz
    from kn_lens.facts import answer_probs

    if not config.n_views or not first_query:
        return None
    facts = list(first_query)
    probs = answer_probs(model, [first_query[f] for f in facts])
    order = sorted(range(len(facts)), key=lambda i: -float(probs[i]))[:config.n_views]
    m = config.locators[0]
    views = {}
    for i in order:
        f = facts[i]
        kns = sorted(kn_sets[m][f][0], key=lambda n: (n.layer, n.index))[:8]
        views.update(viz.fact_views(model, first_query[f], kns,
                                    label=f"{f.subject} -> {f.object} ({m})"))
    viz.save_html(views, out / "views.html", title="kn-lens study views")
    return "views.html"

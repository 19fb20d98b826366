"""Editing benchmark: every registered editor on the same CounterFact-style requests, judged on the
three protocols of ``kn_lens.evaluate.harness`` (never averaged across protocols), plus fluency,
dPPL, the share of weights changed and seconds per edit.

Requests: ``--n-requests`` known facts (default 200; answer top-1 on >= 60 % of templates,
balanced over relations, each with its best template as the rewrite prompt), a counterfactual new
object drawn from the relation's other objects (seeded), paraphrases = the relation's other
templates, 10 neighbourhood prompts, relation-specificity and alias prompts, 5 training prefixes
(``build_edit_requests``). Each editor edits one request at a time (batch size 1); MEMIT also edits
them in batches of ``--memit-batch`` (100). A request an editor refuses with a typed error (QL's
KN update when the old and new objects share their first token) is judged as no edit and counted.

Resumable: each (method, request) row is appended to
``results/cache/edit_benchmark_<model>_<key>/<method>.jsonl`` as it is computed; a rerun with the
same arguments continues where it stopped (rows in those files are never recomputed). Each edit
and its judgement is a sweep item (``kn_lens.edit.benchmark.BenchmarkEdit``) stored in the result
store ``results/sweeps`` (``--store``) before its rows are appended, so edits run in-process
(default) or spread over processes (``--backend pool --workers N``) or Ray, and processes sharing
the store (e.g. two ``--methods`` lists, or the same one twice) never compute the same edit. The
result file aggregates every method whose rows are complete (``--partial``: also the others,
marked n/N). ``--archive-rows`` gzips every raw row to
``results/edit_benchmark_<model>.rows.jsonl.gz``; a run on another machine seeds its row files
from that file and continues.

    python experiments/edit_benchmark.py --quick                  # CI: 2 requests, tiny budget
    python experiments/edit_benchmark.py --threads 1              # 200 requests on SmolLM2
    python experiments/edit_benchmark.py --methods fine --backend pool --workers 4 --threads 1
    python experiments/edit_benchmark.py --model gemma-3-270m --n-requests 100
    python experiments/edit_benchmark.py --plot-only --compare tnf_da_atp,tnf_da_da  # shared rows
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from kn_lens import experiment
from kn_lens.edit.benchmark import (METHODS, REUSE, BenchmarkRun, aggregates_to_dict,
                                    editor_configs, load_benchmark_model, resolve, row_id)
from kn_lens.experiment import rounded

NAME = BenchmarkRun.NAME
SHOW = {"counterfact": ("Score", "ES", "PS", "NS", "EM", "NM", "ES_argmax", "NS_argmax",
                        "prefix_success"),
        "tokens": ("rewrite_acc", "paraphrase_acc", "prefix_acc", "locality", "locality_relation",
                   "portability"),
        "generation": ("rewrite_success", "paraphrase_success", "old_mentioned", "fluency", "dppl")}


def compute(args) -> None:
    from kn_lens.datasets import builtin_dataset
    from kn_lens.edit import editor_version
    from kn_lens.edit.baselines.stats import second_moments
    from kn_lens.edit.benchmark import benchmark_item
    from kn_lens.edit.layers import memit_layers, rome_layer
    from kn_lens.evaluate.harness import HarnessConfig
    from kn_lens.evaluate.probes import probe_sets
    from kn_lens.models import model_info
    from kn_lens.sweep import ReferenceSpec

    started = time.time()
    configs = editor_configs(quick=args.quick)
    for m in args.methods.split(","):  # fail on a bad name before any model work
        if m.strip():
            resolve(m.strip().partition("@")[0], configs)
    experiment.set_threads(args)
    model = load_benchmark_model(args.model, args.seed, device=args.device, dtype=args.dtype)
    bench = BenchmarkRun.from_args(args)
    requests = bench.requests(model, builtin_dataset())
    hcfg = HarnessConfig(max_new_tokens=args.max_new_tokens, seed=args.seed,
                         n_bootstrap=200 if args.quick else 1000)
    cache = bench.cache_dir()
    print(f"{len(requests)} requests; rows in {cache}")
    bench.restore()
    pss = probe_sets(model, requests, n_prefix_probes=hcfg.n_prefix_probes, seed=args.seed)
    before = bench.measure_before(model, pss, hcfg)
    n_slices, slice_len = (2, 64) if args.quick else (8, 128)
    reference = ReferenceSpec(n_slices=n_slices, slice_len=slice_len, seed=args.seed)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    stats_seconds = {}
    for m in dict.fromkeys(x.partition("@")[0] for x in methods):  # one-time statistics,
        if m in ("rome", "memit"):  # outside the per-edit timing
            layers = [rome_layer(model)] if m == "rome" else list(memit_layers(model))
            t0 = time.perf_counter()
            second_moments(model, layers, n_tokens=configs[m].stats_tokens)
            stats_seconds[m] = time.perf_counter() - t0
    labels: dict[str, str] = {}  # item key -> method label
    runs = []  # (editor, batch size): "memit@100" in --methods asks for one batch size explicitly
    for m in methods:
        name, _, k = m.partition("@")
        runs.append((name, min(int(k), len(requests)) if k else 1))
    if "memit" in methods and args.memit_batch > 1 and not any(b > 1 for _, b in runs):
        runs.append(("memit", min(args.memit_batch, len(requests))))
    jobs = []  # (item, its label's row file): every edit still missing, for one sweep
    for name, batch in runs:
        method, config = resolve(name, configs)
        label = name if batch == 1 else f"{name}@{batch}"
        path = cache / f"{label}.jsonl"
        done = experiment.read_jsonl(path, row_id)
        upto = len(requests) if args.limit is None else min(args.limit, len(requests))
        todo = [i for i in range(upto) if i not in done]
        print(f"{label}: {len(done)} done, {len(todo)} to go" +
              (f" (--limit {args.limit})" if upto < len(requests) else ""))
        shared = _relation_ensembles(model, requests, name, config, cache) \
            if name in REUSE and todo else None
        for s in range(0, len(todo), batch):
            idx = todo[s:s + batch]
            neurons = None if shared is None else shared[requests[idx[0]].fact.relation]
            item = benchmark_item(model, [requests[i] for i in idx], [pss[i] for i in idx],
                                  [before[i] for i in idx], method=method, config=config,
                                  harness=hcfg, reference=reference, neurons=neurons,
                                  seed=args.seed)
            labels.setdefault(item.key, label)
            jobs.append((item, path))

    def describe(item, rows: list[dict]) -> str:
        r0, label = rows[0], labels[item.key]
        i, after = r0["row"]["case_id"], r0["row"]["after"]
        refused = f"  {label} {i}: refused ({r0['refused']})\n" if r0["refused"] else ""
        return (f"{refused}  {label} {i}/{len(requests)}: {r0['seconds']:.1f} s, ES "
                f"{after['counterfact']['ES']:.2f} NS {after['counterfact']['NS']:.2f} gen "
                f"{after['generation']['rewrite_success']:.2f}")
    # each edit + judgement is a sweep item (in-process, or --backend pool / ray), its rows
    # appended to the label's file as soon as it is stored
    experiment.sweep_rows(args, jobs, model, id_of=row_id, describe=describe)
    # aggregate every complete method file
    from kn_lens.evaluate.harness import aggregate

    n_total = sum(p.numel() for p in model.parameters())
    out = {}
    # the unedited model's per-request metrics, once (every method's rows carry the same
    # measurement, up to float noise of 1e-4 between rows computed in different processes)
    first: dict[int, dict] = {}
    for path in sorted(cache.glob("*.jsonl")):
        rows = experiment.read_jsonl(path, row_id)
        for it in rows.values():
            first.setdefault(it["row"]["case_id"], it["row"])
        complete = len(rows) >= len(requests)
        if not complete and not (args.partial and rows):
            print(f"{path.stem}: {len(rows)}/{len(requests)} rows, not aggregated yet (--partial "
                  "aggregates what is done)")
            continue
        items = [rows[i] for i in range(len(requests)) if i in rows]
        aft = aggregate([it["row"]["after"] for it in items], hcfg)
        bef = aggregate([it["row"]["before"] for it in items], hcfg)
        per_edit = {}
        for it in items:
            if not it.get("refused"):
                per_edit.setdefault(it["row"]["edit_index"], it)
        per_edit = per_edit or {0: {"seconds": float("nan"), "n_params": 0}}
        out[path.stem] = {
            "complete": complete, "n_requests_done": len(items),
            "after": aggregates_to_dict(aft), "before": aggregates_to_dict(bef),
            "n_edits": len(per_edit),
            "n_refused": sum(bool(it.get("refused")) for it in items),
            "refused": [{"case_id": it["row"]["case_id"], "why": it["refused"]}
                        for it in items if it.get("refused")][:20],
            "batch": items[0]["n_requests_in_edit"],
            # median: robust to a machine hiccup (or a paused run) in one edit; the mean as well
            "seconds_per_edit": statistics.median(it["seconds"] for it in per_edit.values()),
            "seconds_per_edit_mean": sum(it["seconds"] for it in per_edit.values()) / len(per_edit),
            "params_changed": sum(it["n_params"] for it in per_edit.values()) / len(per_edit),
            "share_changed": sum(it["n_params"] for it in per_edit.values()) / len(per_edit) / n_total,
            # per-request metrics in columns (the full rows are in the rows archive)
            "per_request": _columns([it["row"] for it in items], "after"),
            "samples": [{"subject": it["row"]["subject"], "old": it["row"]["old"],
                         "new": it["row"]["new"], "generations": it["row"]["generations"][:1]}
                        for it in items[:5]],
        }
    payload = {"requests": [{"case_id": r.case_id, "subject": r.fact.subject,
                             "relation": r.fact.relation, "old": r.fact.object,
                             "new": r.new_object, "prompt": r.prompts[0]} for r in requests],
               "methods": out,
               "before_per_request": _columns([first[i] for i in sorted(first)], "before"),
               "stats_seconds": stats_seconds,
               "editor_versions": {m: editor_version(m) for m in METHODS},
               "layers": {"rome": rome_layer(model), "memit": list(memit_layers(model))}}
    config = {"editors": configs, "harness": hcfg, "memit_batch": args.memit_batch,
              "n_requests": len(requests), "reference": {"n_slices": n_slices,
                                                         "slice_len": slice_len}}
    experiment.save_results(args, NAME, payload, config, model_info(model), started)
    if args.archive_rows:
        bench.archive()


def _relation_ensembles(model, requests, label: str, config, cache: Path) -> dict:
    """KNE Sec. 4.4 for :data:`REUSE` labels: per relation, the union of the ensembles of the
    first ``share`` of its requests (at least one). Cached in ``cache/<label>.ensembles.json``
    (a resumed run reuses the same sets); the localisation time is printed, not per edit."""
    import math

    from kn_lens.edit.kne import locate_ensemble
    from kn_lens.neurons import NeuronSet

    path = cache / f"{label}.ensembles.json"
    if path.exists():
        return {k: NeuronSet(tuple(n) for n in v) for k, v in json.loads(path.read_text()).items()}
    share = REUSE[label][1]
    by_rel: dict[str, list] = {}
    for r in requests:
        by_rel.setdefault(r.fact.relation, []).append(r)
    t0 = time.perf_counter()
    out = {rel: locate_ensemble(model, rs[:max(1, math.ceil(share * len(rs)))], config=config)
           for rel, rs in sorted(by_rel.items())}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v.to_list() for k, v in out.items()}))
    tmp.replace(path)
    print(f"{label}: ensembles of {len(out)} relations located on {share:.0%} of their requests "
          f"in {time.perf_counter() - t0:.0f} s")
    return out


def _columns(rows: list[dict], side: str) -> dict:
    """One side (``"after"`` / ``"before"``) of judged rows as columns, rounded to 4 digits:
    ``{"case_id": [...], protocol: {metric: [one value per request]}}`` (a fifth of the size of
    one dict per request, which every method's 200 rows would repeat)."""
    keys: dict = {}  # protocol -> metrics, in first-seen order
    for r in rows:
        for proto, ms in r[side].items():
            keys.setdefault(proto, dict.fromkeys(ms)).update(dict.fromkeys(ms))
    return {"case_id": [r["case_id"] for r in rows],
            **{p: {m: [rounded(r[side].get(p, {}).get(m)) for r in rows] for m in ms}
               for p, ms in keys.items()}}


def _select(cols: dict, ids: set) -> list[dict]:
    """Per-request metric dicts (``{protocol: {metric: value}}``, None as NaN) of the requests
    in ``ids``, from :func:`_columns`' layout."""
    nan = float("nan")
    keep = [j for j, i in enumerate(cols["case_id"]) if i in ids]
    return [{p: {m: nan if v[j] is None else v[j] for m, v in ms.items()}
             for p, ms in cols.items() if p != "case_id"} for j in keep]


def _fmt(a: dict, scale: float = 1.0) -> str:
    if a is None or a.get("mean") is None:
        return "n/a"
    if a.get("lo") is None:
        return f"{a['mean'] * scale:.3g}"
    return f"{a['mean'] * scale:.3g} ({a['lo'] * scale:.3g}-{a['hi'] * scale:.3g})"


def report(args) -> None:
    from kn_lens.viz import plot_grouped_bars, plot_tradeoff

    doc = experiment.load_results(args, NAME)
    r = doc["results"]
    methods = r["methods"]
    if not methods:
        print("no complete method yet")
        return
    names = sorted(methods, key=lambda k: not methods[k].get("complete", True))
    n = len(r["requests"])
    label = {k: k if methods[k].get("complete", True)
             else f"{k} ({methods[k]['n_requests_done']}/{n})" for k in names}
    print(f"**{args.model}** ({doc['mode']}): {n} requests; ROME layer {r['layers']['rome']}, "
          f"MEMIT layers {r['layers']['memit']}\n")
    first = methods[names[0]]
    for proto, metrics in SHOW.items():
        print(f"\n{proto} protocol (mean, 95% bootstrap CI over requests):\n")
        print("| metric | unedited | " + " | ".join(label[k] for k in names) + " |")
        print("|---|---:|" + "---:|" * len(names))
        for m in metrics:
            b = first["before"].get(proto, {}).get(m)
            cells = [_fmt(methods[k]["after"].get(proto, {}).get(m)) for k in names]
            print(f"| {m} | {_fmt(b)} | " + " | ".join(cells) + " |")
    print("\n| method | edits | refused | s/edit (median) | weights changed | share | dPPL median | dPPL > 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in names:
        v = methods[k]
        d = [x for x in v["per_request"]["generation"].get("dppl", []) if x is not None]
        med = statistics.median(d) if d else float("nan")
        print(f"| {label[k]} | {v['n_edits']} | {v.get('n_refused', 0)} | {v['seconds_per_edit']:.2f} | "
              f"{v['params_changed']:.3g} | {v['share_changed']:.2e} | {med:.3g} | "
              f"{sum(x > 1 for x in d)}/{len(d)} |")
    _papers_tables(methods, r["before_per_request"], first, label)
    for group in args.compare or ():
        _compare(methods, r["before_per_request"], group)
    figs = []
    for proto, metrics in (("counterfact", ("Score", "ES", "PS", "NS")),
                           ("tokens", ("rewrite_acc", "paraphrase_acc", "locality", "portability")),
                           ("generation", ("rewrite_success", "paraphrase_success", "old_mentioned"))):
        data = {label[k]: {m: methods[k]["after"][proto][m]["mean"] for m in metrics} for k in names}
        data = {"unedited": {m: first["before"][proto][m]["mean"] for m in metrics}, **data}
        figs.append(plot_grouped_bars(
            {m: {k: data[k][m] for k in data} for m in metrics},
            experiment.figure_path(args, f"{NAME}_{proto}"), ylabel="mean over requests",
            title=f"{proto} protocol: {n} requests ({args.model})"))
    study = _module_study(methods, r["before_per_request"])
    if study is not None:
        n_ids, data = study
        figs.append(plot_grouped_bars(
            data, experiment.figure_path(args, f"{NAME}_kne_modules"), ylabel="x 100",
            size=(9.0, 4.0), decimals=0,
            title=f"KNE Sec. 4.3, the edited module: {n_ids} requests ({args.model})"))
    pts = {}
    for k in names:
        es = methods[k]["after"]["counterfact"]["ES"]
        ns = methods[k]["after"]["counterfact"]["NS"]
        pts[label[k]] = (ns["mean"], es["mean"], ns["lo"], ns["hi"], es["lo"], es["hi"])
    b = first["before"]["counterfact"]
    pts["unedited"] = (b["NS"]["mean"], b["ES"]["mean"])
    figs.append(plot_tradeoff(pts, experiment.figure_path(args, f"{NAME}_tradeoff"),
                              xlabel="NS (neighbourhood keeps P(true) > P(new))",
                              ylabel="ES (P(new) > P(old) on the rewrite prompt)",
                              title=f"edit success vs specificity ({args.model})"))
    print("\nfigures " + " ".join(str(f) for f in figs))


# Each paper's editing table in its own columns, filled with our rows (x 100 as the papers print;
# fluency as is): (title, [(column, protocol, metric)], [(row label, method)]).
PAPER_TABLES = (
    ("FiNE Table 1 / 2 / 12 (EasyEdit token accuracy: Edit Succ. = rewrite, SAA = aliases, "
     "RSA = the subject's other relations)",
     [("Edit Succ.", "tokens", "rewrite_acc"), ("SAA", "tokens", "portability"),
      ("RSA", "tokens", "locality_relation"), ("neighbourhood locality", "tokens", "locality"),
      ("Fluency", "generation", "fluency")],
     [("FT-L", "ft_l"), ("KN (QL update)", "kn_update"), ("ROME", "rome"), ("MEMIT", "memit"),
      ("FiNE", "fine"), ("FiNE w/o Loc.", "fine_random"), ("FiNE w/o LF", "fine_no_lf"),
      ("FiNE w/o L_KL", "fine_no_kl"), ("FiNE w/o L_pen", "fine_no_pen")]),
    ("KNE Table 1 and Sec. 4.3 module study (EasyEdit: Edit Succ., Portability = aliases, "
     "Locality = the subject's other relations / neighbours)",
     [("Edit Succ.", "tokens", "rewrite_acc"), ("Portability", "tokens", "portability"),
      ("Locality (relations)", "tokens", "locality_relation"),
      ("Locality (neighbours)", "tokens", "locality"), ("Fluency", "generation", "fluency")],
     [("FT-L", "ft_l"), ("ROME", "rome"), ("MEMIT", "memit"), ("KNE (W_out)", "kne"),
      ("KNE (W_out), Adam lr 1e-3", "kne_lr_1e-3"), ("KNE W_in (up_proj)", "kne_w_in"),
      ("KNE W_gate (gate_proj)", "kne_w_gate"),
      ("KNE W_Q (q_proj)", "kne_w_q"), ("KNE W_K (k_proj)", "kne_w_k"),
      ("KNE W_V (v_proj)", "kne_w_v"), ("KNE W_O (o_proj)", "kne_w_o"),
      ("KNE, ensembles reused (Sec. 4.4)", "kne_reuse")]),
    ("TNF-DA Table 2 / 3 / 4 (CounterFact: Efficacy = ES, Generalization = PS, Specificity = NS, "
     "probability comparisons)",
     [("Score", "counterfact", "Score"), ("Efficacy", "counterfact", "ES"),
      ("Generalization", "counterfact", "PS"), ("Specificity", "counterfact", "NS"),
      ("Fluency", "generation", "fluency")],
     [("FT-L", "ft_l"), ("ROME", "rome"), ("MEMIT", "memit"), ("TNF-DA (mediation)", "tnf_da"),
      ("TNF-DA (AtP-ranked)", "tnf_da_atp"), ("TNWP (AtP)", "tnf_da_tnwp"),
      ("Ours-RN (AtP)", "tnf_da_rn"), ("Ours-DA (AtP)", "tnf_da_da")]),
)


def _papers_tables(methods: dict, before_cols: dict, first: dict, label: dict) -> None:
    for title, cols, rows in PAPER_TABLES:
        print(f"\n{title}:\n")
        _paper_table(cols, rows, {k: v["after"] for k, v in methods.items()}, first["before"],
                     label)
        present = [key for _, key in rows if key in methods]
        if all(methods[k].get("complete", True) for k in present):
            continue
        # a method with rows on part of the requests (e.g. an ablation run with --limit) is
        # compared with the others on the requests they all have, not on different sets
        ids = _shared_ids(methods, present)
        if not ids:
            continue
        sub = {k: _subset_aggs(methods[k]["per_request"], ids) for k in present}
        print(f"\nThe same table on the {len(ids)} requests every method above has rows for:\n")
        _paper_table(cols, rows, sub, _subset_aggs(before_cols, ids), {k: k for k in present})


# ``--compare``'s columns: each protocol's headline metrics (x 100; fluency as is)
COMPARE_COLUMNS = [("Score", "counterfact", "Score"), ("ES", "counterfact", "ES"),
                   ("PS", "counterfact", "PS"), ("NS", "counterfact", "NS"),
                   ("rewrite acc.", "tokens", "rewrite_acc"),
                   ("neighbourhood locality", "tokens", "locality"),
                   ("relation locality", "tokens", "locality_relation"),
                   ("portability", "tokens", "portability"), ("fluency", "generation", "fluency")]


def _compare(methods: dict, before_cols: dict, group: list[str]) -> None:
    """``--compare a,b,c``: the methods in ``group`` side by side on the requests they all have
    rows for (e.g. an ablation run on part of the requests against the full method on the
    same ones), whichever else has rows for them."""
    missing = [k for k in group if k not in methods]
    if missing:
        from kn_lens.errors import ConfigError

        raise ConfigError(f"--compare {','.join(group)}: no rows for {', '.join(missing)} in "
                          f"the results (methods with rows: {', '.join(sorted(methods))})")
    ids = _shared_ids(methods, group)
    print(f"\n{', '.join(group)} on the {len(ids)} requests they all have rows for "
          f"(--compare):\n")
    if not ids:
        print("no request in common")
        return
    sub = {k: _subset_aggs(methods[k]["per_request"], ids) for k in group}
    _paper_table(COMPARE_COLUMNS, [(k, k) for k in group], sub,
                 _subset_aggs(before_cols, ids), {k: k for k in group})


# KNE's module study (Sec. 4.3, Fig. 2): the matrix the ensemble's delta is trained on
KNE_MODULES = (("W_out", "kne"), ("W_in", "kne_w_in"), ("W_gate", "kne_w_gate"),
               ("W_Q", "kne_w_q"), ("W_K", "kne_w_k"), ("W_V", "kne_w_v"), ("W_O", "kne_w_o"))


def _module_study(methods: dict, before_cols: dict) -> tuple[int, dict] | None:
    """KNE's Fig. 2 as bars: ``{metric: {module: mean x 100}}`` on the requests every module run
    has (a partial run is compared on the same requests only); fluency as a percentage of the
    unedited model's. None with fewer than two modules run."""
    present = [(name, k) for name, k in KNE_MODULES if k in methods]
    if len(present) < 2:
        return None
    ids = _shared_ids(methods, [k for _, k in present])
    if not ids:
        return None
    aggs = {name: _subset_aggs(methods[k]["per_request"], ids) for name, k in present}

    def mean(a: dict, proto: str, metric: str) -> float:
        v = a.get(proto, {}).get(metric, {}).get("mean")
        return float("nan") if v is None else v

    fluency0 = mean(_subset_aggs(before_cols, ids), "generation", "fluency")
    data = {col: {name: 100 * mean(aggs[name], "tokens", m) for name, _ in present}
            for col, m in (("Edit Succ.", "rewrite_acc"), ("Portability", "portability"),
                           ("Locality\n(relations)", "locality_relation"),
                           ("Locality\n(neighbours)", "locality"))}
    data["Fluency\n(% of unedited)"] = {
        name: 100 * mean(aggs[name], "generation", "fluency") / fluency0 for name, _ in present}
    return len(ids), data


def _shared_ids(methods: dict, keys: list[str]) -> set:
    """The case ids every method in ``keys`` has rows for (same-request comparisons)."""
    return set.intersection(*(set(methods[k]["per_request"]["case_id"]) for k in keys))


def _subset_aggs(cols: dict, ids: set) -> dict:
    """Aggregates (mean + bootstrap CI) of the requests in ``ids`` of :func:`_columns`' layout."""
    from kn_lens.evaluate.harness import aggregate

    return aggregates_to_dict(aggregate(_select(cols, ids)))


def _paper_table(cols, rows, aggs: dict, before: dict, label: dict) -> None:
    print("| method | " + " | ".join(c for c, _, _ in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    cells = [_paper_cell(before, p, m) for _, p, m in cols]
    print("| unedited | " + " | ".join(cells) + " |")
    for name, key in rows:
        if key not in aggs:
            print(f"| {name} | " + " | ".join("not run" for _ in cols) + " |")
            continue
        cells = [_paper_cell(aggs[key], p, m) for _, p, m in cols]
        print(f"| {name}{label[key][len(key):]} | " + " | ".join(cells) + " |")


def _paper_cell(aggs: dict, proto: str, metric: str) -> str:
    a = aggs.get(proto, {}).get(metric)
    if a is None or a.get("mean") is None:
        return "n/a"
    scale = 1.0 if metric == "fluency" else 100.0
    if a.get("lo") is None:
        return f"{a['mean'] * scale:.1f}"
    return f"{a['mean'] * scale:.1f} ({a['lo'] * scale:.1f}-{a['hi'] * scale:.1f})"


def main() -> None:
    ap = experiment.parser(__doc__.splitlines()[0])
    experiment.add_fact_args(ap)
    ap.add_argument("--n-requests", type=int, default=None, help="default 200 (quick: 2)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of editors or ablation variants (VARIANTS: fine_random, tnf_da_tnwp, ...); "
                    "NAME@K: batches of K requests (e.g. memit@100)")
    ap.add_argument("--memit-batch", type=int, default=100, help="MEMIT batch size (1 = off)")
    ap.add_argument("--partial", action="store_true",
                    help="also aggregate methods whose rows are not complete (marked n/N)")
    ap.add_argument("--archive-only", action="store_true",
                    help="only gzip the rows computed so far (e.g. of a stopped run) and exit")
    ap.add_argument("--limit", type=int, default=None,
                    help="compute rows for the first N requests only (the same requests, a "
                    "subset: e.g. ablations; later runs without it fill in the rest)")
    ap.add_argument("--archive-rows", action="store_true",
                    help="gzip every raw row next to the results (a later run resumes from it)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="greedy continuation length (default 32; quick 8)")
    ap.add_argument("--compare", action="append", default=None, metavar="A,B,...",
                    type=lambda v: [m for m in v.split(",") if m],
                    help="also print these methods side by side on the requests they all have "
                    "rows for (repeatable; e.g. with --plot-only --partial: an ablation run on "
                    "part of the requests against the full method on the same ones)")
    experiment.add_sweep_args(ap)
    args = ap.parse_args()
    if args.n_requests is None:
        args.n_requests = args.n_facts or (2 if args.quick else 200)
    if args.max_new_tokens is None:
        args.max_new_tokens = 8 if args.quick else 32
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    if any(not group for group in args.compare or ()):
        ap.error("--compare wants a comma list of methods, e.g. tnf_da_atp,tnf_da_da")
    if args.archive_only:  # no model work: the rows already in the cache
        BenchmarkRun.from_args(args).archive()
        return
    experiment.run(args, compute, report)


if __name__ == "__main__":
    main()

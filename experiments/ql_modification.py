"""QL Tables 2 and 3: erase / update known facts through their KNs — N_i (the edited query's own
KNs) vs N_g (union over the fact's queries) vs CAS (consistency-aware score, QL eq. 7), K_I vs K_II.

Per fact (scores cached by ``locate_facts.py`` for ``--method``, IG by default), each selection is
erased / updated with ``kn_lens.edit`` (QL eq. 2) and judged with ``kn_lens.evaluate``:
Rel on the edited query, Gen on the fact's other templates, Loc on ``--n-locality`` known facts
outside the sample (first template; other subjects, mostly other relations), dPPL = relative
perplexity change on ``--ppl-slices`` reference slices (fixed seed). The driver is
``kn_lens.analysis.compare_kn_selections``, each fact's edits one sweep item
(``kn_modification``: a killed run resumes, ``--backend pool --workers N`` / ``--shard i/n``
split the facts); update targets come from ``kn_lens.datasets.new_objects`` (seeded: another
object of the relation whose first token differs). Table 2 = N_i/N_g rows split by K_I/K_II
(static threshold on CS2); Table 3 = N_i/N_g/CAS over all facts.

    python experiments/ql_modification.py --quick          # edits q_1 of each fact
    python experiments/ql_modification.py                   # edits every q_i (QL)
"""
from __future__ import annotations

import time

from kn_lens import experiment

NAME = "ql_modification"
METRICS = ("Rel", "Gen", "Loc", "Avg", "dPPL")


def compute(args) -> None:
    from kn_lens.analysis import (CASConfig, CompareConfig, compare_kn_selections,
                                  consistency_by_method, default_selection)
    from kn_lens.datasets import new_objects as draw_new_objects
    from kn_lens.facts import make_query
    from kn_lens.models import model_info
    from kn_lens.sweep import ReferenceSpec, kn_modification_items
    from kn_lens.sweep.kinds import prepared_reference

    started = time.time()
    args.methods = [args.method]
    located = experiment.prepare_located(args)
    model, ds, facts = located.model, located.dataset, located.facts
    cons = consistency_by_method(located.scores, model)[args.method]
    labels = cons.labels[args.threshold]
    # locality: known facts outside the sample (the same seeded shuffle, the next n_locality)
    more = experiment.ql_facts(args, model, ds, len(facts) + args.n_locality)
    loc_facts = [f for f in more if f not in set(facts)][:args.n_locality]
    locality = [make_query(model, f, ds.relation_of(f).templates[0]) for f in loc_facts]
    n_slices = args.ppl_slices if args.ppl_slices is not None else 4
    slice_len = args.ppl_slice_len or (64 if args.quick else 128)
    ref_spec = ReferenceSpec(n_slices=n_slices, slice_len=slice_len, seed=args.seed) \
        if n_slices else None
    # update targets (QL eq. 2): another object of the relation with a different first token
    new_objects = draw_new_objects(facts, seed=args.seed, model=model, dataset=ds)
    edit_queries = args.edit_queries or ("first" if args.quick else "all")
    cfg = CompareConfig(edit_queries=edit_queries, seed=args.seed)
    selection = default_selection(args.method, model.cfg.n_layers)
    t0 = time.perf_counter()
    # one sweep item per fact (resumable, shardable: --backend pool --workers 2, --shard i/n)
    scores = located.scores[args.method]
    items = kn_modification_items(model, scores, config=cfg, selection=selection,
                                  cas_config=CASConfig(), new_objects=new_objects,
                                  locality=locality, reference=ref_spec)
    done = dict(zip(scores, experiment.sweep_items(args, items, model=model)))
    reference = prepared_reference(model, ref_spec) if ref_spec else None  # (nothing left to edit)
    comp = compare_kn_selections(model, scores, selection=selection, config=cfg, groups=labels,
                                 locality=locality, reference=reference, new_objects=new_objects,
                                 done=done)
    edit_seconds = time.perf_counter() - t0  # this run's (a resumed run: only what it computed)
    payload = {"facts": [experiment.fact_dict(f) for f in facts], "method": args.method,
               "threshold": args.threshold, "seconds_per_query": located.seconds_per_query,
               "edit_seconds_per_fact": edit_seconds / len(facts),
               "n_k1": sum(g == "K_I" for g in labels.values()),
               "n_k2": sum(g == "K_II" for g in labels.values()),
               "new_objects": {f.key(): o for f, o in new_objects.items()},
               "locality_facts": [experiment.fact_dict(f) for f in loc_facts],
               "comparison": comp.to_dict(),
               "table2": [r for r in comp.table() if r["group"] != "all" and r["selection"] != "CAS"],
               "table3": [r for r in comp.table() if r["group"] == "all"],
               # the same edits grouped by every threshold's K_I / K_II labels (QL Tables 2-3
               # split by group; CAS rows included)
               "by_threshold": {k: {"n_k1": sum(g == "K_I" for g in lab.values()),
                                    "n_k2": sum(g == "K_II" for g in lab.values()),
                                    "labels": {f.key(): g for f, g in lab.items()},
                                    "rows": comp.regroup(lab).table()}
                                for k, lab in cons.labels.items()}}
    config = {"locator": experiment.locator_config(args, args.method), "selection": selection,
              "compare": cfg, "reference": {"n_slices": n_slices, "slice_len": slice_len,
                                            "seed": args.seed},
              "n_locality": args.n_locality, "n_facts": experiment.ql_n_facts(args),
              "all_facts": args.no_known_filter, "max_answer_tokens": args.max_answer_tokens}
    experiment.save_results(args, NAME, payload, config, model_info(model), started)


def with_median_dppl(rows: list[dict], per_edit: list[dict]) -> list[dict]:
    """Add the median dPPL of each row's edits: the mean is dominated by a few edits that break
    the model (dPPL up to 1e19 for KN updates on SmolLM2-135M in the quick run)."""
    import statistics

    out = []
    for row in rows:
        xs = [e["dppl"] for e in per_edit if not e.get("skipped") and e.get("dppl") is not None
              and e["operation"] == row["operation"] and e["selection"] == row["selection"]
              and (row["group"] == "all" or e["group"] == row["group"])]
        out.append({**row, "dPPL": None if row["dPPL"] is None else float(f"{row['dPPL']:.3g}"),
                    "dPPL median": round(statistics.median(xs), 3) if xs else None})
    return out


def report(args) -> None:
    from kn_lens.analysis.consistency import markdown_table
    from kn_lens.viz import plot_grouped_bars, plot_table

    doc = experiment.load_results(args, NAME)
    r = doc["results"]
    print(f"**{args.model}** ({doc['mode']}), locator {r['method']}, {len(r['facts'])} facts "
          f"(K_I {r['n_k1']}, K_II {r['n_k2']}, {r['threshold']} threshold), "
          f"{doc['config']['compare']['edit_queries']} query/queries edited per fact\n")
    print("QL Table 2 (N_i vs N_g, K_I vs K_II):\n")
    per_edit = r["comparison"]["per_edit"]
    print(markdown_table(with_median_dppl(r["table2"], per_edit)) or "(no K_I/K_II groups)")
    print("\nQL Table 3 (all facts: N_i vs N_g vs CAS):\n")
    print(markdown_table(with_median_dppl(r["table3"], per_edit)))
    for k, b in r.get("by_threshold", {}).items():
        regrouped = [{**e, "group": b["labels"].get(e["fact"])} for e in per_edit]
        print(f"\nQL Table 3 split by K_I / K_II, {k} threshold (K_I {b['n_k1']}, K_II {b['n_k2']}):\n")
        print(markdown_table(with_median_dppl([x for x in b["rows"] if x["group"] != "all"],
                                              regrouped)))
    # Avg per KN selection, all facts and K_I / K_II (the chosen threshold; CAS included)
    split = r.get("by_threshold", {}).get(r["threshold"])
    source = split["rows"] if split else r["table2"] + r["table3"]
    data: dict = {}
    for row in source:
        key = f"{row['operation']}\n{row['selection']}"
        label = {"all": "all facts"}.get(row["group"], row["group"])
        if split:
            label += f" (n={ {'all': len(r['facts']), 'K_I': split['n_k1'], 'K_II': split['n_k2']}[row['group']] })"
        data.setdefault(key, {})[label] = row["Avg"]
    p1 = plot_grouped_bars(data, experiment.figure_path(args, NAME + "_groups"), ylabel="Avg of Rel, Gen, Loc",
                           title=f"QL Tables 2-3: KN erasure / update, K_I vs K_II\n"
                                 f"({r['threshold']} threshold, {r['method']} KNs, {args.model})")
    rows = [[row["operation"], row["selection"], row["n"],
             *[float("nan") if row[m] is None else row[m] for m in (*METRICS, "dPPL median")]]
            for row in with_median_dppl(r["table3"], per_edit)]
    p2 = plot_table(rows, ["operation", "KNs", "n", *METRICS, "dPPL median"], experiment.figure_path(args, NAME + "_table3"),
                    title=f"N_i vs N_g vs CAS ({r['method']}, {args.model})")
    print(f"\nfigures {p1} {p2}")


def main() -> None:
    ap = experiment.parser(__doc__.splitlines()[0])
    experiment.add_locate_args(ap)
    ap.add_argument("--method", default="ig", help="locator whose KNs are edited")
    ap.add_argument("--threshold", choices=("static", "otsu"), default="static")
    ap.add_argument("--n-locality", type=int, default=8, help="out-of-scope facts for Loc")
    ap.add_argument("--edit-queries", choices=("first", "all"), default=None,
                    help="edit q_1 only or every q_i in turn (default: first quick, all full; "
                         "'all' costs 6x: about 36 edits per fact)")
    ap.add_argument("--ppl-slices", type=int, default=None,
                    help="reference slices for dPPL (default 4, of 64 tokens quick / 128 full: 512 tokens, scored once on the unedited model; 0 = off)")
    ap.add_argument("--ppl-slice-len", type=int, default=None,
                    help="tokens per reference slice (default 64 quick, 128 full)")
    args = ap.parse_args()
    experiment.run(args, compute, report)


if __name__ == "__main__":
    main()

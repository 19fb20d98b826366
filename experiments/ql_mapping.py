"""QL Fig. 4: query-KN mapping — suppress (x0) / enhance (x2) a query's own KNs N_i vs the
neighbour sets (union / intersection / refine of the other queries' KNs, QL eq. 3), ΔProb, K_I vs K_II.

KN sets and K_I/K_II labels (static threshold 0.1 on CS2, QL §2.1) come from the cached scores of
``locate_facts.py`` for ``--method`` (default ig, QL's locator); the mapping itself is
``kn_lens.analysis.query_kn_mapping``. Sup = −ΔP/P under suppression, Enh = +ΔP/P under
enhancement (both positive when the neurons matter), Avg their mean.

    python experiments/ql_mapping.py --quick
    python experiments/ql_mapping.py --method contribution --threshold otsu
"""
from __future__ import annotations

import time

from kn_lens import experiment

NAME = "ql_mapping"


def compute(args) -> None:
    from kn_lens.analysis import (MappingConfig, consistency_by_method, default_selection,
                                  queries_and_sets_from_scores, query_kn_mapping)
    from kn_lens.models import model_info

    started = time.time()
    args.methods = [args.method]
    located = experiment.prepare_located(args)
    model, scores = located.model, located.scores
    cons = consistency_by_method(scores, model)[args.method]
    labels = cons.labels[args.threshold]
    selection = default_selection(args.method, model.cfg.n_layers)
    qs, sets = queries_and_sets_from_scores(scores[args.method], selection)
    cfg = MappingConfig()
    res = query_kn_mapping(model, qs, sets, config=cfg, groups=labels)
    payload = {"facts": [experiment.fact_dict(f) for f in located.facts], "method": args.method,
               "threshold": args.threshold, "seconds_per_query": located.seconds_per_query,
               "n_k1": sum(g == "K_I" for g in labels.values()),
               "n_k2": sum(g == "K_II" for g in labels.values()),
               "mapping": res.to_dict(), "table": res.table()}
    config = {"locator": experiment.locator_config(args, args.method), "selection": selection,
              "mapping": cfg, "consistency": cons.config, "n_facts": experiment.ql_n_facts(args),
              "all_facts": args.no_known_filter}
    experiment.save_results(args, NAME, payload, config, model_info(model), started)


def report(args) -> None:
    from kn_lens.analysis.consistency import markdown_table
    from kn_lens.viz import plot_grouped_bars

    doc = experiment.load_results(args, NAME)
    r = doc["results"]
    print(f"**{args.model}** ({doc['mode']}), locator {r['method']}, {len(r['facts'])} facts "
          f"(K_I {r['n_k1']}, K_II {r['n_k2']}, {r['threshold']} threshold): ΔProb = relative change "
          "of P(answer)\n")
    print(markdown_table(r["table"]))
    data: dict = {}
    for s in r["mapping"]["summary"]:
        if s["group"] == "all" and (r["n_k1"] or r["n_k2"]):
            continue
        label = {"self": "N_i", "union": "union", "intersection": "inter.", "refine": "refine"}[s["kind"]]
        data.setdefault(label, {})[f"{s['group']} Sup"] = s["sup"]
        data[label][f"{s['group']} Enh"] = s["enh"]
    p = plot_grouped_bars(data, experiment.figure_path(args, NAME), ylabel="ΔProb (relative)",
                          title=f"Query-KN mapping, {r['method']} KNs ({args.model})\n"
                                "suppress x0 / enhance x2, relative change of P(answer)")
    print(f"\nfigure {p}")


def main() -> None:
    ap = experiment.parser(__doc__.splitlines()[0])
    experiment.add_locate_args(ap)
    ap.add_argument("--method", default="ig", help="locator whose KN sets are scaled")
    ap.add_argument("--threshold", choices=("static", "otsu"), default="static",
                    help="which K_I/K_II split groups the queries")
    args = ap.parse_args()
    experiment.run(args, compute, report)


if __name__ == "__main__":
    main()

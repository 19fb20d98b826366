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

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402
import locate_facts  # noqa: E402

NAME = "ql_mapping"


def compute(args) -> None:
    from kn_lens.analysis import MappingConfig, queries_and_sets_from_scores, query_kn_mapping
    from kn_lens.models import model_info
    from ql_consistency import consistency_by_method

    started = time.time()
    args.methods = [args.method]
    model, ds, facts, scores, timing = locate_facts.prepare(args)
    cons = consistency_by_method(scores, model)[args.method]
    labels = cons.labels[args.threshold]
    qs, sets = queries_and_sets_from_scores(scores[args.method],
                                            locate_facts.kn_selection(args.method, model.cfg.n_layers))
    cfg = MappingConfig()
    res = query_kn_mapping(model, qs, sets, config=cfg, groups=labels)
    payload = {"facts": [locate_facts.fact_dict(f) for f in facts], "method": args.method,
               "threshold": args.threshold, "seconds_per_query": timing,
               "n_k1": sum(g == "K_I" for g in labels.values()),
               "n_k2": sum(g == "K_II" for g in labels.values()),
               "mapping": res.to_dict(), "table": res.table()}
    config = {"locator": locate_facts.method_config(args.method, args),
              "selection": locate_facts.kn_selection(args.method, model.cfg.n_layers),
              "mapping": cfg, "consistency": cons.config, "n_facts": locate_facts.n_facts(args),
              "all_facts": args.all_facts}
    _common.save_results(args, NAME, payload, config, model_info(model), started)


def report(args) -> None:
    from kn_lens.analysis.consistency import markdown_table
    from kn_lens.viz import plot_grouped_bars

    doc = _common.load_results(args, NAME)
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
    p = plot_grouped_bars(data, _common.figure_path(args, NAME), ylabel="ΔProb (relative)",
                          title=f"Query-KN mapping, {r['method']} KNs ({args.model})\n"
                                "suppress x0 / enhance x2, relative change of P(answer)")
    print(f"\nfigure {p}")


def main() -> None:
    ap = _common.parser(__doc__.splitlines()[0])
    locate_facts.add_arguments(ap)
    ap.add_argument("--method", default="ig", help="locator whose KN sets are scaled")
    ap.add_argument("--threshold", choices=("static", "otsu"), default="static",
                    help="which K_I/K_II split groups the queries")
    args = ap.parse_args()
    _common.run(args, compute, report)


if __name__ == "__main__":
    main()

"""QL Table 1 / Fig. 3: KN consistency (CS2) of known facts, K_I vs K_II, per locator.

For each locator in ``--methods`` and each sampled known fact (``locate_facts.py``; scores come
from its cache), the KN sets of the fact's neighbour queries (one per template; each locator's
authors' selection, ``kn_lens.analysis.default_selection``) give CS1/CS2 (QL eq. 1). Facts are split into
K_I (CS2 above the threshold) and K_II with the static threshold 0.1 and Otsu's threshold (QL App.
Table 4); Welch's t-test compares their CS2. Rows: overall and per relation. "∩: II" is the share
of facts that every locator puts in K_II. Figures: CS2 violins per relation (QL Fig. 3) and the CS2
histogram with both thresholds.

    python experiments/ql_consistency.py --quick
    python experiments/ql_consistency.py --methods ig contribution atp
"""
from __future__ import annotations

import time

from kn_lens import experiment

NAME = "ql_consistency"


def compute(args) -> None:
    from kn_lens.analysis import consistency_by_method, default_selection, shared_k2_ratio
    from kn_lens.models import model_info

    started = time.time()
    located = experiment.prepare_located(args)
    model = located.model
    res = consistency_by_method(located.scores, model)
    shared = {k: shared_k2_ratio(res.values(), k) for k in ("static", "otsu")}
    payload = {
        "facts": [experiment.fact_dict(f) for f in located.facts],
        "seconds_per_query": located.seconds_per_query,
        "methods": {m: r.to_dict() for m, r in res.items()},
        "tables": {m: r.table() for m, r in res.items()},
        "shared_k2": shared,  # QL Table 1 "∩: II"
    }
    cfg = {"methods": {m: experiment.locator_config(args, m) for m in args.methods},
           "selection": {m: default_selection(m, model.cfg.n_layers) for m in args.methods},
           "consistency": next(iter(res.values())).config, "n_facts": experiment.ql_n_facts(args),
           "all_facts": args.no_known_filter, "max_answer_tokens": args.max_answer_tokens}
    experiment.save_results(args, NAME, payload, cfg, model_info(model), started)


def summary_rows(doc: dict) -> list[dict]:
    """QL Table 1 layout: one row per (locator, threshold), overall scope."""
    rows = []
    for m, r in doc["results"]["methods"].items():
        for row in r["rows"]:
            if row["scope"] != "overall":
                continue
            rows.append({"method": m, "T": "St" if row["threshold_kind"] == "static" else "Ot",
                         "threshold": _r(row["threshold"], 3), "n": row["n_facts"],
                         "R: I": _r(row["ratio_k1"]), "S: I": _r(row["mean_cs_k1"]),
                         "R: II": _r(row["ratio_k2"]), "S: II": _r(row["mean_cs_k2"]),
                         "t": _r(row["t"], 2), "p": "" if row["p"] is None else f"{row['p']:.1e}",
                         "∩: II": _r(doc["results"]["shared_k2"][row["threshold_kind"]]),
                         "undefined": r["n_undefined"]})
    return rows


def _r(x, nd: int = 3):
    return None if x is None or x != x else round(x, nd)


def report(args) -> None:
    from kn_lens.analysis.consistency import markdown_table
    from kn_lens.viz import plot_cs_histogram
    from kn_lens.viz.experiments import plot_violins

    doc = experiment.load_results(args, NAME)
    res = doc["results"]
    print(f"**{args.model}** ({doc['mode']}): {len(res['facts'])} facts\n")
    print("QL Table 1 (overall):\n")
    print(markdown_table(summary_rows(doc)))
    for m, table in res["tables"].items():
        print(f"\nPer relation, {m}:\n")
        print(markdown_table(table))
    cs = {m: [f["cs2"] for f in r["facts"] if f["cs2"] is not None] for m, r in res["methods"].items()}
    violins: dict = {}
    for m, r in res["methods"].items():
        for f in r["facts"]:
            if f["cs2"] is not None:
                violins.setdefault(f["fact"]["relation"], {}).setdefault(m, []).append(f["cs2"])
    static = doc["config"]["consistency"]["static_threshold"]
    p1 = plot_violins(dict(sorted(violins.items())), experiment.figure_path(args, NAME + "_violin"),
                      hlines={"static": static}, ylabel="CS2",
                      title=f"KN consistency per relation ({args.model}, {len(res['facts'])} facts)")
    thr = {"static": static}
    for m, r in res["methods"].items():
        otsu = next(row["threshold"] for row in r["rows"]
                    if row["scope"] == "overall" and row["threshold_kind"] == "otsu")
        thr[f"Otsu ({m})"] = otsu
    p2 = plot_cs_histogram(cs, experiment.figure_path(args, NAME + "_hist"), thresholds=thr,
                           xlabel="CS2", title=f"CS2 of known facts ({args.model})")
    print(f"\nfigures {p1} {p2}")


def main() -> None:
    ap = experiment.parser(__doc__.splitlines()[0])
    experiment.add_locate_args(ap)
    args = ap.parse_args()
    experiment.run(args, compute, report)


if __name__ == "__main__":
    main()

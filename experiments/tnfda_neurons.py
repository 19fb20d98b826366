"""TNF-DA neuron analyses: the "1 %" concentration of indirect effects (Fig. 3), targeted-neuron
repetition per relation (Table 1) and neurons shared by semantically similar relations.

Per known fact (one query: its best template), every FFN neuron's indirect effect (IE) on
P(answer) is estimated with attribution patching (AtP, one forward + backward per noise sample)
for all facts; exact causal mediation restricted to the top gamma = 20 % of neurons by DNI (TNF-DA
eq. 6-7) runs on the first ``--n-exact`` facts (spread over relations) and is compared with AtP
(Spearman over the searched neurons, top-1 % overlap). The whole prompt is corrupted by default
(TNF-DA: "the whole prompt is obscured"); ``--corrupt subject`` gives ROME's variant.

The AtP and exact scores are per-query ``locate`` items of one sweep (:mod:`kn_lens.sweep`) in
the result store ``results/sweeps`` (``--store``; ``--backend pool --workers N`` spreads them over
processes; a rerun computes nothing); the reported seconds are each item's own compute time.

Outputs: ``results/tnfda_neurons_<model>.json`` and figures ``tnfda_fig3_*``, ``tnfda_table1_*``,
``tnfda_overlap_*``; markdown tables on stdout (also with ``--plot-only``).

    python experiments/tnfda_neurons.py --quick
    python experiments/tnfda_neurons.py               # full: 200 facts, 10 exact
"""
from __future__ import annotations

import math
import time

from kn_lens import experiment

NAME = "tnfda_neurons"
# fractions of neurons at which each fact's cumulative |IE| share is stored (log grid, for Fig. 3)
GRID = tuple(sorted({round(10 ** (e / 8), 6) for e in range(-32, 1)}))  # 1e-4 .. 1


def _defaults(args) -> None:
    if args.n_facts is None:
        args.n_facts = 12 if args.quick else 200
    if args.n_exact is None:
        args.n_exact = 2 if args.quick else 10
    if args.n_noise is None:
        args.n_noise = 1 if args.quick else 3


def compute(args) -> None:
    import torch

    from kn_lens.analysis import (ie_concentration, mean_ie_concentration, relation_overlap,
                                  targeted_neuron_repetition, targeted_neurons)
    from kn_lens.datasets import builtin_dataset
    from kn_lens.errors import NumericalError
    from kn_lens.facts import make_query
    from kn_lens.locate.mediation import AtPConfig, MediationConfig, mediation_agreement
    from kn_lens.models import model_info
    from kn_lens.sweep import locate_items

    experiment.set_threads(args)
    started = time.time()
    ds = builtin_dataset()
    model = experiment.model_from_args(args)
    chosen = experiment.sample(args, model, ds, args.n_facts, strategy="balanced",
                               n_relations=4 if args.quick else None).pairs()
    queries = [make_query(model, f, ds.relation(f.relation).templates[t], template_index=t)
               for f, t in chosen]
    atp_cfg = AtPConfig(n_noise=args.n_noise, corrupt=args.corrupt, seed=args.seed)
    # exact causal mediation (gamma = 20 %) on a subset, compared with AtP under the same noise
    med_cfg = MediationConfig(n_noise=args.n_noise, corrupt=args.corrupt, gamma=args.gamma,
                              seed=args.seed)
    n_exact = min(args.n_exact, len(queries))
    # every query's AtP scores and the subset's exact ones: one sweep into the run's store
    items = (locate_items(model, queries, "atp", atp_cfg)
             + locate_items(model, queries[:n_exact], "mediation", med_cfg))
    located = experiment.sweep_items(args, items, model)
    seconds = experiment.item_seconds(args, items)  # each item's own compute time
    atp, exact_scores = located[:len(queries)], located[len(queries):]

    facts, targeted, kept, skipped = [], {}, [], []
    for (f, t), q, s in zip(chosen, queries, atp):
        try:
            c = ie_concentration(s, by="abs", fractions=GRID, keep_curve=False)
            cp = ie_concentration(s, by="positive", keep_curve=False)
        except NumericalError as e:  # all-zero IE (e.g. P(answer) underflows): no shares
            skipped.append({"prompt": q.prompt, "answer": q.answer, "reason": str(e)})
            continue
        kept.append(s)
        tn = targeted_neurons(s)
        targeted[f] = tn
        facts.append({
            "subject": f.subject, "relation": f.relation, "object": f.object, "template": t,
            "group": ds.relation(f.relation).group, "prompt": q.prompt, "answer": q.answer,
            "p_clean": s.extras["p_clean"],
            "p_corrupted": float(sum(s.extras["p_corrupted"]) / len(s.extras["p_corrupted"])),
            "share_at_1pct": c.share_at_1pct, "positive_share_at_1pct": cp.share_at_1pct,
            "frac_negative": c.frac_negative, "total_abs_ie": c.total, "grid_shares": c.shares,
            "targeted": [[n.layer, n.index] for n in sorted(tn, key=lambda n: (n.layer, n.index))],
        })
    conc_abs = mean_ie_concentration(kept, by="abs")
    conc_pos = mean_ie_concentration(kept, by="positive")
    try:
        rep = targeted_neuron_repetition(targeted)
        rep_d = {**rep.to_dict(), "table": rep.table()}
    except Exception as e:  # e.g. every relation has < 2 facts
        rep_d = {"error": f"{type(e).__name__}: {e}"}
    overlap = relation_overlap(targeted, list(ds.relations.values()), min_frequency=args.min_frequency)
    ov_d = {**overlap.to_dict(), "table": overlap.table()}

    exact = []
    for q, a, e, secs in zip(queries[:n_exact], atp[:n_exact], exact_scores,
                             seconds[len(queries):]):
        ag = mediation_agreement(e, a)
        ce = ie_concentration(e, by="abs", keep_curve=False)
        exact.append({"prompt": q.prompt, "answer": q.answer, "seconds": secs,
                      "spearman": ag.spearman, "pearson": ag.pearson, "top1pct_overlap": ag.top_overlap,
                      "k": ag.k, "n_searched": ag.n_searched,
                      "exact_share_at_1pct": ce.share_at_1pct,
                      "exact_frac_negative_searched": float(
                          (e.scores[e.extras["searched"]] < 0).float().mean())})

    def mean(key, rows):
        vals = [r[key] for r in rows if r[key] is not None and math.isfinite(r[key])]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    payload = {
        "n_facts": len(facts), "facts": facts, "skipped": skipped, "grid": GRID,
        "concentration_abs": conc_abs, "concentration_positive": conc_pos,
        "repetition": rep_d, "overlap": ov_d,
        "atp_seconds_per_fact": sum(seconds[:len(queries)]) / len(queries),
        "exact": {"n": len(exact), "per_fact": exact,
                  "mean_spearman": mean("spearman", exact),
                  "mean_top1pct_overlap": mean("top1pct_overlap", exact),
                  "mean_exact_share_at_1pct": mean("exact_share_at_1pct", exact),
                  "mean_seconds_per_fact": mean("seconds", exact)},
        "known_filter": not args.no_known_filter,
    }
    config = {"atp": atp_cfg, "mediation": med_cfg, "targeted_fraction": 0.01,
              "min_frequency": args.min_frequency, "n_facts_requested": args.n_facts,
              "n_exact": args.n_exact, "relations": "4 largest" if args.quick else "all with >= 2"}
    experiment.save_results(args, NAME, payload, config, model_info(model), started)


def report(args) -> None:
    import numpy as np

    from kn_lens.analysis.consistency import markdown_table
    from kn_lens.viz import plot_grouped_bars, plot_table

    doc = experiment.load_results(args, NAME)
    r = doc["results"]
    ca, cp = r["concentration_abs"], r["concentration_positive"]
    print(f"## TNF-DA neurons: {args.model} ({doc['mode']}, {r['n_facts']} facts, "
          f"AtP n_noise={doc['config']['atp']['n_noise']}, corrupt={doc['config']['atp']['corrupt']})\n")
    print(f"Top 1 % of neurons by |IE| hold on average {ca['mean_share_at_1pct']:.1%} of total |IE| "
          f"(positive IE mass: {cp['mean_share_at_1pct']:.1%}); "
          f"{ca['mean_frac_negative']:.1%} of neurons have negative IE.\n")
    print(markdown_table([{"top fraction": f"{f:.1%}", "mean |IE| share": round(m, 3),
                           "std": round(s, 3)}
                          for f, m, s in zip(ca["fractions"], ca["mean_shares"], ca["std_shares"])]))
    ex = r["exact"]
    if ex["n"]:
        print(f"\nExact mediation (gamma={doc['config']['mediation']['gamma']} %) on {ex['n']} facts: "
              f"AtP-vs-exact Spearman {ex['mean_spearman']:.3f}, top-1 % overlap "
              f"{ex['mean_top1pct_overlap']:.2f}, exact top-1 % |IE| share "
              f"{ex['mean_exact_share_at_1pct']:.1%}, {ex['mean_seconds_per_fact']:.0f} s/fact "
              f"(AtP: {r['atp_seconds_per_fact']:.1f} s/fact)\n")
        print(markdown_table([{"prompt": e["prompt"], "answer": e["answer"],
                               "spearman": round(e["spearman"], 3),
                               "top-1% overlap": round(e["top1pct_overlap"], 2),
                               "searched": e["n_searched"], "s": round(e["seconds"], 1)}
                              for e in ex["per_fact"]]))
    # Fig. 3: mean and spread over facts of the cumulative |IE| share
    grid = np.array(r["grid"])
    sh = np.array([f["grid_shares"] for f in r["facts"]])
    _plot_fig3(grid, sh, experiment.figure_path(args, "tnfda_fig3"),
               title=f"TNF-DA Fig. 3 ({args.model}, {len(sh)} facts, AtP)")
    rep = r["repetition"]
    if "table" in rep:
        print("\n### Table 1: targeted-neuron repetition (percent; top 1 % by IE per fact)\n")
        print(markdown_table(rep["table"]))
        cols = ["relation", "n", "Top1", "Top2", "Base", "Repetition"]
        plot_table([[row[c] for c in cols] for row in rep["table"]], cols,
                   experiment.figure_path(args, "tnfda_table1"), title=f"TNF-DA Table 1 ({args.model})")
    else:
        print(f"\nTable 1 not computed: {rep['error']}")
    ov = r["overlap"]
    m = ov["metric"]
    print(f"\n### Neurons shared between relations (relation-level sets: targeted in >= "
          f"{ov['min_frequency']:.0%} of the relation's facts)\n")
    print(markdown_table(ov["table"]))
    print(f"\none-sided Mann-Whitney p (same > different) = {ov['mann_whitney_p']}; set sizes: "
          f"{ov['set_sizes']}")
    print("\n" + markdown_table([{"a": p["a"], "b": p["b"], "kind": p["kind"], m: p[m],
                                  "shared": p["shared"]}
                                 for p in ov["pairs"] if p["kind"] == "same"] or [{"a": "-"}]))
    plot_grouped_bars({"same group": {m: _nz(ov["same_group_mean"])},
                       "different groups": {m: _nz(ov["different_group_mean"])}},
                      experiment.figure_path(args, "tnfda_overlap"), ylabel=f"mean {m}",
                      title=f"relation-level neuron overlap ({args.model}; "
                            f"{ov['n_same_pairs']} vs {ov['n_different_pairs']} pairs)")


def _nz(x):
    return float("nan") if x is None else x


def _plot_fig3(grid, shares, path, *, title: str) -> None:
    """Mean cumulative share over facts, 10-90 % band and +-1 std, 1 % mark (the library's
    plot_cumulative_share draws single score maps; this shows the spread over facts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mean, std = shares.mean(0), shares.std(0)
    lo, hi = np.percentile(shares, 10, axis=0), np.percentile(shares, 90, axis=0)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.fill_between(grid, lo, hi, alpha=0.2, label="10-90 % of facts")
    ax.plot(grid, mean, lw=2, label="mean over facts")
    ax.plot(grid, np.clip(mean - std, 0, 1), "k:", lw=0.8, label="mean ± 1 std")
    ax.plot(grid, np.clip(mean + std, 0, 1), "k:", lw=0.8)
    i = int(np.argmin(np.abs(grid - 0.01)))
    ax.axvline(0.01, color="grey", ls="--", lw=1)
    ax.plot([grid[i]], [mean[i]], "o", color="C3", label=f"top 1 %: {mean[i]:.1%} of |IE|")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of neurons (sorted by |IE|)")
    ax.set_ylabel("cumulative share of total |IE|")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> None:
    ap = experiment.add_fact_args(experiment.parser(__doc__.splitlines()[0]))
    ap.add_argument("--n-exact", type=int, default=None,
                    help="facts with exact causal mediation (default 2 quick / 10 full)")
    ap.add_argument("--n-noise", type=int, default=None, help="noise samples (default 1 quick / 3 full)")
    ap.add_argument("--gamma", type=float, default=20.0, help="TNF-DA eq. 7: top gamma %% by DNI")
    ap.add_argument("--corrupt", default="all", choices=["all", "subject"])
    ap.add_argument("--min-frequency", type=float, default=0.5,
                    help="relation-level set: targeted in at least this share of its facts")
    experiment.add_sweep_args(ap)
    args = ap.parse_args(argv)
    _defaults(args)
    experiment.run(args, compute, report)


if __name__ == "__main__":
    main()

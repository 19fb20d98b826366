"""Query Localization §3.2 (Dynamic KN Selection): the predominance score P (Fig. 5), suppressing /
enhancing knowledge synapses of the query itself vs of an irrelevant query (Fig. 6), and neuron
activation heatmaps with synapses untouched / suppressed / enhanced (Fig. 7 / 10).

Facts: the QL sample of ``locate_facts.py`` (same seed: the facts of ``ql_consistency`` /
``ql_modification``), whose per-query scores come from its cache. Per fact, every template of its
relation is a neighbour query (QL's k queries). KNs are located on every query (``--locator contribution``: FiNE top-5 per answer token, last 3 layers
frozen; ``--locator ig``: integrated gradients, > 0.2 x max, Dai et al.), the facts are split into
K_I / K_II by CS2 (QL eq. 1, static threshold 0.1, QL App. Table 4) from those KN sets, and P
(QL eq. 4: most attended key token, counted over the k queries) is computed per fact. The
suppress (x0) / enhance (x2) test runs on each fact's best template with that query's KNs; the
irrelevant synapses come from a query of another relation (seeded). ΔValue / ΔProb are signed as
in the paper (+ = change in the expected direction).

    python experiments/ql_synapses.py --quick            # contribution KNs
    python experiments/ql_synapses.py                    # full: 200 facts, IG KNs
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from kn_lens import experiment

NAME = "ql_synapses"
CONDITIONS = ("self_enhance", "self_suppress", "self_avg",
              "irrelevant_enhance", "irrelevant_suppress", "irrelevant_avg")


def _selection(args):
    from kn_lens.analysis import KNSelection

    if args.locator == "contribution":  # FiNE App. C / §4.3
        return KNSelection(rule="top_k_per_token", k=5, freeze_last=args.freeze_last)
    return KNSelection(rule="threshold_relative", ratio=0.2)  # Dai et al. (QL App. A.4)


def compute(args) -> None:
    import torch

    from kn_lens.analysis import ConsistencyConfig, consistency_analysis, select_kns
    from kn_lens.analysis.synapses import (SynapseConfig, SynapseManipulationConfig,
                                           SynapseManipulationResult,
                                           activation_maps, knowledge_synapses,
                                           predominance_score, synapse_manipulation)
    from kn_lens.datasets import builtin_dataset
    from kn_lens.facts import answer_logprobs
    from kn_lens.locate.cache import scores_for_facts
    from kn_lens.models import model_info

    experiment.set_threads(args)
    started = time.time()
    n = args.n_facts or (8 if args.quick else 200)
    ds = builtin_dataset()
    model = experiment.model_from_args(args)
    # the QL fact sample of locate_facts.py (same seed: the same facts as ql_consistency /
    # ql_modification) and its per-query scores in the store, so IG is not recomputed here
    fact_list = experiment.ql_facts(args, model, ds, n)
    t0 = time.time()
    by_fact = scores_for_facts(model, ds, fact_list, args.locator,
                               store=experiment.store_dir(args),
                               sweep_config=experiment.sweep_config(args), progress=True)
    locate_seconds = time.time() - t0
    per_fact = [[s.query for s in by_fact[f]] for f in fact_list]
    # each fact's main query: the template on which the model gives the answer the highest P
    chosen = []
    for f, qs in zip(fact_list, per_fact):
        lp = answer_logprobs(model, qs)
        chosen.append((f, int(lp.argmax())))
    flat = [q for qs in per_fact for q in qs]
    sel = _selection(args)
    kn_by_fact = {f: [select_kns(s, sel) for s in by_fact[f]] for f in fact_list}
    cons = consistency_analysis(kn_by_fact, config=ConsistencyConfig(), method=args.locator,
                                model=model_info(model))
    labels = cons.labels.get("static", {})

    facts, mains, main_kns = [], [], []
    for (f, t), qs in zip(chosen, per_fact):
        pred = predominance_score(model, qs)
        pred0 = predominance_score(model, qs, ignore_first=True)
        fc = next(x for x in cons.facts if x.fact == f)
        facts.append({"subject": f.subject, "relation": f.relation, "object": f.object,
                      "template": t, "k": len(qs), "label": labels.get(f),
                      "cs2": None if math.isnan(fc.cs2) else fc.cs2,
                      "P": pred.score, "most_attended": list(pred.most_attended_text),
                      "P_ignore_first": pred0.score,
                      "most_attended_ignore_first": list(pred0.most_attended_text),
                      "kn_sizes": [len(s) for s in kn_by_fact[f]]})
        mains.append(qs[t])
        main_kns.append(kn_by_fact[f][t])
    # "paper": eq. 5-6 as printed; "ignore_first": key 0 (the attention sink, BOS or the first
    # word) removed from S and S_ir -- on SmolLM2 almost every eq. 6 synapse sits there.
    variants = {"paper": SynapseConfig(), "ignore_first": SynapseConfig(ignore_first=True)}
    summaries, effects, manip_seconds = {}, {}, {}
    for vname, scfg in variants.items():
        vcfg = SynapseManipulationConfig(synapses=scfg)
        t0 = time.time()
        res = synapse_manipulation(model, mains, main_kns, config=vcfg, seed=args.seed)
        manip_seconds[vname] = (time.time() - t0) / len(mains)
        summaries[vname] = {"all": res.summary()}
        for g in ("K_I", "K_II"):
            eff = tuple(e for e, fd in zip(res.effects, facts) if fd["label"] == g)
            if eff:
                summaries[vname][g] = SynapseManipulationResult(
                    eff, res.config, res.model, res.seed).summary()
        effects[vname] = [e.to_dict() for e in res.effects]
    mcfg = SynapseManipulationConfig()
    # Fig. 7 / 10: one query's activation maps
    # (default: the first fact whose main query has at least one synapse)
    example = args.example
    if example is None:
        example = 0
        for i, q in enumerate(mains):
            if len(knowledge_synapses(model, q, config=mcfg.synapses)):
                example = i
                break
    q0, kn0 = mains[example], main_kns[example]
    syn0 = knowledge_synapses(model, q0, config=mcfg.synapses)
    maps = activation_maps(model, q0, synapses=syn0, config=mcfg)
    payload = {
        "n_facts": len(facts), "locator": args.locator, "facts": facts,
        "consistency_rows": cons.to_dict()["rows"],
        "summary": summaries, "effects": effects,
        "heatmap": {"prompt": q0.prompt, "answer": q0.answer, "n_synapses": len(syn0),
                    "synapses_per_position": syn0.per_position(), "tokens": list(syn0.tokens),
                    "kns": [[x.layer, x.index] for x in kn0],
                    "maps_file": _maps_path(args).name, "maps_dtype": "float16"},
        "seconds": {"locate_or_cache_per_query": locate_seconds / len(flat),
                    "manipulation_per_query": manip_seconds},
        "known_filter": not args.no_known_filter,
    }
    config = {"locator": args.locator, "selection": sel, "manipulation": mcfg,
              "synapse_variants": variants,
              "consistency": ConsistencyConfig(), "n_facts_requested": n,
              "p_axis": "key", "example": example,
              "max_answer_tokens": args.max_answer_tokens}
    _save_maps(args, {k: m.numpy() for k, m in maps.maps.items()})
    experiment.save_results(args, NAME, payload, config, model_info(model), started)


def _maps_path(args) -> Path:
    """The Fig. 7/10 activation maps (3 x layer x d_mlp) live next to the JSON, as float16 npz
    (a JSON of them would be ~2 MB)."""
    return experiment.result_path(args, NAME).with_suffix(".maps.npz")


def _save_maps(args, maps: dict) -> None:
    import os
    import tempfile

    import numpy as np

    path = _maps_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **{k: v.astype(np.float16) for k, v in maps.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report(args) -> None:
    import numpy as np

    from kn_lens.analysis.consistency import markdown_table
    from kn_lens.viz import plot_activation_heatmaps, plot_cs_histogram, plot_synapse_effects

    doc = experiment.load_results(args, NAME)
    r = doc["results"]
    facts = r["facts"]
    print(f"## QL synapses: {args.model} ({doc['mode']}, {r['n_facts']} facts, KNs from "
          f"{r['locator']}, static CS2 threshold 0.1)\n")
    groups = {g: [f for f in facts if f["label"] == g] for g in ("K_I", "K_II")}
    groups = {g: v for g, v in groups.items() if v}
    split = len(groups) == 2
    if not split:
        print("K_I/K_II split degenerate here (one group empty or CS undefined): P over all facts.\n")
    rows = []
    for g, fs in ({"all": facts} | groups).items():
        p = np.array([f["P"] for f in fs])
        p0 = np.array([f["P_ignore_first"] for f in fs])
        rows.append({"facts": g, "n": len(fs), "mean P": round(float(p.mean()), 3),
                     "P = 1": f"{float((p == 1).mean()):.0%}",
                     "mean P (key 0 ignored)": round(float(p0.mean()), 3)})
    print(markdown_table(rows))
    from collections import Counter
    top = Counter(t for f in facts for t in f["most_attended"]).most_common(5)
    top0 = Counter(t for f in facts for t in f["most_attended_ignore_first"]).most_common(5)
    print(f"\nmost attended tokens t_i: {top}; with key 0 ignored: {top0}\n")
    hist = ({g: [f["P"] for f in fs] for g, fs in groups.items()} if split
            else {"all facts": [f["P"] for f in facts]})
    plot_cs_histogram(hist, experiment.figure_path(args, "ql_fig5"), bins=12,
                      xlabel="predominance score P (QL eq. 4)",
                      title=f"QL Fig. 5: P ({args.model}, {r['n_facts']} facts)")
    print("### Fig. 6: signed relative change (mean over queries; NaNs skipped)\n")
    trows = []
    for v, by_group in r["summary"].items():
        for g, s in by_group.items():
            for metric in ("delta_value", "delta_prob"):
                row = {"synapses": v, "facts": g, "metric": metric}
                for c in CONDITIONS:
                    x = s[metric].get(c)
                    row[c] = None if x is None or not math.isfinite(x) else round(x, 3)
                trows.append(row)
    print(markdown_table(trows))
    for v, by_group in r["summary"].items():
        for g, s in by_group.items():
            suffix = ("" if v == "paper" else f"_{v}") + ("" if g == "all" else f"_{g}")
            s = {m: {c: float("nan") if x is None else x for c, x in row.items()}
                 for m, row in s.items()}
            plot_synapse_effects(s, experiment.figure_path(args, f"ql_fig6{suffix}"),
                                 title=f"QL Fig. 6 ({args.model}, {g}, synapses: {v}, "
                                       f"KNs: {r['locator']})")
    for v, effs in r["effects"].items():
        vb = np.array([e["value_before"] for e in effs])
        print(f"\n{v}: mean synapses per query {np.mean([e['n_synapses'] for e in effs]):.1f} "
              f"(irrelevant applied {np.mean([e['n_irrelevant_synapses'] for e in effs]):.1f}); "
              f"KN mean activation before < 0 for {int((vb < 0).sum())}/{len(vb)} queries "
              "(then the signed relative change reads inverted: see kn_lens.analysis.synapses)")
    h = r["heatmap"]
    print(f"\nHeatmap query: {h['prompt']!r} -> {h['answer']!r}, {h['n_synapses']} synapses, "
          f"per position {list(zip(h['tokens'], h['synapses_per_position']))}")
    kn = h["kns"]
    with np.load(_maps_path(args)) as z:
        maps = {k: z[k].astype(np.float32) for k in ("none", "suppressed", "enhanced")}
    vals = {k: float(np.mean([m[a][b] for a, b in kn])) for k, m in maps.items()}
    print("KN mean activation: " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
    plot_activation_heatmaps(maps, experiment.figure_path(args, "ql_fig7_10"), kns=kn,
                             clip_quantile=0.999,
                             title=f"QL Fig. 7/10: {h['prompt']}{h['answer']} ({args.model})")


def main(argv=None) -> None:
    ap = experiment.add_fact_args(experiment.parser(__doc__.splitlines()[0]))
    ap.add_argument("--locator", choices=["contribution", "ig"], default=None,
                    help="KN locator (default: contribution with --quick, ig otherwise)")
    ap.add_argument("--freeze-last", type=int, default=3, help="contribution KNs: frozen last layers")
    ap.add_argument("--example", type=int, default=None,
                    help="fact index for the heatmaps (default: the first with a synapse)")
    experiment.add_answer_length_arg(ap)
    experiment.add_sweep_args(ap)
    args = ap.parse_args(argv)
    if args.locator is None:
        args.locator = "contribution" if args.quick else "ig"
    experiment.run(args, compute, report)


if __name__ == "__main__":
    main()

"""Locate knowledge neurons for a seeded sample of known facts -> cached per-query NeuronScores.

The Query Localization experiments (``ql_consistency.py``, ``ql_modification.py``,
``ql_mapping.py``) all start from the same thing: for each of n known facts (a fact is *known* when
the model ranks its answer top-1 on >= 60 % of its relation's templates, see ``known_facts.py``;
only relations with >= 5 templates), one ``NeuronScores`` per template (the fact's neighbour
queries q_1..q_k) from a locator. This script computes them once, through a sweep, into the
result store ``results/sweeps/`` (git-ignored; ``--store``; :mod:`kn_lens.locate.cache`: one
``locate`` item per query, keyed by model, locator and its version, config, prompt and answer),
so the other scripts reuse them. The sample and the scores come from
:func:`kn_lens.experiment.prepare_located`. The results JSON holds the sampled facts, per-method
timing and the layer distribution of each method's KNs (the figure).

    python experiments/locate_facts.py --quick                   # ~8 facts, ig + contribution
    python experiments/locate_facts.py --methods ig contribution atp
    python experiments/locate_facts.py --methods ig --backend pool --workers 4   # local processes
    python experiments/locate_facts.py --methods ig --shard 0/2  # and 1/2 elsewhere; then no --shard
    python experiments/locate_facts.py --model tiny-gpt2 --all-facts --n-facts 3   # CI

Known facts come from ``results/known_facts_<model>.json`` when it exists (full run, same
criteria); otherwise they are scored here on a seeded shuffle of the dataset until enough are found
(:func:`kn_lens.datasets.sample_facts`, strategy "shuffle").
"""
from __future__ import annotations

import dataclasses
import time

from kn_lens import experiment

NAME = "locate_facts"


def compute(args) -> None:
    from kn_lens.analysis import default_selection, kn_sets_from_scores
    from kn_lens.models import model_info

    started = time.time()
    located = experiment.prepare_located(args)
    model, ds, facts = located.model, located.dataset, located.facts
    n_layers = model.cfg.n_layers
    layers = {}
    sizes = {}
    for m, by_fact in located.scores.items():
        sets = kn_sets_from_scores(by_fact, default_selection(m, n_layers))
        counts = [0] * n_layers
        for seq in sets.values():
            for s in seq:
                for nrn in s:
                    counts[nrn.layer] += 1
        layers[m] = counts
        sizes[m] = sum(len(s) for seq in sets.values() for s in seq) / sum(len(seq) for seq in sets.values())
    payload = {"facts": [experiment.fact_dict(f) for f in facts],
               "n_queries": sum(len(ds.relation_of(f).templates) for f in facts),
               "seconds_per_query": located.seconds_per_query, "kn_layer_counts": layers,
               "mean_kn_set_size": sizes,
               "selection": {m: dataclasses.asdict(default_selection(m, n_layers))
                             for m in located.scores}}
    cfg = {"methods": {m: experiment.locator_config(args, m) for m in args.methods},
           "n_facts": experiment.ql_n_facts(args), "all_facts": args.no_known_filter,
           "min_templates": experiment.QL_MIN_TEMPLATES,
           "max_answer_tokens": args.max_answer_tokens}
    experiment.save_results(args, NAME, payload, cfg, model_info(model), started)


def report(args) -> None:
    from kn_lens.viz import plot_layer_distribution

    doc = experiment.load_results(args, NAME)
    r = doc["results"]
    print(f"**{args.model}** ({doc['mode']}): {len(r['facts'])} facts, {r['n_queries']} queries\n")
    print("| method | s/query (this run) | mean KN set size |\n|---|---:|---:|")
    for m in r["kn_layer_counts"]:
        s = r["seconds_per_query"].get(m)
        print(f"| {m} | {'cached' if s is None else f'{s:.2f}'} | {r['mean_kn_set_size'][m]:.1f} |")
    p = plot_layer_distribution(r["kn_layer_counts"], experiment.figure_path(args, NAME),
                                title=f"KNs per layer ({args.model}, {len(r['facts'])} facts)")
    print(f"figure {p}")


def main() -> None:
    ap = experiment.parser(__doc__.splitlines()[0])
    experiment.add_locate_args(ap)
    args = ap.parse_args()
    experiment.run(args, compute, report)


if __name__ == "__main__":
    main()

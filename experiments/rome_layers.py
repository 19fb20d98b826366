"""ROME causal tracing: the layer whose MLP output (window 10) carries most of the subject's effect
at the last subject token, averaged over known facts; ROME's default edit layer for the model.

Per known fact (one query: its best template), :func:`kn_lens.analysis.tracing.layer_sweep`
corrupts the subject's embeddings (3 sigma Gaussian noise, 10 samples) and restores, layer by
layer, the MLP outputs of a window of layers (``--window``, ROME: 10) and the residual stream
(window 1) at the last subject token. The average indirect effect per layer and its peak are
saved; ROME edits the MLP layer at the peak (GPT-2 XL: 17, GPT-J: 5). Facts whose corruption
lowers P(answer) by less than ``--min-effect`` (0.01) are skipped and counted. Each (kind, fact)
trace is an ``analysis`` item of one sweep in the result store ``results/sweeps`` (``--store``,
``--backend``, ``--workers``, ``--shard``); seconds per fact are the items' own compute times.

    python experiments/rome_layers.py --quick
    python experiments/rome_layers.py --model gemma-3-270m --n-facts 50
"""
from __future__ import annotations

import time
from pathlib import Path

from kn_lens import experiment

NAME = "rome_layers"
KINDS = ("mlp", "resid", "attn")


def _configs(args) -> dict:
    from kn_lens.analysis.tracing import TraceConfig

    out = {}
    for kind in args.kinds:
        window = 1 if kind == "resid" else args.window
        out[kind] = TraceConfig(kind=kind, window=window, n_noise=args.n_noise, seed=args.seed,
                                position=args.position, min_effect=args.min_effect)
    return out


def compute(args) -> None:
    import torch

    from kn_lens.analysis.tracing import summarize_traces
    from kn_lens.datasets import builtin_dataset
    from kn_lens.errors import InvalidFactError
    from kn_lens.facts import make_query
    from kn_lens.models import model_info
    from kn_lens.sweep import SkippedItem, analysis_items

    experiment.set_threads(args)
    started = time.time()
    n = args.n_facts or (4 if args.quick else 50)
    ds = builtin_dataset()
    model = experiment.model_from_args(args)
    chosen = experiment.sample(args, model, ds, n, strategy="balanced").pairs()
    queries = [make_query(model, f, ds.relation_of(f).templates[t], template_index=t)
               for f, t in chosen]
    configs = _configs(args)
    # one "trace" item per (kind, query), all in one sweep; a query whose subject cannot be
    # located comes back skipped (its InvalidFactError), as in layer_sweep
    items = {kind: analysis_items(model, queries, "trace", cfg) for kind, cfg in configs.items()}
    flat = [it for its in items.values() for it in its]
    traces = iter(experiment.sweep_items(args, flat, model, skip=(InvalidFactError,)))
    secs = iter(experiment.item_seconds(args, flat))
    sweeps, seconds = {}, {}
    for kind, cfg in configs.items():
        got = [next(traces) for _ in queries]
        got = [t.error.partition(": ")[2] if isinstance(t, SkippedItem) else t for t in got]
        sweeps[kind] = summarize_traces(queries, got, config=cfg).to_dict()
        seconds[kind] = round(sum(s or 0.0 for s in (next(secs) for _ in queries))
                              / len(queries), 3)
        print(f"{kind}: best layer {sweeps[kind]['best_layer']} ({seconds[kind]} s/fact)")
    payload = {
        "n_layers": model.cfg.n_layers, "n_facts": len(queries),
        "facts": [{"subject": f.subject, "relation": f.relation, "object": f.object, "template": t,
                   "prompt": q.prompt, "answer": q.answer, "n_answer_tokens": q.n_answer}
                  for (f, t), q in zip(chosen, queries)],
        "sweeps": sweeps, "seconds_per_fact": seconds, "known_filter": not args.no_known_filter,
    }
    experiment.save_results(args, NAME, payload, {"trace": configs, "n_facts_requested": n},
                         model_info(model), started)


def report(args) -> None:
    from kn_lens.analysis.consistency import markdown_table

    doc = experiment.load_results(args, NAME)
    r = doc["results"]
    L = r["n_layers"]
    print(f"## Causal tracing: {args.model} ({doc['mode']}, {r['n_facts']} facts, {L} layers)\n")
    rows = []
    for kind, s in r["sweeps"].items():
        top = ", ".join(f"{l} ({ie:.3f})" for l, ie in s["top_layers"])
        rows.append({"kind": kind, "window": s["window"], "best layer": s["best_layer"],
                     "top-3 layers (mean IE)": top, "kept": s["n_queries"], "skipped": s["skipped"],
                     "mean p_clean": round(s["mean_p_clean"], 3),
                     "mean p_corrupt": round(s["mean_p_corrupt"], 3)})
    print(markdown_table(rows))
    print("\nMean indirect effect per layer:\n")
    curves = [{"layer": l, **{f"{k} (w={s['window']})": round(s["mean_ie"][l], 4)
                              for k, s in r["sweeps"].items()}} for l in range(L)]
    print(markdown_table(curves))
    for kind, s in r["sweeps"].items():
        print(f"best {kind} layer (window {s['window']}): {s['best_layer']}")
    p = _plot(r, experiment.figure_path(args, NAME), args.model)
    print(f"\nfigure {p}")


def _plot(r: dict, path: Path, model: str) -> Path:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(r["n_layers"])
    for kind, s in r["sweeps"].items():
        m, sd = np.asarray(s["mean_ie"]), np.asarray(s["std_ie"])
        line, = ax.plot(x, m, marker="o", ms=3,
                        label=f"{kind} (window {s['window']}), best {s['best_layer']}")
        ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.15, lw=0)
        ax.axvline(s["best_layer"], color=line.get_color(), ls=":", lw=1)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("indirect effect on P(answer)")
    n = max(s["n_queries"] for s in r["sweeps"].values())
    where = {"subject_last": "the last subject token", "last": "the last token"}[
        next(iter(r["sweeps"].values()))["position"]]
    ax.set_title(f"Causal tracing at {where} ({model}, {n} facts kept)\n"
                 "mean ± std over facts", fontsize=9)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png", metadata={"Software": None})
    return path


def main(argv=None) -> None:
    ap = experiment.add_fact_args(experiment.parser(__doc__.splitlines()[0]))
    ap.add_argument("--window", type=int, default=10,
                    help="layers restored around each layer for mlp/attn (ROME: 10); resid uses 1")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=["mlp", "resid"])
    ap.add_argument("--n-noise", type=int, default=10, help="noise samples per fact (ROME: 10)")
    ap.add_argument("--position", choices=("subject_last", "last"), default="subject_last")
    ap.add_argument("--min-effect", type=float, default=0.01,
                    help="skip facts whose corruption lowers P(answer) by less (absolute); "
                         "-1 keeps all (random test models)")
    experiment.add_sweep_args(ap)
    args = ap.parse_args(argv)
    experiment.run(args, compute, report)


if __name__ == "__main__":
    main()

"""FiNE localisation analyses: layer distribution of the located neurons (Fig. 4) and the top
tokens of neurons through W_U W_out (Table 6).

Per known fact (one query: its best template), contribution scores (FiNE eq. 3) and FiNE's
selection: the top k = 5 neurons per answer token, the last l_f = 3 layers frozen, united over
tokens. Fig. 4 counts unique neurons over all facts (and, for comparison, with repeats). Table 6:
(a) the paper's format for one example fact, its top-3 neurons with contribution score and top-5
tokens; (b) the neurons selected for the most facts, with their top-5 tokens. The contribution
scores are per-query ``locate`` items of a sweep in the result store ``results/sweeps``
(``--store``, ``--backend``, ``--workers``, ``--shard``; a rerun computes nothing).

    python experiments/fine_neurons.py --quick
    python experiments/fine_neurons.py                # full: 200 facts
"""
from __future__ import annotations

import time
from collections import Counter

from kn_lens import experiment

NAME = "fine_neurons"


def compute(args) -> None:
    import torch

    from kn_lens.analysis import layer_distribution, neuron_top_tokens, neuron_vocab_logits
    from kn_lens.datasets import builtin_dataset
    from kn_lens.facts import make_query
    from kn_lens.locate import ContributionConfig, select_contribution_neurons
    from kn_lens.models import model_info
    from kn_lens.sweep import locate_items

    experiment.set_threads(args)
    started = time.time()
    n = args.n_facts or (30 if args.quick else 200)
    ds = builtin_dataset()
    model = experiment.model_from_args(args)
    chosen = experiment.sample(args, model, ds, n, strategy="balanced").pairs()
    queries = [make_query(model, f, ds.relation(f.relation).templates[t], template_index=t)
               for f, t in chosen]
    cfg = ContributionConfig(k=args.k, freeze_last=args.freeze_last)
    items = locate_items(model, queries, "contribution", cfg)  # one sweep, stored per query
    scores = experiment.sweep_items(args, items, model)
    secs = sum(experiment.item_seconds(args, items))  # the items' own compute time
    sets = [select_contribution_neurons(s, cfg) for s in scores]
    L = model.cfg.n_layers
    uniq = layer_distribution(sets, L, unique=True)
    rep = layer_distribution(sets, L, unique=False)
    counts = Counter(nn for s in sets for nn in s)
    frequent = counts.most_common(args.n_frequent)

    # Gated (SiLU) MLPs have signed activations: a neuron with a negative activation writes
    # -W_out[l][i], so its tokens "as written" are the top tokens of sign(act) x W_out[l][i] @ W_U.
    def sign_of(sc, nn) -> float:
        tok = sc.per_token[:, nn.layer, nn.index]
        t = int(tok.abs().argmax())
        d = float(neuron_vocab_logits(model, nn)[sc.query.answer_ids[t]])
        return 1.0 if (float(tok[t]) >= 0) == (d >= 0) else -1.0

    def signed_tokens(nn, sign: float, answer_id: int | None = None):
        lg = sign * neuron_vocab_logits(model, nn).float()
        ids = lg.topk(5).indices.tolist()
        rank = None if answer_id is None else int((lg > lg[answer_id]).sum())
        return [model.tokenizer.decode([i]) for i in ids], rank

    signs: dict = {}
    for sc, kn in zip(scores, sets):
        for nn in kn:
            signs.setdefault(nn, []).append(sign_of(sc, nn))
    freq_rows = []
    for nt, (nn, c) in zip(neuron_top_tokens(model, [nn for nn, _ in frequent], k=5), frequent):
        n_neg = sum(1 for x in signs[nn] if x < 0)
        major = -1.0 if n_neg > c / 2 else 1.0
        freq_rows.append({"neuron": [nn.layer, nn.index], "n_facts": c, "tokens": list(nt.tokens),
                          "logits": list(nt.logits), "n_negative_activation": n_neg,
                          "signed_tokens": signed_tokens(nn, major)[0]})
    # the paper's Table 6 layout for one example fact: its top-3 selected neurons by score
    example = []
    for (f, _), q, s, kn in list(zip(chosen, queries, scores, sets))[: args.n_examples]:
        rows = neuron_top_tokens(model, list(kn), k=5, scores=s)[:3]
        ex_rows = []
        for r in rows:
            sg = sign_of(s, r.neuron)
            st, rank = signed_tokens(r.neuron, sg, q.answer_ids[0])
            ex_rows.append({"neuron": [r.neuron.layer, r.neuron.index], "score": r.score,
                            "tokens": list(r.tokens), "activation_sign": sg,
                            "signed_tokens": st, "answer_rank_signed": rank})
        example.append({"prompt": q.prompt, "answer": q.answer, "subject": f.subject,
                        "relation": f.relation, "neurons": ex_rows})
    facts = [{"subject": f.subject, "relation": f.relation, "object": f.object, "template": t,
              "prompt": q.prompt, "answer": q.answer, "n_answer_tokens": len(q.answer_ids),
              "neurons": [[nn.layer, nn.index] for nn in sorted(kn, key=lambda x: (x.layer, x.index))]}
             for (f, t), q, kn in zip(chosen, queries, sets)]
    sizes = [len(s) for s in sets]
    payload = {
        "n_facts": len(facts), "n_layers": L, "facts": facts,
        "layer_distribution_unique": uniq.to_dict(), "layer_distribution_repeats": rep.to_dict(),
        "mean_layer_unique": uniq.mean_layer(), "mean_layer_repeats": rep.mean_layer(),
        "mean_neurons_per_fact": sum(sizes) / len(sizes), "n_unique_neurons": uniq.total,
        "frequent_neurons": freq_rows, "examples": example,
        "seconds_per_fact": secs / len(queries), "known_filter": not args.no_known_filter,
    }
    experiment.save_results(args, NAME, payload, {"contribution": cfg, "n_facts_requested": n},
                         model_info(model), started)


def report(args) -> None:
    from kn_lens.analysis.consistency import markdown_table
    from kn_lens.viz import plot_layer_distribution, plot_table

    doc = experiment.load_results(args, NAME)
    r = doc["results"]
    c = doc["config"]["contribution"]
    u, p = r["layer_distribution_unique"], r["layer_distribution_repeats"]
    L = r["n_layers"]
    print(f"## FiNE neurons: {args.model} ({doc['mode']}, {r['n_facts']} facts; top-{c['k']} per "
          f"answer token, last {c['freeze_last']} layers frozen)\n")
    print(f"{r['mean_neurons_per_fact']:.1f} neurons per fact, {r['n_unique_neurons']} unique; mean "
          f"layer {r['mean_layer_unique']:.1f} (unique) / {r['mean_layer_repeats']:.1f} (with repeats) "
          f"of 0..{L - 1}; {r['seconds_per_fact']:.2f} s/fact.\n")
    top_half = sum(u["counts"][L // 2:]) / max(1, u["total"])
    print(f"Share of unique neurons in the upper half of the layers: {top_half:.1%}\n")
    print(markdown_table([{"layer": l, "unique": cu, "share": round(su, 3), "with repeats": cp}
                          for l, (cu, su, cp) in enumerate(zip(u["counts"], u["shares"], p["counts"]))
                          if cu or cp]))
    plot_layer_distribution({"unique neurons": u["counts"], "with repeats": p["counts"]},
                            experiment.figure_path(args, "fine_fig4"),
                            title=f"FiNE Fig. 4: layers of located neurons ({args.model}, "
                                  f"{r['n_facts']} facts)")
    print("\n### Table 6 (example facts: top-3 neurons by contribution score, top-5 tokens)\n")
    rows = []
    for e in r["examples"]:
        for nn in e["neurons"]:
            rows.append({"query": f"{e['prompt']} →{e['answer']}",
                         "neuron": f"L{nn['neuron'][0]}.U{nn['neuron'][1]}",
                         "score": round(nn["score"], 3), "act": "+" if nn["activation_sign"] > 0 else "-",
                         "top-5 tokens (sign x W_out W_U)": _toks(nn["signed_tokens"]),
                         "answer rank": nn["answer_rank_signed"],
                         "top-5 tokens (W_out W_U)": _toks(nn["tokens"])})
    print(markdown_table(rows))
    print("\n### Most frequently selected neurons and their top-5 tokens (W_out[l][i] @ W_U; "
          "sign-adjusted by the neuron's majority activation sign where selected)\n")
    frows = [{"neuron": f"L{x['neuron'][0]}.U{x['neuron'][1]}", "facts": x["n_facts"],
              "act < 0": x["n_negative_activation"],
              "top-5 tokens (majority sign x W_out W_U)": _toks(x["signed_tokens"]),
              "top-5 tokens (W_out W_U)": _toks(x["tokens"])} for x in r["frequent_neurons"]]
    print(markdown_table(frows))
    plot_table([[x["neuron"], x["facts"], x["top-5 tokens (majority sign x W_out W_U)"]] for x in frows],
               ["neuron", "facts", "top-5 tokens (sign-adjusted)"], experiment.figure_path(args, "fine_table6"),
               title=f"FiNE Table 6 style: most frequent neurons ({args.model})")


def _toks(tokens) -> str:
    return ", ".join(repr(t) for t in tokens).replace("|", "\\|")


def main(argv=None) -> None:
    ap = experiment.add_fact_args(experiment.parser(__doc__.splitlines()[0]))
    ap.add_argument("--k", type=int, default=5, help="FiNE App. C: top-k per answer token")
    ap.add_argument("--freeze-last", type=int, default=3, help="FiNE §4.3: frozen last layers")
    ap.add_argument("--n-frequent", type=int, default=10)
    ap.add_argument("--n-examples", type=int, default=2)
    experiment.add_sweep_args(ap)
    args = ap.parse_args(argv)
    experiment.run(args, compute, report)


if __name__ == "__main__":
    main()

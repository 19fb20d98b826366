"""Speed of exact causal mediation (gamma = 20 %) and attribution patching on the default model,
and how well AtP ranks neurons like the exact IE.

    python benchmarks/bench_mediation.py [--facts 2] [--gamma 20] [--n-noise 1] [--threads N]

Prints seconds (wall and process CPU time) per fact per noise sample and AtP-vs-exact Spearman / top-1 % overlap.
"""
from __future__ import annotations

import argparse
import time

import torch

from kn_lens.facts import Fact, make_query
from kn_lens.locate.mediation import (AtPConfig, MediationConfig, attribution_patching,
                                      causal_mediation, mediation_agreement)
from kn_lens.models import load_model

FACTS = [
    (Fact("Eiffel Tower", "located_in", "Paris"), "The {} is located in the city of"),
    (Fact("France", "capital", "Paris"), "The capital of {} is"),
    (Fact("Japan", "capital", "Tokyo"), "The capital of {} is"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--facts", type=int, default=2)
    ap.add_argument("--gamma", type=float, default=20.0)
    ap.add_argument("--n-noise", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--restore", default="last", choices=["last", "all"])
    ap.add_argument("--corrupt", default="subject", choices=["subject", "all"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model) if args.model else load_model()
    print(f"model {model.cfg.model_name}: {model.cfg.n_layers} layers x {model.cfg.d_mlp} neurons; "
          f"torch threads {torch.get_num_threads()}")
    for fact, template in FACTS[: args.facts]:
        q = make_query(model, fact, template)
        acfg = AtPConfig(n_noise=args.n_noise, corrupt=args.corrupt,
                         restore_positions=args.restore)
        attribution_patching(model, q, config=acfg)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        atp = attribution_patching(model, q, config=acfg)
        t_atp, c_atp = time.perf_counter() - t, time.process_time() - c
        mcfg = MediationConfig(n_noise=args.n_noise, gamma=args.gamma, corrupt=args.corrupt,
                               restore_positions=args.restore)
        t, c = time.perf_counter(), time.process_time()
        exact = causal_mediation(model, q, config=mcfg)
        t_exact, c_exact = time.perf_counter() - t, time.process_time() - c
        ag = mediation_agreement(exact, atp)
        n = int(exact.extras["searched"].sum())
        print(f"{q.prompt!r} -> {q.answer!r}: P clean {exact.extras['p_clean']:.3f}, "
              f"P corrupted {[round(p, 4) for p in exact.extras['p_corrupted']]}")
        print(f"  exact mediation: {n} neurons searched, {t_exact / args.n_noise:.1f} s wall "
              f"({c_exact / args.n_noise:.1f} s CPU) per noise sample (max IE "
              f"{exact.scores.max():.4f})")
        print(f"  AtP: {t_atp / args.n_noise:.2f} s wall ({c_atp / args.n_noise:.2f} s CPU) per "
              "noise sample")
        print(f"  AtP vs exact over searched neurons: Spearman {ag.spearman:.4f}, Pearson "
              f"{ag.pearson:.4f}, top-1% (k={ag.k}) overlap {ag.top_overlap:.3f}")


if __name__ == "__main__":
    main()

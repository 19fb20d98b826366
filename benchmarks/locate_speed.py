"""Seconds per query of the locators on a real model: fast vs plain integrated gradients and FiNE
contribution scores, plus the fast/plain agreement (max relative difference).

    python benchmarks/locate_speed.py [--model smollm2-135m] [--threads 1] [--plain-queries 1]

Timings depend on the machine and its load: print them with the thread count and report both.
"""
from __future__ import annotations

import argparse
import time

import torch

from kn_lens.facts import query_from_prompt
from kn_lens.locate import IGConfig, contribution_scores, integrated_gradients
from kn_lens.locate import integrated_gradients_plain
from kn_lens.models import load_model

FACTS = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The capital of Japan is the city of", "Tokyo"),
    ("Windows was developed by", "Microsoft"),
]


def _time(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plain-queries", type=int, default=1)
    ap.add_argument("--baseline", default="zero", choices=["zero", "eos"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    cfg = IGConfig(baseline=args.baseline)
    print(f"model {model.kn_info.name}: {model.cfg.n_layers} layers x d_mlp {model.cfg.d_mlp}; "
          f"torch threads {torch.get_num_threads()}; IG steps {cfg.steps}, baseline {cfg.baseline}")
    queries = [query_from_prompt(model, p, a) for p, a in FACTS]
    contribution_scores(model, queries[0])  # warm-up
    print("| query | tokens | contribution (s) | fast IG (s) | plain IG (s) | speed-up | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for i, q in enumerate(queries):
        tc, _ = _time(contribution_scores, model, q)
        tf, fast = _time(integrated_gradients, model, q, config=cfg)
        plain_cells = "-", "-", "-"
        if i < args.plain_queries:
            tp, plain = _time(integrated_gradients_plain, model, q, config=cfg)
            rel = float((fast.scores - plain.scores).abs().max() / plain.scores.abs().max())
            plain_cells = f"{tp:.1f}", f"{tp / tf:.1f}x", f"{rel:.1e}"
        print(f"| {q.prompt!r} -> {q.answer!r} | {len(q.input_ids)} | {tc:.3f} | {tf:.2f} | "
              + " | ".join(plain_cells) + " |", flush=True)


if __name__ == "__main__":
    main()

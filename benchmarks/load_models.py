"""Load each built-in offline model twice (the first call prepares it into the cache if needed)
and print the time of the load from the cache, plus the top prediction for the Eiffel Tower prompt.

    python benchmarks/load_models.py [--models smollm2-135m gemma-3-270m]
"""
from __future__ import annotations

import argparse
import time

import torch

from kn_lens.facts import predict, query_from_prompt
from kn_lens.models import OFFLINE_MODELS, is_prepared, load_model, prepare_model

PROMPT = "The Eiffel Tower is located in the city of"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(OFFLINE_MODELS))
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    print("| model | prepare (s) | load from cache (s) | top token | P |")
    print("|---|---|---|---|---|")
    for name in args.models:
        t0 = time.perf_counter()
        was = is_prepared(name)
        prepare_model(name, verbose=False)
        prep = "cached" if was else f"{time.perf_counter() - t0:.0f}"
        load_model(name)  # warm the OS file cache
        t0 = time.perf_counter()
        model = load_model(name)
        load_s = time.perf_counter() - t0
        (p,) = predict(model, [query_from_prompt(model, PROMPT, "Paris")], k=1)
        print(f"| {name} | {prep} | {load_s:.1f} | {p.top_tokens[0]!r} | {p.top_probs[0]:.3f} |")
        del model


if __name__ == "__main__":
    main()

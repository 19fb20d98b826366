"""Backends and dtypes on a real model: the HookedTransformer against the TransformerBridge
(TransformerLens 4's model class), and bfloat16 / float16 against float32, on one query.

For each variant it prints the load time, the time of each locator call and of one scoring call,
and the largest difference of the scores from the float32 HookedTransformer's (absolute, and
relative to the largest score), plus the overlap of the top-20 neurons.

    python benchmarks/backends.py [--model smollm2-135m] [--device cpu] [--threads 2]
        [--variants hooked:float32 bridge:float32 hooked:bfloat16 hooked:float16]
        [--ig-layers 12 24] [--ig-steps 20]

IG on a bridge runs whole forwards (no ``start_at_layer`` there): ``--ig-layers`` scores a few
layers so the bridge's IG fits in minutes on a CPU (all layers: ``--ig-layers all``).
"""
from __future__ import annotations

import argparse
import time

import torch

from kn_lens.evaluate.scoring import score
from kn_lens.facts import Fact, make_query
from kn_lens.locate import IGConfig, contribution_scores, integrated_gradients
from kn_lens.models import load_model

FACT = Fact("Eiffel Tower", "located_in", "Paris")
TEMPLATE = "The {} is located in the city of"


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", nargs="+",
                    default=["hooked:float32", "bridge:float32", "hooked:bfloat16",
                             "hooked:float16"])
    ap.add_argument("--ig-layers", nargs="+", default=["12", "24"])
    ap.add_argument("--ig-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = None if args.ig_layers == ["all"] else tuple(int(x) for x in args.ig_layers)
    ig_cfg = IGConfig(steps=args.ig_steps, layers=layers)
    print(f"model {args.model}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"IG steps {args.ig_steps} on layers {layers or 'all'}")
    print("| backend | dtype | load (s) | method | time (s) | max abs diff | rel. to max | "
          "top-20 overlap |")
    print("|---|---|---|---|---|---|---|---|")
    ref: dict[str, torch.Tensor] = {}
    for variant in args.variants:
        backend, dtype = variant.split(":")
        load_model(args.model, backend=backend, dtype=dtype, device=args.device)  # warm caches
        model, load_s = _timed(lambda: load_model(args.model, backend=backend, dtype=dtype,
                                                  device=args.device))
        q = make_query(model, FACT, TEMPLATE)
        runs = {
            "score (log P)": lambda: torch.tensor([score(model, [q])[0].logprob]),
            "contribution": lambda: contribution_scores(model, q).scores,
            "ig": lambda: integrated_gradients(model, q, config=ig_cfg).scores,
        }
        for name, fn in runs.items():
            fn()  # warm-up (first-call allocations)
            out, secs = _timed(fn)
            if name not in ref:
                ref[name] = out
            err = float((out - ref[name]).abs().max())
            scale = float(ref[name].abs().max())
            k = min(20, out.numel())
            overlap = len(set(out.flatten().topk(k).indices.tolist())
                          & set(ref[name].flatten().topk(k).indices.tolist())) if k > 1 else "-"
            print(f"| {backend} | {dtype} | {load_s:.1f} | {name} | {secs:.2f} | {err:.2e} | "
                  f"{err / scale:.1e} | {overlap} |")
        del model


if __name__ == "__main__":
    main()

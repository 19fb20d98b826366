"""Seconds per training step and peak memory of a TNF-DA batch edit: one graph, and the chunked
step in one pass and in two passes, in one run.

    python benchmarks/batch_step.py                          # 10 requests, SmolLM2, 2 steps
    python benchmarks/batch_step.py --k 30 --budget 50000 --threads 2
    python benchmarks/batch_step.py --k 100 --steps 1 --modes one   # one graph would need > 22 GB

A batch edit whose training rows exceed ``OptimConfig.max_graph_tokens`` (padded tokens x blocks)
runs each step in chunks of rows (``kn_lens.edit.optimise``): in one pass when every loss term is
a mean over its examples (TNF-DA's NLL and KL are), otherwise in two (a no-grad forward of every
row first). Each mode runs in a fresh subprocess (its peak RSS is its own: model + edit) on the
same ``--k`` requests and the same random 1 % neurons per request (the localisation is not timed
here; the step cost depends on the rows, not on which neurons train): ``--steps`` steps, and a
0-step run for the set-up (the unedited reference logits), so s/step = (t(steps) - t(0)) / steps.
"two passes" forces the fallback by wrapping the terms in ones that do not declare themselves
decomposable. Prints a markdown table with each mode's s/step, its ratio to the two-pass step,
peak RSS, and the largest difference of its trained deltas from the one-graph run's (the three
modes compute the same gradient up to float summation order; Adam's first steps move an entry by
about lr times the sign of its gradient, so an entry whose gradient is ~0 may move differently).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from kn_lens._bench import machine

MODES = {"graph": "one graph", "one": "one pass", "two": "two passes"}


def child(args) -> None:
    import warnings
    from dataclasses import replace

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    from kn_lens.datasets import build_edit_requests, builtin_dataset, sample_facts
    from kn_lens.edit.optimise import LossTerm, optimise
    from kn_lens.edit.tnf_da import TNFDAConfig, training_problem
    from kn_lens.experiment import RESULTS, saved_known_facts
    from kn_lens.models import load_model
    from kn_lens.neurons import random_like, union

    model = load_model(args.model)
    ds = builtin_dataset()
    chosen = sample_facts(model, ds, args.k, seed=args.seed, strategy="balanced",
                          min_per_relation=1, known=saved_known_facts(RESULTS, model.kn_info.name))
    requests = list(build_edit_requests(ds, chosen.facts, seed=args.seed,
                                        rewrite_template=chosen.templates))
    cfg = TNFDAConfig()
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    per = max(1, round(cfg.fraction * model.cfg.n_layers * model.cfg.d_mlp))
    neurons = union([random_like(per, model.cfg.n_layers, model.cfg.d_mlp, generator=g)
                     for _ in requests])

    class Whole(LossTerm):  # the same term, not declared a mean over examples: two passes
        def __init__(self, inner):
            self.inner, self.name, self.weight = inner, inner.name, inner.weight
            self.examples, self.needs_reference = inner.examples, inner.needs_reference

        def prepare(self, reference):
            self.inner.prepare(reference)

        def loss(self, logits):
            return self.inner.loss(logits)

    budget = 10 ** 12 if args.child == "one graph" else args.budget
    out: dict = {"mode": args.child}
    for steps in (0, args.steps):
        problem = training_problem(model, requests, neurons, config=cfg,
                                   generator=torch.Generator(device="cpu").manual_seed(args.seed))
        terms = [Whole(t) for t in problem.terms] if args.child == "two passes" else problem.terms
        optim = replace(problem.optim, steps=steps, stop_nll=None, max_graph_tokens=budget)
        t0 = time.perf_counter()
        res = optimise(model, problem.targets, terms, config=optim)
        out[f"t{steps}"] = time.perf_counter() - t0
    out.update({"rows": problem.n_train + problem.n_augment, "neurons": len(neurons),
                "chunks": res.extras["chunks"], "passes": res.extras["passes"],
                "losses": [h["loss"] for h in res.history],
                "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20})
    torch.save([v.cpu() for v in res.values], args.values)
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, default=10, help="requests in the batch")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per mode")
    ap.add_argument("--budget", type=int, default=20_000,
                    help="max_graph_tokens of the chunked modes (default 20k: forces chunks at "
                         "k = 10, ~72k token-blocks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="graph,one,two",
                    help="which of graph (one graph), one (one pass), two (two passes)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--values", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name in ("k", "steps", "budget", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.child:
        child(args)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: a comma-separated subset of {', '.join(MODES)}, got {args.modes!r}")
    import tempfile

    import torch

    print(machine(args.threads))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in (MODES[m] for m in modes):
            values = os.path.join(tmp, f"{len(results)}.pt")
            cmd = [sys.executable, __file__, "--child", mode, "--values", values,
                   *(f"--{k}={getattr(args, k)}" for k in ("model", "k", "steps", "budget",
                                                            "threads", "seed"))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{mode} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(line[7:])
            results[mode]["values"] = torch.load(values)
    first = next(iter(results.values()))
    base = results.get("one graph", first)  # the deltas the others are compared with
    ref = results.get("two passes")  # the step time the others are divided by
    step = {m: (r[f"t{args.steps}"] - r["t0"]) / args.steps for m, r in results.items()}
    print(f"\nTNF-DA batch of {args.k} requests on {args.model}: {first['rows']} training rows, "
          f"{first['neurons']} random neurons (1 % per request, united), {args.steps} steps, "
          f"chunk budget {args.budget} padded tokens x blocks\n")
    print(f"| step | chunks | passes | s/step | vs two passes | set-up s | peak RSS GiB "
          f"| max abs diff of deltas vs {[k for k, v in results.items() if v is base][0]} "
          f"(max abs delta) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        diff = max(float((a - b).abs().max()) for a, b in zip(r["values"], base["values"]))
        size = max(float(a.abs().max()) for a in r["values"])
        ratio = "-" if ref is None else f"{step[m] / step['two passes']:.2f}"
        print(f"| {m} | {r['chunks']} | {r['passes']} | {step[m]:.1f} | {ratio} | "
              f"{r['t0']:.1f} | {r['peak_gib']:.2f} | {diff:.1e} ({size:.1e}) |")
    for m, r in results.items():
        print(f"losses per step ({m}): {[round(x, 4) for x in r['losses']]}")


if __name__ == "__main__":
    main()

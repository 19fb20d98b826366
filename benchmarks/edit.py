"""Seconds per edit and peak memory of every editor, and the one-time key statistics, in one run.

    python benchmarks/edit.py                     # every editor on the default model
    python benchmarks/edit.py --stats             # + recompute C = E[k k^T] (ROME / MEMIT layers)
    python benchmarks/edit.py --editors rome,ft_l --n 5 --threads 2

Each editor runs in a fresh subprocess (so its peak resident memory is its own: model + editor):
one warm-up edit (loads the cached statistics), then ``--n`` timed edits of different known facts
(batch size 1; MEMIT also once with ``--memit-batch`` requests). Prints a markdown table: median
and max seconds per edit, peak RSS. Targets on this 2-core CPU for SmolLM2-135M: ROME and FT-L
<= 5 s per edit once C is cached, C <= 5 min per layer (once), peak memory <= 4 GiB; the
neuron-level editors' times include their localisation: FiNE <= 3 s, KNE <= 10 s, TNF-DA <= 30 s. Timings
depend on the machine and its load; the load average, thread count, CPU model and a measured matmul
rate are printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from kn_lens._bench import machine

# editors, and one of the editing benchmark's variants (kn_lens.edit.benchmark.VARIANTS):
# tnf_da_atp = TNF-DA with AtP-ranked targeted neurons
EDITORS = ("ft_l", "rome", "memit", "kn_update", "kn_erase", "fine", "kne", "tnf_da", "tnf_da_atp")
# seconds per edit on SmolLM2, localisation included (the issues' targets)
TARGETS = {"ft_l": 5.0, "rome": 5.0, "fine": 3.0, "kne": 10.0, "tnf_da": 30.0, "tnf_da_atp": 30.0}


def _requests(model, n: int, seed: int):
    """``n`` known facts balanced over relations (one per relation while ``n`` is at most the
    number of relations; known verdicts from results/known_facts_<model>.json when it exists),
    as CounterFact-style requests with their best template as the rewrite prompt."""
    from kn_lens.datasets import build_edit_requests, builtin_dataset, sample_facts
    from kn_lens.experiment import RESULTS, saved_known_facts

    ds = builtin_dataset()
    chosen = sample_facts(model, ds, n, seed=seed, strategy="balanced", min_per_relation=1,
                          known=saved_known_facts(RESULTS, model.kn_info.name))
    return list(build_edit_requests(ds, chosen.facts, seed=seed,
                                    rewrite_template=chosen.templates))


def child(args) -> None:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    from kn_lens.edit import edit
    from kn_lens.edit.baselines.stats import second_moments
    from kn_lens.edit.benchmark import editor_configs, resolve
    from kn_lens.edit.layers import memit_layers, rome_layer
    from kn_lens.models import load_model

    model = load_model(args.model)
    out: dict = {"editor": args.child}
    if args.child == "stats":
        for name, layers in (("rome", [rome_layer(model)]), ("memit", list(memit_layers(model)))):
            t0 = time.perf_counter()
            second_moments(model, layers, cache=False, verbose=True)
            out[name] = {"layers": layers, "seconds": time.perf_counter() - t0}
        out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(out))
        return
    batch = args.memit_batch if args.child == "memit@batch" else 1
    method = "memit" if args.child == "memit@batch" else args.child
    method, config = resolve(method, editor_configs(quick=False))  # an editor or a variant
    reqs = _requests(model, (args.n + 1) if batch == 1 else batch + 1, args.seed)
    edit(model, reqs[:1], method=method, config=config, seed=args.seed)  # warm-up: statistics
    times = []
    if batch == 1:
        for r in reqs[1:]:
            t0 = time.perf_counter()
            edit(model, [r], method=method, config=config, seed=args.seed)
            times.append(time.perf_counter() - t0)
    else:
        t0 = time.perf_counter()
        edit(model, reqs[1:], method=method, config=config, seed=args.seed)
        times.append(time.perf_counter() - t0)
    out["timed"] = [f"{r.fact.subject} -> {r.new_object} "
                    f"({len(model.to_tokens(' ' + r.new_object, prepend_bos=False)[0])} tok)"
                    for r in reqs[1:]]
    out.update({"batch": batch, "times": times,
                "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editors", default=",".join(EDITORS))
    ap.add_argument("--n", type=int, default=3, help="timed edits per editor")
    ap.add_argument("--memit-batch", type=int, default=10, help="MEMIT batch size (0 = skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats", action="store_true", help="also time C = E[k k^T] from scratch")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    jobs = [e.strip() for e in args.editors.split(",") if e.strip()]
    if "memit" in jobs and args.memit_batch > 1:
        jobs.append("memit@batch")
    if args.stats:
        jobs.insert(0, "stats")
    print(f"model {args.model}; torch threads {args.threads}; cpu count {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f}\n{machine(args.threads)}\n")
    results = []
    for job in jobs:
        cmd = [sys.executable, __file__, "--child", job, "--model", args.model, "--n", str(args.n),
               "--memit-batch", str(args.memit_batch), "--threads", str(args.threads),
               "--seed", str(args.seed)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not lines:
            print(f"{job}: failed (exit {r.returncode})\n{r.stderr[-2000:]}")
            continue
        results.append(json.loads(lines[-1][7:]))
        if job == "stats":
            for x in r.stderr.splitlines():
                if "second moments" in x:
                    print(x)
    print("\n| editor | batch | s / edit (median) | max | peak RSS (GiB) | target (s) |")
    print("|---|---:|---:|---:|---:|---|")
    for res in results:
        if res["editor"] == "stats":
            continue
        t = res["times"]
        name = "memit" if res["editor"] == "memit@batch" else res["editor"]
        target = TARGETS.get(name) if res["batch"] == 1 else None
        verdict = "" if target is None else \
            f"<= {target:g}: {'met' if statistics.median(t) <= target else 'not met'}"
        print(f"| {name} | {res['batch']} | {statistics.median(t):.2f} | {max(t):.2f} | "
              f"{res['peak_gib']:.2f} | {verdict} |")
    timed = next((res["timed"] for res in results if res.get("batch") == 1), None)
    if timed:  # the same requests for every editor (same seed and --n)
        print(f"\ntimed requests (new object, its tokens): {'; '.join(timed)}")
    for res in results:
        if res["editor"] == "stats":
            print("\nKey statistics C = E[k k^T] (100,000 tokens, computed once, then cached):\n")
            print("| for | layers | seconds | s / layer | peak RSS (GiB) |")
            print("|---|---|---:|---:|---:|")
            for k in ("rome", "memit"):
                v = res[k]
                print(f"| {k} | {v['layers']} | {v['seconds']:.1f} | "
                      f"{v['seconds'] / len(v['layers']):.1f} | {res['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()

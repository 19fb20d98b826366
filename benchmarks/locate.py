"""Speed, memory and agreement of every locator on a real model, in one run.

    python benchmarks/locate.py                      # speed/memory table (default model)
    python benchmarks/locate.py --behaviour 50       # + the ablation table over 50 known facts
    python benchmarks/locate.py --ig-floor           # IG vs its FLOP floor, SmolLM2 and Gemma-3
    python benchmarks/locate.py --ig-profile         # where IG's time goes beyond the matmuls
    python benchmarks/locate.py --ig-accuracy 3      # fast / plain IG, float32 vs float64

Prints (markdown):
1. per method: seconds per query (mean over ``--queries`` single-token queries) and peak resident
   memory of the process during the method;
2. plain per-layer IG next to the fast IG, their ratio and max relative difference;
3. attribution patching vs exact mediation (DNI-pruned, gamma = 20 %): Spearman over the searched
   neurons and overlap of the top 1 %;
4. with ``--behaviour N``: over N known facts, the drop of P(answer) when zeroing each method's top
   0.1 % neurons vs as many random neurons (3 draws per fact);
5. with ``--ig-floor``: for each of ``--floor-models`` (one run), fast IG's seconds per query
   against its FLOP floor: the matmul FLOPs exact IG cannot avoid (``kn_lens.locate.ig_flops``:
   per path point and layer l, W_out of layer l, blocks l+1.. on the answer position with
   attention over the prompt, the full unembedding; forward + the input-gradient backward)
   divided by the machine's sustained fp32 matmul rate, measured in the same run at the model's
   MLP shape with one IG call's rows: every run between two probes as long as itself (median
   ratio over queries x ``--floor-repeats``); also in CPU time;
6. with ``--ig-profile``: one IG call per model under torch.profiler: time and rate of the matmul
   kernels, the other ops, and the clean forward pass IG starts with;
7. with ``--ig-accuracy N``: fast and plain IG (N layers) in float32 against float64.
Timings depend on the machine and its load; the thread count and load average are printed with
them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

import psutil
import torch

from kn_lens import hooks
from kn_lens._bench import cpu_name, matmul_rates
from kn_lens.datasets import builtin_dataset, known_facts
from kn_lens.datasets.known import KnownFacts
from kn_lens.facts import answer_probs, make_query
from kn_lens.locate import (IGConfig, ig_flops, integrated_gradients, integrated_gradients_plain,
                            locate)
from kn_lens.locate.mediation import AtPConfig, MediationConfig, mediation_agreement
from kn_lens.models import load_model
from kn_lens.neurons import random_like, top_fraction

SPEED_METHODS = {
    "contribution": None,
    "ig": IGConfig(steps=20),
    "ig_eos": IGConfig(steps=20, baseline="eos"),
    "atp": AtPConfig(n_noise=1),
    "mediation": MediationConfig(n_noise=1, gamma=20.0),  # DNI-pruned, TNF-DA eq. 6-7
    "mediation (prune=atp)": MediationConfig(n_noise=1, gamma=20.0, prune="atp"),
}
BEHAVIOUR_METHODS = {
    "contribution": None,
    "ig": IGConfig(steps=20),
    "atp": AtPConfig(n_noise=1),
    "mediation (prune=atp, 5 %)": MediationConfig(n_noise=1, gamma=5.0, prune="atp"),
    "mediation (DNI, 5 %)": MediationConfig(n_noise=1, gamma=5.0),
}


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self._proc, self._stop, self.peak = psutil.Process(os.getpid()), False, 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _method(name: str) -> str:
    return name.split(" ")[0]


def known_queries(model, n: int, seed: int):
    """``n`` known facts with single-token answers (a seeded sample), each on its best template;
    known-ness from ``results/known_facts_<model>.json`` when it exists, else scored here."""
    ds = builtin_dataset()
    rng = random.Random(seed)
    facts = list(ds.facts)
    rng.shuffle(facts)
    saved = Path(__file__).resolve().parents[1] / "results" / \
        f"known_facts_{model.kn_info.name}.json"
    if saved.exists():
        kf = KnownFacts.from_dict(json.loads(saved.read_text())["results"])
        index = {f: i for i, f in enumerate(kf.facts)}
        chunks = [(kf, [index[f] for f in facts if f in index])]
    else:
        chunks = ((kf, range(len(kf.facts))) for kf in (
            known_facts(model, facts[s:s + 200], ds) for s in range(0, len(facts), 200)))
    out = []
    for kf, order in chunks:
        for i in order:
            if kf.known[i]:
                f, t = kf.facts[i], kf.best_template(i)
                q = make_query(model, f, ds.relations[f.relation].templates[t], template_index=t)
                if q.n_answer == 1:
                    out.append(q)
            if len(out) >= n:
                return out
    return out


def speed(model, queries, plain_queries: int) -> None:
    print(f"\n### Speed and memory ({len(queries)} single-token queries, "
          f"torch threads {torch.get_num_threads()})\n")
    print("| method | s / query | peak RSS (GiB) |")
    print("|---|---:|---:|")
    results = {}
    for name, cfg in SPEED_METHODS.items():
        locate(model, queries[:1], method=_method(name), config=cfg, progress=False)  # warm-up
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            results[name] = locate(model, queries, method=_method(name), config=cfg, progress=False)
            dt = (time.perf_counter() - t0) / len(queries)
        print(f"| {name} | {dt:.2f} | {mem.peak / 2**30:.2f} |", flush=True)

    print("\n### Fast vs plain integrated gradients (m = 20, all layers)\n")
    print("| query | plain (s) | fast (s) | speed-up | max rel. diff |")
    print("|---|---:|---:|---:|---:|")
    for q, fast in zip(queries[:plain_queries], results["ig"]):
        t0 = time.perf_counter()
        (f2,) = locate(model, [q], method="ig", config=SPEED_METHODS["ig"], progress=False)
        tf = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = integrated_gradients_plain(model, q, config=SPEED_METHODS["ig"])
        tp = time.perf_counter() - t0
        rel = float((f2.scores - plain.scores).abs().max() / plain.scores.abs().max())
        print(f"| {q.prompt}{q.answer} | {tp:.1f} | {tf:.1f} | {tp / tf:.1f}x | {rel:.1e} |",
              flush=True)

    print("\n### Attribution patching vs exact mediation (DNI-pruned, gamma = 20 %, 1 noise sample)\n")
    print("| query | Spearman (searched neurons) | top-1 % overlap | searched |")
    print("|---|---:|---:|---:|")
    for q, atp, exact in zip(queries, results["atp"], results["mediation"]):
        ag = mediation_agreement(exact, atp)
        print(f"| {q.prompt}{q.answer} | {ag.spearman:.4f} | {ag.top_overlap:.3f} | "
              f"{ag.n_searched} |")


def ig_floor(names: list[str], n_queries: int, seed: int, repeats: int) -> None:
    """Fast IG (m = 20, zero baseline, all layers) against its FLOP floor, one row per model.

    Each timed run is bracketed by two matmul probes of about its own duration, and its floor is
    its FLOPs over the mean rate of its two probes: other jobs on a shared machine slow the
    probes about as much as the run between them, so the per-run ratio is steadier than either
    time. The table gives the median ratio over ``queries x repeats`` runs (and its range)."""
    cfg = IGConfig(steps=20)
    name, isa = cpu_name()
    print(f"\n### Integrated gradients vs the FLOP floor (m = {cfg.steps}, all layers; "
          f"{n_queries} known single-token queries per model x {repeats} runs; torch threads "
          f"{torch.get_num_threads()}; cpu {name} ({isa}))\n")
    print("| model | tokens | GFLOP / query (blocks + W_out + unembedding) | matmul GFLOP/s "
          "(median; shape) | floor (s) | IG (s / query, median) | **IG / floor** (median, "
          "range) | same in CPU time | load avg |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for model_name in names:
        model = load_model(model_name)
        queries = known_queries(model, n_queries, seed)
        shape = (min(cfg.chunk, model.cfg.n_layers * cfg.steps), model.cfg.d_model,
                 model.cfg.d_mlp)
        t0 = time.perf_counter()
        integrated_gradients(model, queries[0], config=cfg)  # warm-up, and the probes' length
        seconds = time.perf_counter() - t0
        rates, times, ratios, cpu_ratios, loads, gflops = [], [], [], [], [], []
        for q in queries:
            flops = ig_flops(model, q, config=cfg)
            gflops.append(flops)
            after = matmul_rates(*shape, seconds=seconds)
            for _ in range(repeats):
                before = after
                loads.append(os.getloadavg()[0])
                t0, c0 = time.perf_counter(), time.process_time()
                integrated_gradients(model, q, config=cfg)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                after = matmul_rates(*shape, seconds=seconds)
                rates += [before[0], after[0]]
                times.append(wall)
                ratios.append(wall * (before[0] + after[0]) / 2 / (flops.total / 1e9))
                cpu_ratios.append(cpu * (before[1] + after[1]) / 2 / (flops.total / 1e9))
        rate = statistics.median(rates)
        gflop = statistics.mean(f.total for f in gflops) / 1e9
        parts = " + ".join(f"{statistics.mean(getattr(f, k) for f in gflops) / 1e9:.1f}"
                           for k in ("blocks", "w_out", "unembed"))
        tokens = statistics.mean(len(q.input_ids) for q in queries)
        print(f"| {model_name} | {tokens:.1f} | {gflop:.1f} ({parts}) | {rate:.0f} "
              f"({shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}) | {gflop / rate:.2f} | "
              f"{statistics.median(times):.2f} | **{statistics.median(ratios):.2f}** "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {statistics.median(cpu_ratios):.2f} | "
              f"{min(loads):.1f}-{max(loads):.1f} |", flush=True)
        del model


_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def _matmul_flops(name: str, shapes) -> int:
    a, b = shapes[1:3] if name == "aten::addmm" else shapes[:2]  # addmm: (bias, a, b)
    return 2 * (a[0] if len(a) == 3 else 1) * a[-2] * a[-1] * b[-1]


def ig_profile(names: list[str], seed: int) -> None:
    """Where one fast IG call's time goes (torch.profiler, one query per model): the matmul
    kernels (their FLOPs and rate inside IG), every other op (top 6 by self time), and the clean
    forward pass IG starts with (timed alone, unprofiled; not in the floor)."""
    from torch.profiler import ProfilerActivity, profile

    from kn_lens._fast import fast_forward
    from kn_lens.locate.integrated_gradients import _clean_run

    cfg = IGConfig(steps=20)
    print(f"\n### Where fast IG's time goes (torch.profiler, one query, torch threads "
          f"{torch.get_num_threads()}; profiling slows small ops, so the shares matter)\n")
    print("| model | profiled (s) | matmuls: s, GFLOP, GFLOP/s | other ops (s) | largest other ops "
          "(ms) | clean forward alone (s) | load avg |")
    print("|---|---:|---|---:|---|---:|---:|")
    for model_name in names:
        model = load_model(model_name)
        (q,) = known_queries(model, 1, seed)
        integrated_gradients(model, q, config=cfg)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            integrated_gradients(model, q, config=cfg)
        mm_s = mm_flop = other_s = 0.0
        others: dict[str, float] = {}
        for e in prof.events():
            if e.name in _MATMULS:
                mm_s += e.self_cpu_time_total / 1e6
                mm_flop += _matmul_flops(e.name, e.input_shapes) / 1e9
            elif e.name.startswith("aten::") or "Backward" in e.name:
                other_s += e.self_cpu_time_total / 1e6
                others[e.name] = others.get(e.name, 0.0) + e.self_cpu_time_total / 1e3
        top = ", ".join(f"{k.replace('aten::', '')} {v:.0f}" for k, v in
                        sorted(others.items(), key=lambda kv: -kv[1])[:6])
        with fast_forward(model, frozen_weights=True, weight_grads=False):
            t0 = time.perf_counter()
            _clean_run(model, list(q.input_ids))
            clean = time.perf_counter() - t0
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
        print(f"| {model_name} | {total:.2f} | {mm_s:.2f}, {mm_flop:.1f}, {mm_flop / mm_s:.0f} | "
              f"{other_s:.2f} | {top} | {clean:.3f} | {os.getloadavg()[0]:.1f} |", flush=True)
        del model


def ig_accuracy(names: list[str], seed: int, layers: int) -> None:
    """Fast and plain IG in float32 against the same computed in float64 (where both agree):
    which of the two float32 implementations is the more accurate. One query per model,
    ``layers`` evenly spaced layers (the plain loop costs a full pass per layer)."""
    print("\n### Fast and plain IG in float32 against float64 (max abs difference / max abs "
          "score; one query)\n")
    print("| model | baseline | layers | fast64 vs plain64 | fast32 vs 64 | plain32 vs 64 | "
          "fast32 vs plain32 |")
    print("|---|---|---|---:|---:|---:|---:|")
    for model_name in names:
        model = load_model(model_name)
        (q,) = known_queries(model, 1, seed)
        n = model.cfg.n_layers
        chosen = tuple(sorted({round(i * (n - 1) / max(layers - 1, 1)) for i in range(layers)}))

        def rel(a, b):
            return float((a - b).abs().max() / b.abs().max())

        for baseline in ("zero", "eos"):
            cfg = IGConfig(steps=20, baseline=baseline, layers=chosen)
            out = {}
            for dtype in (torch.float32, torch.float64):
                model.to(dtype)
                model.cfg.dtype = dtype  # norms cast to cfg.dtype
                out[dtype] = [f(model, q, config=cfg).per_token.double()
                              for f in (integrated_gradients, integrated_gradients_plain)]
            (f32, p32), (f64, p64) = out[torch.float32], out[torch.float64]
            model.to(torch.float32)
            model.cfg.dtype = torch.float32
            print(f"| {model_name} | {baseline} | {chosen} | {rel(f64, p64):.1e} | "
                  f"{rel(f32, p64):.1e} | {rel(p32, p64):.1e} | {rel(f32, p32):.1e} |", flush=True)
        del model


def behaviour(model, queries, seed: int) -> None:
    L, d = model.cfg.n_layers, model.cfg.d_mlp
    k = round(0.001 * L * d)
    print(f"\n### Zeroing the top 0.1 % ({k}) neurons vs {k} random neurons, {len(queries)} known "
          "facts\n")
    print("| method | mean P before | mean drop (top) | mean drop (random) | ratio | facts where "
          "top > 2x random | s / query |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    p0 = answer_probs(model, queries).tolist()
    for name, cfg in BEHAVIOUR_METHODS.items():
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        scores = locate(model, queries, method=_method(name), config=cfg, progress=False)
        dt = (time.perf_counter() - t0) / len(queries)
        top_d, rnd_d, wins = [], [], 0
        for q, s, base in zip(queries, scores, p0):
            top = top_fraction(s, 0.001)
            dt_ = base - float(answer_probs(model, [q], fwd_hooks=hooks.scale_neurons(top, 0.0))[0])
            rd = [base - float(answer_probs(model, [q], fwd_hooks=hooks.scale_neurons(
                random_like(top, L, d, generator=gen, exclude=top), 0.0))[0]) for _ in range(3)]
            top_d.append(dt_)
            rnd_d.append(statistics.mean(rd))
            wins += dt_ > 2 * max(statistics.mean(rd), 0.0)
        mt, mr = statistics.mean(top_d), statistics.mean(rnd_d)
        print(f"| {name} | {statistics.mean(p0):.3f} | {mt:.3f} | {mr:.4f} | "
              f"{mt / mr if mr > 0 else float('inf'):.0f}x | {wins}/{len(queries)} | {dt:.1f} |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--queries", type=int, default=3, help="queries for the speed table")
    ap.add_argument("--plain-queries", type=int, default=1)
    ap.add_argument("--behaviour", type=int, default=0, help="facts for the ablation table")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--ig-floor", action="store_true",
                    help="only the IG vs FLOP-floor table, for every --floor-models model")
    ap.add_argument("--ig-profile", action="store_true",
                    help="only where fast IG's time goes (torch.profiler), every --floor-models")
    ap.add_argument("--ig-accuracy", type=int, default=0, metavar="LAYERS",
                    help="only fast vs plain IG in float32 against float64, on LAYERS layers of "
                         "every --floor-models model")
    ap.add_argument("--floor-models", default="smollm2-135m,gemma-3-270m")
    ap.add_argument("--floor-queries", type=int, default=3)
    ap.add_argument("--floor-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ig_floor or args.ig_profile or args.ig_accuracy:
        print(f"cpu count {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
        names = [m.strip() for m in args.floor_models.split(",") if m.strip()]
        if args.ig_floor:
            ig_floor(names, args.floor_queries, args.seed, args.floor_repeats)
        if args.ig_profile:
            ig_profile(names, args.seed)
        if args.ig_accuracy:
            ig_accuracy(names, args.seed, args.ig_accuracy)
        return
    model = load_model(args.model)
    info = model.kn_info
    print(f"model {info.name}: {info.n_layers} layers x {info.d_mlp} neurons; cpu count "
          f"{os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
    queries = known_queries(model, max(args.queries, args.behaviour), args.seed)
    if not args.skip_speed:
        speed(model, queries[: args.queries], args.plain_queries)
    if args.behaviour:
        behaviour(model, queries[: args.behaviour], args.seed)


if __name__ == "__main__":
    main()

"""Sweep throughput and overhead per backend, the store's write rate, and IG's FLOP count.

    python benchmarks/sweep.py                          # tiny-model items, every backend, 1 and 2 workers
    python benchmarks/sweep.py --real                   # + SmolLM2 contribution items (0.3-0.5 s each)
    python benchmarks/sweep.py --measure-ig             # + SmolLM2 IG timing vs its FLOP count

Prints (markdown):

1. for each backend (inprocess, pool, ray) and 1 and 2 workers: start-up (processes / actors
   started and the model loaded), items/s once started, the items' own compute time (measured
   inside the workers) and the **overhead per item** = wall x workers / items - compute per item:
   the time a worker slot spends per item on anything but the item (hand-over, pickling, the
   driver's claim and write, waiting for the driver);
2. the driver's write rate into the store (atomic file + fsync + index row + claim release) for
   results of the size of a tiny model's, SmolLM2-135M's and a 7B model's score map;
3. the FLOP count of fast integrated gradients per single-token query (m = 20; one position
   recomputed from each layer on, forward + input-gradient backward) for SmolLM2-135M and
   LLaMA-2-7B, and with ``--measure-ig`` the measured seconds per query on this machine (the
   effective FLOP/s that validates the count).

Every number depends on the machine and its load: the cpu count and load average are printed.
The README's worked estimate of ParaRel-scale IG on a 7B model uses these figures.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from kn_lens.datasets import builtin_dataset
from kn_lens.locate import IGConfig
from kn_lens.sweep import (ModelSpec, ResultStore, SweepConfig, fact_queries,
                           locate_items, sweep)

# (n_layers, d_model, d_mlp, n_heads, n_kv_heads, d_head, d_vocab, gated)
DIMS = {
    "smollm2-135m": (30, 576, 1536, 9, 3, 64, 49152, True),  # its config.json
    "llama-2-7b": (32, 4096, 11008, 32, 32, 128, 32000, True),  # Touvron et al. 2023, Table 1
}


def queries_for(spec: ModelSpec, n: int):
    ds = builtin_dataset()
    facts = [f for f in ds.facts if len(ds.relation_of(f).templates) >= 6]
    out = fact_queries(spec, ds, facts[: n // 6 + 1])
    return out[:n]


def run_backends(spec: ModelSpec, method: str, n: int, backends, workers, config=None,
                 store_dtype: str = "float32") -> list[dict]:
    items = locate_items(spec, queries_for(spec, n), method, config, store_dtype=store_dtype)
    rows = []
    started_ray = False
    for backend in backends:
        for w in workers:
            if backend == "inprocess" and w != 1:
                continue
            if backend == "ray":
                import ray

                if not ray.is_initialized():
                    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                    t0 = time.perf_counter()
                    ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
                    print(f"(local Ray started in {time.perf_counter() - t0:.1f} s, "
                          f"{max(workers)} CPUs)", flush=True)
                    started_ray = True
            with tempfile.TemporaryDirectory(prefix="kn-sweep-bench-") as tmp:
                cfg = SweepConfig(backend=backend, workers=w, threads=1)
                r = sweep(items, tmp, config=cfg, progress=False)
            assert r.complete and r.computed == len(items), r.summary()
            wall = r.seconds - r.startup_seconds
            compute = r.compute_seconds / r.computed
            rows.append({"backend": backend, "workers": w, "items": r.computed,
                         "startup": r.startup_seconds, "items_per_s": r.computed / wall,
                         "compute_ms": 1e3 * compute,
                         "overhead_ms": 1e3 * (wall * w / r.computed - compute)})
            print(f"  {backend} x{w}: {rows[-1]['items_per_s']:.1f} items/s", flush=True)
    if started_ray:
        import ray

        ray.shutdown()
    return rows


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    print("| backend | workers | items | start-up (s) | items/s | compute / item (ms) | "
          "overhead / item (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['workers']} | {r['items']} | {r['startup']:.1f} | "
              f"{r['items_per_s']:.1f} | {r['compute_ms']:.1f} | {r['overhead_ms']:.1f} |")


def store_write_rate(n: int, fsync: bool = True) -> list[tuple[str, int, float]]:
    """Puts per second of score maps of three sizes (claim + atomic write + index row)."""
    from kn_lens.facts import Fact, Query
    from kn_lens.models import ModelInfo
    from kn_lens.neurons import NeuronScores
    from kn_lens.sweep import WorkItem

    spec = ModelSpec(name="tiny-gpt2")
    fact = Fact("X", "r", "Y")
    out = []
    for label, (layers, d_mlp), dtype in [("tiny (3 x 64, fp32)", (3, 64), torch.float32),
                                          ("SmolLM2-135M (30 x 1536, fp32)", (30, 1536), torch.float32),
                                          ("7B (32 x 11008, fp32)", (32, 11008), torch.float32),
                                          ("7B (32 x 11008, fp16)", (32, 11008), torch.float16)]:
        info = ModelInfo("bench", "random", "float32", False, False, False, True, layers, 8,
                         d_mlp, False, "LN")
        with tempfile.TemporaryDirectory(prefix="kn-sweep-bench-") as tmp, \
                ResultStore(tmp, fsync=fsync) as st:
            t = 0.0
            size = 0
            for i in range(n):
                q = Query(fact, "{} is", f"X{i} is", " Y", (1, 2), (3,), 0)
                item = WorkItem("test.probe", "probe", _probe(i), spec)
                res = NeuronScores(torch.randn(layers, d_mlp).to(dtype).float(), "bench", q, None,
                                   info)
                if dtype == torch.float16:
                    res = {"scores": res.scores.half()}
                t0 = time.perf_counter()
                st.claim([item.key])
                st.put(item, res, seconds=0.0, worker="bench")
                t += time.perf_counter() - t0
                size = st.record(item).bytes
        out.append((label, size, n / t))
    return out


def _probe(i):
    from kn_lens import testing

    testing.register_test_kinds()
    return testing.ProbeJob(value=i)


def ig_flops(dims, prompt_len: int = 12, steps: int = 20, chunk: int = 200
             ) -> tuple[float, float, float]:
    """(ideal, as implemented, plain per-layer IG) FLOPs of fast IG for one single-token query.

    Ideal: for each layer l, ``steps`` rows recompute the answer position from layer l's MLP
    output on (blocks l+1..L-1, attention over the cached prompt, the unembedding), forward and
    an input-gradient backward of the same cost. As implemented: rows are batched ``chunk`` at a
    time and every row of a batch runs the forward from the batch's lowest layer (its own layer
    then overwrites the residual), so the forward does up to chunk/steps - 1 extra blocks per
    row; the backward stops at each row's own layer. Plain (``ig_plain``, the textbook loop):
    for each layer, ``steps`` full forwards over every prompt position and layer (logits at
    every position) and a backward over every position down to that layer."""
    L, d, f, h, kv, dh, V, gated = dims
    per_block = 2 * (d * h * dh + 2 * d * kv * dh + h * dh * d + (3 if gated else 2) * d * f) \
        + 4 * h * dh * prompt_len
    w_out, unembed = 2 * f * d, 2 * d * V
    ideal_fwd = sum(steps * (w_out + (L - 1 - l) * per_block + unembed) for l in range(L))
    impl_fwd = 0.0
    per_call = max(1, chunk // steps)
    for start in range(0, L, per_call):
        layers = range(start, min(L, start + per_call))
        impl_fwd += steps * len(layers) * ((L - start) * per_block + unembed)
    p = prompt_len
    plain = sum(steps * p * (L * per_block + unembed) + steps * p * ((L - l) * per_block + unembed)
                for l in range(L))
    return 2 * ideal_fwd, impl_fwd + ideal_fwd, plain


def measure_ig(n: int) -> tuple[float, int]:
    from kn_lens.locate import locate

    spec = ModelSpec(name="smollm2-135m")
    model = spec.load()
    qs = [q for q in queries_for(spec, 4 * n) if q.n_answer == 1][:n]
    locate(model, qs[:1], method="ig", progress=False)  # warm-up
    t0 = time.perf_counter()
    locate(model, qs, method="ig", config=IGConfig(steps=20), progress=False)
    return (time.perf_counter() - t0) / len(qs), len(qs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=240, help="tiny-model items per run")
    ap.add_argument("--backends", nargs="+", default=["inprocess", "pool", "ray"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--real", action="store_true", help="also SmolLM2 contribution items")
    ap.add_argument("--real-items", type=int, default=24)
    ap.add_argument("--writes", type=int, default=100, help="puts per size in the write test")
    ap.add_argument("--measure-ig", type=int, default=0, metavar="N",
                    help="time fast IG on N SmolLM2 queries (torch threads = --threads)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu count {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}; torch threads per "
          f"worker 1; torch {torch.__version__}")

    print("\ntiny-llama contribution items ...", flush=True)
    rows = run_backends(ModelSpec(name="tiny-llama"), "contribution", args.items, args.backends,
                        args.workers)
    print_rows(f"Tiny model (tiny-llama), contribution, {args.items} items", rows)
    if args.real:
        print("\nSmolLM2-135M contribution items ...", flush=True)
        rows = run_backends(ModelSpec(name="smollm2-135m"), "contribution", args.real_items,
                            args.backends, args.workers)
        print_rows(f"SmolLM2-135M, contribution, {args.real_items} items", rows)

    print("\n### The driver's write rate (claim + atomic write + index row)\n")
    print("| result | bytes on disk | writes/s (fsync) | MB/s | writes/s (no fsync) | MB/s |\n"
          "|---|---:|---:|---:|---:|---:|")
    for (label, size, rate), (_, _, rate2) in zip(store_write_rate(args.writes),
                                                  store_write_rate(args.writes, fsync=False)):
        print(f"| {label} | {size:,} | {rate:.0f} | {rate * size / 1e6:.0f} | {rate2:.0f} | "
              f"{rate2 * size / 1e6:.0f} |")

    print("\n### Fast IG FLOPs per single-token query (m = 20, 12-token prompt)\n")
    print("| model | fast IG, ideal (TFLOP) | fast IG, as implemented (TFLOP) | plain IG (TFLOP) |\n"
          "|---|---:|---:|---:|")
    flops = {}
    for name, dims in DIMS.items():
        ideal, impl, plain = ig_flops(dims)
        flops[name] = impl
        print(f"| {name} | {ideal / 1e12:.3f} | {impl / 1e12:.3f} | {plain / 1e12:.2f} |")
    if args.measure_ig:
        secs, n = measure_ig(args.measure_ig)
        print(f"\nSmolLM2-135M fast IG, {n} queries, {args.threads} torch thread(s): "
              f"{secs:.2f} s/query = {flops['smollm2-135m'] / secs / 1e9:.0f} GFLOP/s effective")


if __name__ == "__main__":
    main()

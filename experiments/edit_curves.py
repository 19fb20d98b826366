"""Sequential- and batch-editing curves: how fast each editor forgets or collapses as edits pile
up, and what one edit of K requests costs against K single edits.

Requests: the first ``--n-requests`` (default 100) of the editing benchmark's requests
(``edit_benchmark.py``: same facts, new objects, probe sets and seed; the pool is the benchmark's
200 on SmolLM2, 100 on Gemma-3). Judged on the CounterFact and token-accuracy protocols of
``kn_lens.evaluate.harness`` (generation is left out: it would multiply the cost by ~3) plus dPPL
of every judged edit on the benchmark's reference prose.

- ``--mode sequential``: N edits applied one after another, each computed on the model with all
  earlier edits materialised (``harness.sequential``'s definition); at each checkpoint n
  (``--checkpoints``, default 1, 10, 25, 50, 100) requests 1..n are re-judged under the
  composition of the n edits. Resumable after every edit: the composed edit is saved to
  ``results/cache/edit_curves_<model>_<key>/seq_<method>/step/`` with the step count.
- ``--mode batch``: the requests edited in consecutive batches of K (``--batch-sizes``, default
  1, 10, 100), each request judged under its batch's edit. K = 1 reuses the benchmark's rows of
  the same requests when they exist (its cache or rows archive), else computes them here. Each
  batch's edit is a sweep item (as the benchmark's: stored in ``results/sweeps``, ``--backend
  pool --workers N`` spreads them over processes); sequential editing cannot be split so (each
  edit is made on the model with every earlier one applied) and runs in the script's process.

``--archive-rows`` gzips the rows (and the sequential checkpoints) next to the results; a run on
another machine resumes from that file (the composed edit of an unfinished sequential run is
rebuilt by replaying its edits, which are deterministic for a fixed seed).

    python experiments/edit_curves.py --quick                                  # CI
    python experiments/edit_curves.py --mode sequential --methods rome,memit --threads 1
    python experiments/edit_curves.py --mode batch --methods memit,fine --batch-sizes 1,10,100
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from kn_lens import experiment
from kn_lens.edit.benchmark import (BenchmarkRun, aggregates_to_dict, benchmark_item,
                                    editor_configs, load_benchmark_model, measure_before, resolve,
                                    row_id)
from kn_lens.experiment import append_jsonl, read_jsonl, rounded, run_key

NAME = "edit_curves"
SEQ_METHODS = ("ft_l", "rome", "memit", "kn_update", "fine", "kne", "tnf_da_atp")
BATCH_METHODS = ("ft_l", "rome", "memit", "fine", "kne", "tnf_da_atp")
PROTOCOLS = ("counterfact", "tokens")
PLOT = (("counterfact", "ES"), ("counterfact", "PS"), ("counterfact", "NS"),
        ("tokens", "locality"), ("tokens", "rewrite_acc"), ("dppl", "dppl"))


def _pool(args) -> int:
    if args.quick:
        return args.n_requests
    return 100 if args.model.startswith("gemma") else 200


def _bench(args) -> BenchmarkRun:
    """The benchmark run whose requests these are (same pool, seed and filter)."""
    return BenchmarkRun(results_dir=args.results_dir, model=args.model, quick=args.quick,
                        n_requests=_pool(args), seed=args.seed,
                        max_new_tokens=8 if args.quick else 32,
                        no_known_filter=args.no_known_filter)


def _key(args) -> str:
    cfg = {k: getattr(args, k) for k in ("n_requests", "seed", "quick", "no_known_filter")}
    cfg["pool"] = _pool(args)
    return run_key(**cfg)


def cache_dir(args) -> Path:
    return experiment.cache_folder(args, NAME, _key(args))


def _ints(text: str, what: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--{what} must be a comma list of integers, got {text!r}") from None
    if not out or out[0] < 1:
        raise SystemExit(f"--{what} must be positive integers, got {text!r}")
    return out


# --------------------------------------------------------------------------- compute


def compute(args) -> None:
    import torch

    from kn_lens.datasets import builtin_dataset
    from kn_lens.evaluate.harness import HarnessConfig
    from kn_lens.evaluate.probes import probe_sets
    from kn_lens.models import model_info
    from kn_lens.sweep import ReferenceSpec
    from kn_lens.sweep.kinds import prepared_reference

    started = time.time()
    configs = editor_configs(quick=args.quick)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:  # a bad name fails before any model work
        resolve(m, configs)
    experiment.set_threads(args)
    model = load_benchmark_model(args.model, args.seed, device=args.device, dtype=args.dtype)
    pool = _bench(args).requests(model, builtin_dataset())
    if args.n_requests > len(pool):
        raise SystemExit(f"--n-requests {args.n_requests} > the benchmark's {len(pool)} requests")
    requests = pool[:args.n_requests]
    hcfg = HarnessConfig(protocols=PROTOCOLS, seed=args.seed,
                         n_bootstrap=200 if args.quick else 1000)
    cache = cache_dir(args)
    print(f"{args.mode}: {len(requests)} requests; state in {cache}")
    _seed_from_archive(args, cache)
    pss = probe_sets(model, requests, n_prefix_probes=hcfg.n_prefix_probes, seed=args.seed)
    before = measure_before(model, pss, hcfg, cache)
    n_slices, slice_len = (2, 64) if args.quick else (8, 128)
    reference = ReferenceSpec(n_slices=n_slices, slice_len=slice_len, seed=args.seed)
    ctx = dict(model=model, requests=requests, pss=pss, before=before, hcfg=hcfg,
               reference=reference, configs=configs, cache=cache)
    if args.mode == "sequential":  # each edit made on the model with every earlier one applied:
        # inherently one after another, so not sweep items (the state is saved after each edit)
        cps = [c for c in _ints(args.checkpoints, "checkpoints") if c <= len(requests)]
        if len(requests) not in cps:
            cps.append(len(requests))
        ctx["reference"] = prepared_reference(model, reference)  # on the unedited model
        for m in methods:
            _sequential(args, m, cps, **ctx)
    else:  # every batch's edit is independent: sweep items (any executor), one sweep for all
        jobs, labels = [], {}
        for m in methods:
            for k in _ints(args.batch_sizes, "batch-sizes"):
                jobs += _batch(args, m, min(k, len(requests)), labels=labels, **ctx)

        def describe(item, rows: list[dict]) -> str:
            judged = [r["row"] for r in rows]
            es, ns = _mean(judged, "counterfact", "ES"), _mean(judged, "counterfact", "NS")
            return (f"  {labels[item.key]} {judged[0]['edit_index']}: {rows[0]['seconds']:.1f} s,"
                    f" ES {es:.2f} NS {ns:.2f} dPPL {rows[0]['dppl']:.3g}")
        experiment.sweep_rows(args, jobs, model, id_of=row_id, describe=describe)
    _save(args, cache, requests, hcfg, model, configs, started, model_info(model))


def _judge(model, e, pss, before, hcfg, reference, edit_index):
    from kn_lens.evaluate.harness import edit_dppl, judge

    rows = judge(model, e, pss, before, config=hcfg, edit_index=edit_index)
    return [r.to_dict() for r in rows], edit_dppl(model, e, reference)


def _sequential(args, label, cps, *, model, requests, pss, before, hcfg, reference, configs,
                cache) -> None:
    from kn_lens.edit import Edit, compose, edit
    from kn_lens.models import model_info

    method, config = resolve(label, configs)
    folder = cache / f"seq_{label}"
    folder.mkdir(exist_ok=True)
    cp_file = folder / "checkpoints.jsonl"
    done = read_jsonl(cp_file, _checkpoint_n)
    state_dir = folder / "step"
    if (state_dir / "state.json").exists():
        state = json.loads((state_dir / "state.json").read_text())
        total = Edit.load(state_dir / "edit")
    else:
        state = {"k": 0, "seconds": [], "n_params": []}
        total = Edit((), model=model_info(model))
    k = state["k"]
    if all(c in done for c in cps):  # (also from the archive alone: nothing to replay)
        print(f"sequential {label}: every checkpoint done ({max(cps)} edits)")
        return
    if k == 0 and done:  # checkpoints from the archive but no saved edit: replay the edits
        print(f"sequential {label}: replaying edits up to checkpoint {max(done)}")
    print(f"sequential {label}: {k} edits done, {len(requests) - k} to go")
    for i in range(k, len(requests)):
        t0 = time.perf_counter()
        with total.applied(model):  # each edit is computed on the model with every earlier one
            e = edit(model, [requests[i]], method=method, config=config, seed=args.seed)
        secs = time.perf_counter() - t0
        total = compose([total, e], description=f"{label}: {i + 1} sequential edits")
        total = Edit(total.deltas, total.description, total.method, total.model,
                     {"n_edits": i + 1})  # not the 100 configs of the parts
        state["seconds"].append(secs)
        state["n_params"].append(e.n_params)
        n = i + 1
        if n in cps and n not in done:
            t1 = time.perf_counter()
            rows, dppl = _judge(model, total, pss[:n], before[:n], hcfg, reference, i)
            item = {"n": n, "dppl": dppl, "composite_params": total.n_params,
                    "seconds_per_edit": sum(state["seconds"]) / n, "rows": rows}
            append_jsonl(cp_file, [item])
            done[n] = item
            print(f"  {label} n={n}: ES {_mean(rows, 'counterfact', 'ES'):.2f} NS "
                  f"{_mean(rows, 'counterfact', 'NS'):.2f} locality "
                  f"{_mean(rows, 'tokens', 'locality'):.2f} dPPL {dppl:.3g} "
                  f"(judged in {time.perf_counter() - t1:.0f} s)", flush=True)
        state["k"] = n
        _save_state(state_dir, total, state)
        if n % 10 == 0:
            print(f"  {label}: {n} edits, {secs:.1f} s for the last", flush=True)


def _save_state(state_dir: Path, total, state: dict) -> None:
    """The composed edit and the step count, replaced as one directory (never half-written)."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    total.save(tmp / "edit")
    (tmp / "state.json").write_text(json.dumps(state))
    old = state_dir.with_name(state_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        state_dir.rename(old)
    tmp.rename(state_dir)
    shutil.rmtree(old, ignore_errors=True)


def _mean(rows, proto, metric) -> float:
    vals = [r["after"][proto][metric] for r in rows
            if r["after"].get(proto, {}).get(metric) is not None
            and r["after"][proto][metric] == r["after"][proto][metric]]
    return sum(vals) / len(vals) if vals else float("nan")


def _bench_rows(args, label: str) -> dict[int, dict]:
    """The benchmark's batch-size-1 rows of these requests (its cache, seeded from its archive)."""
    bench = _bench(args)
    bench.restore()
    rows = bench.rows(label)
    return {i: rows[i] for i in range(args.n_requests) if i in rows}


def _batch(args, label, k, *, model, requests, pss, before, hcfg, reference, configs,
           cache, labels: dict) -> list:
    """The ``benchmark_edit`` items (with their row file) of the batches of K requests whose
    rows are missing; K = 1 first takes the benchmark's rows of these requests."""
    method, config = resolve(label, configs)
    path = cache / f"batch_{label}@{k}.jsonl"
    done = read_jsonl(path, row_id)
    if k == 1 and len(done) < len(requests):
        reuse = {i: d for i, d in _bench_rows(args, label).items() if i not in done}
        if reuse:  # the benchmark's rows, restricted to this run's protocols
            append_jsonl(path, [{"row": {**d["row"], "after": {p: d["row"]["after"][p] for p in PROTOCOLS},
                                    "before": {p: d["row"]["before"][p] for p in PROTOCOLS}},
                            "seconds": d["seconds"], "n_params": d["n_params"],
                            "dppl": d["row"]["after"].get("generation", {}).get("dppl"),
                            "n_requests_in_edit": 1, "refused": d.get("refused"),
                            "from": "edit_benchmark"} for d in reuse.values()])
            done.update(read_jsonl(path, row_id))
            print(f"batch {label}@1: {len(reuse)} rows from the edit benchmark")
    todo = [i for i in range(len(requests)) if i not in done]
    print(f"batch {label}@{k}: {len(done)} done, {len(todo)} to go")
    # whole batches only: a batch is the same K requests whether or not the run was interrupted
    jobs = []
    for s in sorted({(i // k) * k for i in todo}):
        idx = list(range(s, min(s + k, len(requests))))
        item = benchmark_item(model, [requests[i] for i in idx], [pss[i] for i in idx],
                              [before[i] for i in idx], method=method, config=config,
                              harness=hcfg, reference=reference, seed=args.seed)
        labels.setdefault(item.key, f"{label}@{k}")
        jobs.append((item, path))
    return jobs


# --------------------------------------------------------------------------- results


def _aggs(rows, hcfg) -> dict:
    from kn_lens.evaluate.harness import aggregate

    return aggregates_to_dict(aggregate([r["after"] for r in rows], hcfg))


def _save(args, cache, requests, hcfg, model, configs, started, info) -> None:
    import statistics

    from kn_lens.evaluate.harness import aggregate

    n_total = sum(p.numel() for p in model.parameters())
    seq, batch = {}, {}
    for folder in sorted(cache.glob("seq_*")):
        if not folder.is_dir():
            continue
        cps = read_jsonl(folder / "checkpoints.jsonl", _checkpoint_n)
        if not cps:
            continue
        seq[folder.name[4:]] = {str(n): {
            "after": _aggs(d["rows"], hcfg), "dppl": rounded(d["dppl"]),
            "composite_params": d["composite_params"],
            "share_changed": d["composite_params"] / n_total,
            "seconds_per_edit": rounded(d["seconds_per_edit"], 2)} for n, d in sorted(cps.items())}
    for path in sorted(cache.glob("batch_*.jsonl")):
        label, _, k = path.stem[6:].rpartition("@")
        items = read_jsonl(path, row_id)
        items = [items[i] for i in range(len(requests)) if i in items]
        if not items:
            continue
        per_edit = {}
        for it in items:
            per_edit.setdefault(it["row"]["edit_index"], it)
        d = [it["dppl"] for it in per_edit.values() if it.get("dppl") is not None]
        batch.setdefault(label, {})[k] = {
            "complete": len(items) >= len(requests), "n_requests_done": len(items),
            "n_edits": len(per_edit), "n_refused": sum(bool(it.get("refused")) for it in items),
            "after": _aggs([it["row"] for it in items], hcfg),
            "before": {p: {m: {"mean": rounded(a.mean)} for m, a in ms.items()}
                       for p, ms in aggregate([it["row"]["before"] for it in items], hcfg).items()},
            "dppl_median": rounded(statistics.median(d)) if d else None,
            "seconds_per_edit": rounded(statistics.median(it["seconds"] for it in per_edit.values()), 2),
            "seconds_per_request": rounded(sum(it["seconds"] for it in per_edit.values()) / len(items), 3),
            "params_changed": sum(it["n_params"] for it in per_edit.values()) / len(per_edit),
            "from_benchmark": sum(it.get("from") == "edit_benchmark" for it in items)}
    old = {}
    path = experiment.result_path(args, NAME)
    if path.exists():  # the other mode's results are kept
        old = json.loads(path.read_text())["results"]
    payload = {"requests": [{"case_id": r.case_id, "subject": r.fact.subject, "old": r.fact.object,
                             "new": r.new_object} for r in requests],
               "sequential": {**old.get("sequential", {}), **seq},
               "batch": {**old.get("batch", {}), **batch}}
    config = {"editors": configs, "harness": hcfg, "n_requests": len(requests),
              "pool": _pool(args)}
    experiment.save_results(args, NAME, payload, config, info, started)
    if args.archive_rows:
        _archive(args, cache)


def _archive_path(args) -> Path:
    return experiment.result_path(args, NAME).with_suffix(".rows.jsonl.gz")


def _archive(args, cache: Path) -> None:
    _seed_from_archive(args, cache)  # archived rows this cache lacks are kept
    path = _archive_path(args)

    def items():
        for p in sorted(cache.glob("batch_*.jsonl")):
            for d in read_jsonl(p, row_id).values():
                yield {"file": p.name, **d}
        for p in sorted(cache.glob("seq_*/checkpoints.jsonl")):
            for d in read_jsonl(p, _checkpoint_n).values():
                yield {"file": f"{p.parent.name}/{p.name}", **d}
    n = experiment.write_archive(path, _key(args), items())
    print(f"{n} rows / checkpoints archived in {path}")


def _seed_from_archive(args, cache: Path) -> None:
    """Rows and checkpoints of this run in its archive that the cache lacks are restored."""
    experiment.restore_from_archive(_archive_path(args), _key(args), "file", cache,
                                    file_of=lambda name: name, id_of=_id_of)


def _checkpoint_n(d: dict) -> int:
    return d["n"]


def _id_of(file: str):
    """How the rows of a state file are identified: checkpoints by n, batch rows by request."""
    return _checkpoint_n if file.startswith("seq_") else row_id


# --------------------------------------------------------------------------- report


def report(args) -> None:
    from kn_lens.viz import plot_curves

    r = experiment.load_results(args, NAME)["results"]
    figs = []
    if r["sequential"]:
        print(f"\nsequential editing ({len(r['requests'])} requests; mean over requests 1..n "
              "after n edits):\n")
        print("| method | n | ES | PS | NS | locality | rewrite_acc | dPPL | weights changed |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        curves: dict[str, dict[str, list]] = {}
        for m, cps in r["sequential"].items():
            for n, d in cps.items():
                a = d["after"]
                vals = [a[p][x]["mean"] if p != "dppl" else d["dppl"] for p, x in PLOT]
                print(f"| {m} | {n} | " + " | ".join(_f(v) for v in vals[:5]) +
                      f" | {_f(vals[5])} | {d['composite_params']:.3g} |")
                for (p, x), v in zip(PLOT, vals):
                    lo = hi = None
                    if p != "dppl":
                        lo, hi = a[p][x]["lo"], a[p][x]["hi"]
                    curves.setdefault(x, {}).setdefault(m, []).append((int(n), v, lo, hi))
        figs.append(plot_curves(curves, experiment.figure_path(args, f"{NAME}_sequential"),
                                xlabel="edits applied (n)", log_x=True,
                                title=f"sequential editing ({args.model})", symlog_y=("dppl",)))
    if r["batch"]:
        print(f"\nbatch editing ({len(r['requests'])} requests, each judged under its batch's "
              "edit):\n")
        print("| method | batch | requests | ES | PS | NS | locality | rewrite_acc | dPPL median | "
              "s/request |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        curves = {}
        for m, ks in r["batch"].items():
            for k, d in sorted(ks.items(), key=lambda kv: int(kv[0])):
                a = d["after"]
                vals = [a[p][x]["mean"] for p, x in PLOT[:5]]
                print(f"| {m} | {k} | {d['n_requests_done']} | " + " | ".join(_f(v) for v in vals)
                      + f" | {_f(d['dppl_median'])} | {d['seconds_per_request']:.2f} |")
                for (p, x), v in zip(PLOT[:5], vals):
                    curves.setdefault(x, {}).setdefault(m, []).append(
                        (int(k), v, a[p][x]["lo"], a[p][x]["hi"]))
                curves.setdefault("dppl", {}).setdefault(m, []).append(
                    (int(k), d["dppl_median"], None, None))
        figs.append(plot_curves(curves, experiment.figure_path(args, f"{NAME}_batch"),
                                xlabel="requests per edit (K)", log_x=True,
                                title=f"batch editing ({args.model})", symlog_y=("dppl",)))
    print("\nfigures " + " ".join(str(f) for f in figs))


def _f(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3g}"


def main() -> None:
    ap = experiment.parser(__doc__.splitlines()[0])
    experiment.add_fact_args(ap)
    experiment.add_sweep_args(ap)  # batch mode's edits
    ap.add_argument("--mode", choices=("sequential", "batch"), default="sequential")
    ap.add_argument("--n-requests", type=int, default=None, help="default 100 (quick: 4)")
    ap.add_argument("--methods", default=None,
                    help=f"editors or benchmark variants (default: sequential {','.join(SEQ_METHODS)}; "
                    f"batch {','.join(BATCH_METHODS)})")
    ap.add_argument("--checkpoints", default="1,10,25,50,100")
    ap.add_argument("--batch-sizes", default="1,10,100")
    ap.add_argument("--archive-only", action="store_true",
                    help="only gzip the rows computed so far (e.g. of a stopped run) and exit")
    ap.add_argument("--archive-rows", action="store_true",
                    help="gzip rows and checkpoints next to the results (a later run resumes)")
    args = ap.parse_args()
    if args.n_requests is None:
        args.n_requests = args.n_facts or (4 if args.quick else 100)
    if args.n_requests < 1:
        raise SystemExit("--n-requests must be >= 1")
    if args.methods is None:
        args.methods = ",".join(SEQ_METHODS if args.mode == "sequential" else BATCH_METHODS)
    if args.archive_only:  # no model work: the rows already in the cache
        _archive(args, cache_dir(args))
        return
    experiment.run(args, compute, report)


if __name__ == "__main__":
    main()

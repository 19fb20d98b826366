"""Sweep files: a sweep described in one JSON file, for ``kn-lens sweep SPEC``.

::

    {
      "out": "sweeps/ig-smollm2",                 # the store folder (relative to this file)
      "model": "smollm2-135m",                    # or {"name": "tiny-gpt2", "seed": 0, ...},
                                                  # or "models": [...] (every item per model)
      "facts": {
        "dataset": "builtin",                     # or {"relations_file": "my_relations.json"}
                                                  #    or {"pararel": "path/to/pararel"}
        "relations": ["country_capital"],         # optional: these relations only
        "limit_per_relation": 50,                 # optional: the first N facts of each relation
        "known": "results/known_facts_smollm2-135m.json",  # optional: facts a model knows
        "max_answer_tokens": 1,                   # optional: single-token answers (ParaRel / QL)
        "sample": 200, "seed": 0                  # optional: a seeded sample of the facts
      },
      "templates": "all",                         # or template indices, e.g. [0, 1]
      "locate": [{"method": "ig", "config": {"steps": 20}, "store_dtype": "float16"},
                 {"method": "contribution"}],
      "analysis": [{"method": "synapses", "config": {"alpha": 0.3}}],
      "edit": [{"method": "rome", "config": {}, "seed": 0,
                "harness": {"protocols": ["counterfact", "tokens"], "n_bootstrap": 0},
                "reference": {"n_slices": 8, "slice_len": 128},   # optional: dPPL
                "requests": {"seed": 0, "n_neighbours": 10}, "keep_edit": true}],
      "sweep": {"backend": "inprocess", "workers": 1, "threads": null, "device": "cpu",
                "imports": [], "max_retries": 2}      # any SweepConfig field
    }

Every unknown key, bad method or bad config field is reported with its place in the file
before any model work; nothing is written then.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kn_lens.errors import ConfigError, DataFileError, KnLensError

__all__ = ["SweepPlan", "load_sweep_file", "plan_sweep"]

_TOP = {"out", "model", "models", "facts", "templates", "locate", "analysis", "edit", "sweep",
        "description"}
_FACTS = {"dataset", "relations", "limit_per_relation", "known", "max_answer_tokens", "sample",
          "seed"}
_LOCATE = {"method", "config", "store_dtype"}
_ANALYSIS = {"method", "config"}
_EDIT = {"method", "config", "seed", "harness", "reference", "requests", "keep_edit"}


@dataclass(frozen=True)
class SweepPlan:
    """A sweep file read and expanded: its items, the sweep settings and the store folder."""

    items: tuple
    config: Any  # SweepConfig
    out: Path
    source: Path | None = None
    counts: dict = dataclasses.field(default_factory=dict)  # (kind/method) -> items

    def describe(self) -> str:
        parts = ", ".join(f"{k}: {n}" for k, n in self.counts.items())
        return f"{len(self.items)} items ({parts}) -> {self.out}"


def _check_keys(d: Any, allowed: set, where: str) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    bad = sorted(set(d) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; allowed: {sorted(allowed)}")
    return d


def _make_config(cls, raw: Any, where: str):
    if cls is None:
        if raw not in (None, {}):
            raise ConfigError(f"{where}: this method takes no config")
        return None
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}.config must be an object of {cls.__name__} fields")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    bad = sorted(set(raw) - names)
    if bad:
        raise ConfigError(f"{where}.config: {cls.__name__} has no field(s) {bad}; fields: "
                          f"{sorted(names)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except KnLensError as e:
        raise ConfigError(f"{where}.config: {e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}.config: {type(e).__name__}: {e}") from e


def _dataset(raw: Any, base: Path, where: str):
    from kn_lens.datasets import builtin_dataset, load_pararel, load_relations_file

    if raw in (None, "builtin"):
        return builtin_dataset()
    if isinstance(raw, dict) and len(raw) == 1:
        (k, v), = raw.items()
        path = (base / str(v)).expanduser()
        if k == "relations_file":
            return load_relations_file(path)
        if k == "pararel":
            return load_pararel(path)
    raise ConfigError(f'{where} must be "builtin", {{"relations_file": PATH}} or '
                      f'{{"pararel": PATH}}, got {raw!r}')


def _facts(raw: dict, base: Path, view) -> tuple[Any, list]:
    from kn_lens.datasets.known import KnownFacts
    from kn_lens.facts import make_query

    _check_keys(raw, _FACTS, "facts")
    ds = _dataset(raw.get("dataset"), base, "facts.dataset")
    if raw.get("relations") is not None or raw.get("limit_per_relation") is not None:
        try:
            ds = ds.filter(relations=raw.get("relations"),
                           limit_per_relation=raw.get("limit_per_relation"))
        except KnLensError as e:
            raise ConfigError(f"facts.relations: {e}") from e
    facts = list(ds.facts)
    if raw.get("known"):
        path = (base / str(raw["known"])).expanduser()
        if not path.exists():
            raise DataFileError(f"facts.known: {path} does not exist (python "
                                "experiments/known_facts.py --model M writes it)")
        doc = json.loads(path.read_text())
        res = KnownFacts.from_dict(doc.get("results", doc))
        spec = getattr(view, "kn_spec", None)
        want = None if spec is None else Path(spec.name).name
        if want is not None and res.model.name != want:
            raise ConfigError(f"facts.known: {path} holds the known facts of {res.model.name!r}, "
                              f"not of the sweep's model {want!r}")
        known = set(res.known_facts())
        facts = [f for f in facts if f in known]
    mat = raw.get("max_answer_tokens")
    if mat:
        facts = [f for f in facts
                 if make_query(view, f, ds.relation_of(f).templates[0]).n_answer <= int(mat)]
    if raw.get("sample") is not None:
        rng = random.Random(int(raw.get("seed", 0)))
        facts = rng.sample(facts, min(int(raw["sample"]), len(facts)))
        facts.sort(key=lambda f: (list(ds.relations).index(f.relation), f.subject))
    if not facts:
        raise ConfigError("facts: the filters leave no fact")
    return ds, facts


def load_sweep_file(path: str | Path, *, out: str | Path | None = None, **overrides) -> SweepPlan:
    """Read a sweep file (see the module doc) into a :class:`SweepPlan`. ``out`` and
    ``overrides`` (SweepConfig fields, e.g. from the command line) replace the file's."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"sweep file {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                            f"{e.msg})") from e
    return plan_sweep(doc, base=path.parent, out=out, source=path, **overrides)


def plan_sweep(doc: dict, *, base: str | Path = ".", out: str | Path | None = None,
               source: Path | None = None, **overrides) -> SweepPlan:
    """A sweep file's content (a dict) -> :class:`SweepPlan` (paths relative to ``base``)."""
    from kn_lens.datasets import build_edit_requests
    from kn_lens.evaluate.harness import HarnessConfig
    from kn_lens.sweep.items import (ReferenceSpec, WorkItem, analysis_items, edit_items,
                                     fact_queries, get_kind, locate_items)
    from kn_lens.sweep.modelspec import ModelSpec
    from kn_lens.sweep.run import SweepConfig

    base = Path(base)
    _check_keys(doc, _TOP, "the sweep file")
    if "model" in doc and "models" in doc:
        raise ConfigError('give "model" or "models", not both')
    models = doc.get("models", [doc["model"]] if "model" in doc else None)
    if not models or not isinstance(models, list):
        raise ConfigError('the sweep file needs "model" (a name or an object) or "models" (a list)')
    specs = [ModelSpec.coerce(m) for m in models]
    target = out if out is not None else doc.get("out")
    if not target:
        raise ConfigError('the sweep file needs "out" (the store folder), or pass --out')
    target = Path(target) if out is not None else Path(os.path.normpath(base / str(target)))
    if not any(doc.get(k) for k in ("locate", "analysis", "edit")):
        raise ConfigError('the sweep file asks for nothing: give "locate", "analysis" and/or "edit"')
    sweep_raw = dict(_check_keys(doc.get("sweep", {}), {f.name for f in dataclasses.fields(SweepConfig)},
                                 "sweep"))
    sweep_raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = SweepConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in sweep_raw.items()})
    except TypeError as e:
        raise ConfigError(f"sweep: {e}") from e
    templates = doc.get("templates", "all")
    if templates != "all" and not (isinstance(templates, list)
                                   and all(isinstance(t, int) and t >= 0 for t in templates)):
        raise ConfigError(f'"templates" must be "all" or a list of template indices, got {templates!r}')

    # methods and configs first: every mistake before any model or data work
    loc = []
    for i, e in enumerate(doc.get("locate") or []):
        where = f"locate[{i}]"
        _check_keys(e, _LOCATE, where)
        kind = get_kind("locate")
        m = e.get("method")
        if m not in kind.methods():
            raise ConfigError(f"{where}: unknown locator {m!r}; choose one of {kind.methods()}")
        loc.append((m, _make_config(kind.config_class(m), e.get("config"), where),
                    e.get("store_dtype", "float32")))
    ana = []
    for i, e in enumerate(doc.get("analysis") or []):
        where = f"analysis[{i}]"
        _check_keys(e, _ANALYSIS, where)
        kind = get_kind("analysis")
        m = e.get("method")
        if m not in kind.methods():
            raise ConfigError(f"{where}: unknown analysis {m!r}; choose one of {kind.methods()}")
        ana.append((m, _make_config(kind.config_class(m), e.get("config"), where)))
    eds = []
    for i, e in enumerate(doc.get("edit") or []):
        where = f"edit[{i}]"
        _check_keys(e, _EDIT, where)
        kind = get_kind("edit")
        m = e.get("method")
        if m not in kind.methods():
            raise ConfigError(f"{where}: unknown editor {m!r}; choose one of {kind.methods()}")
        harness = _make_config(HarnessConfig, e.get("harness") or
                               {"protocols": ["counterfact", "tokens"], "n_bootstrap": 0},
                               f"{where}.harness")
        ref = e.get("reference")
        ref = None if ref is None else _make_config(ReferenceSpec, ref, f"{where}.reference")
        req = e.get("requests") or {}
        if not isinstance(req, dict):
            raise ConfigError(f"{where}.requests must be an object of build_edit_requests "
                              "arguments (seed, n_neighbours, ...)")
        seed = e.get("seed", 0)
        if not isinstance(seed, int):
            raise ConfigError(f"{where}.seed must be an integer")
        eds.append((m, _make_config(kind.config_class(m), e.get("config"), where), harness, ref,
                    req, seed, bool(e.get("keep_edit", True))))

    items: list = []
    counts: dict[str, int] = {}
    for spec in specs:
        view = spec.tokenizer_view()
        ds, facts = _facts(doc.get("facts") or {}, base, view)
        queries = fact_queries(view, ds, facts, None if templates == "all" else templates)
        for m, cfg, dt in loc:
            new = locate_items(spec, queries, m, cfg, store_dtype=dt)
            counts[f"locate/{m}"] = counts.get(f"locate/{m}", 0) + len(new)
            items += new
        for m, cfg in ana:
            new = analysis_items(spec, queries, m, cfg)
            counts[f"analysis/{m}"] = counts.get(f"analysis/{m}", 0) + len(new)
            items += new
        for m, cfg, harness, ref, req, seed, keep in eds:
            try:
                requests = build_edit_requests(ds, facts, **{"seed": 0, **req})
            except TypeError as e:
                raise ConfigError(f"edit requests: {e}") from e
            new = edit_items(spec, requests, m, cfg, harness=harness, reference=ref, seed=seed,
                             keep_edit=keep)
            counts[f"edit/{m}"] = counts.get(f"edit/{m}", 0) + len(new)
            items += new
    assert all(isinstance(it, WorkItem) for it in items)
    return SweepPlan(tuple(items), config, target, source, counts)

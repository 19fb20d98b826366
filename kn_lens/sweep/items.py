"""Work items, their keys, and the registry of item kinds.

A :class:`WorkItem` is one unit of a sweep: a model (:class:`ModelSpec`), a kind (``locate``,
``analysis``, ``edit`` or one of your own), a method of that kind with its frozen config, the input
(a :class:`~kn_lens.facts.Query`, an :class:`EditJob`, ...) and a seed where one matters. Its
``key`` is a hash of the canonical JSON of everything that determines its result: the kind and
its version, the method and its version (:func:`kn_lens.locate.method_version`,
:func:`kn_lens.edit.registry.editor_version`), the config with every field spelled out (defaults
included, so a changed default is a new key), the model's identity (:meth:`ModelSpec.identity`),
the input with all its fields (prompt text *and* token ids, answer ids, template) and the seed.

Item kinds form one registry (:func:`register_kind`): a kind names the function a worker calls,
``fn(model, item) -> result``, by import path, so that a worker in another process or on another
machine finds it (kinds and locators you register at run time must live in a module that the
workers import: ``SweepConfig.imports``).
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from kn_lens.errors import ConfigError
from kn_lens.facts import EditRequest, Fact, Query, Relation
from kn_lens.sweep.modelspec import ModelSpec

__all__ = ["ItemKind", "WorkItem", "EditJob", "KnownJob", "ReferenceSpec", "register_kind",
           "get_kind", "available_kinds", "canonical", "register_analysis", "available_analyses",
           "locate_items", "analysis_items", "edit_items", "known_item", "fact_queries", "spec_of",
           "KNModificationJob", "kn_modification_items"]


# --------------------------------------------------------------------------- canonical JSON


def canonical(x: Any) -> Any:
    """``x`` as plain JSON data for a key: dataclasses become ``{"__class__": name, field: ...}``
    (fields with ``compare=False`` are left out: they do not identify the value), tuples lists,
    mappings dicts with string keys, tensors their shape, dtype and a hash of their bytes.
    Anything else raises ``ConfigError``."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if isinstance(x, enum.Enum):
        return canonical(x.value)
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        out = {"__class__": type(x).__qualname__}
        for f in dataclasses.fields(x):
            if f.compare:
                out[f.name] = canonical(getattr(x, f.name))
        return out
    if isinstance(x, Mapping):
        return {str(k): canonical(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [canonical(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted((canonical(v) for v in x), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        return {"__tensor__": hashlib.sha256(t.numpy().tobytes()).hexdigest(),
                "shape": list(t.shape), "dtype": str(t.dtype)}
    from kn_lens.neurons import NeuronSet

    if isinstance(x, NeuronSet):
        return {"__class__": "NeuronSet", "neurons": x.to_list()}
    raise ConfigError(f"cannot build a result key from a {type(x).__name__}: make it a dataclass "
                      "(or a plain JSON value)")


def _dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class ItemKind:
    """One kind of work item.

    ``run``: ``"module:function"``, called in the worker as ``fn(model, item) -> result`` (any
    picklable object). The callables below run in the driver only: ``methods()`` the valid
    method names (``None``: any), ``config_class(method)`` the config dataclass a method takes
    (``None``: the method takes no config), ``method_version(method)`` the version of the
    method's numbers, ``payload`` the input type(s), ``decode(stored)`` what :meth:`ResultStore.load`
    returns for a stored result (default: as stored). Bump ``version`` when the runner's output
    changes for the same inputs. ``needs_model=False``: the worker loads no model for these
    items (the runner gets ``None``); the items' model still keys them."""

    name: str
    run: str
    version: int = 1
    methods: Callable[[], Sequence[str]] | None = None
    config_class: Callable[[str], type | None] = field(default=lambda method: None)
    method_version: Callable[[str], int] = field(default=lambda method: 1)
    payload: type | tuple[type, ...] = object
    decode: Callable[[Any], Any] | None = None
    needs_model: bool = True  # False: the runner gets model=None (nothing is loaded)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("an item kind needs a name")
        if not isinstance(self.run, str) or ":" not in self.run:
            raise ConfigError(f"item kind {self.name!r}: run must be 'module:function', got "
                              f"{self.run!r}")


_KINDS: dict[str, ItemKind] = {}


def register_kind(kind: ItemKind, *, overwrite: bool = False) -> ItemKind:
    """Add an item kind to the registry (``overwrite`` to replace one)."""
    if kind.name in _KINDS and not overwrite:
        raise ConfigError(f"item kind {kind.name!r} is already registered (pass overwrite=True)")
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> ItemKind:
    if name not in _KINDS:
        raise ConfigError(f"unknown item kind {name!r}; choose one of {sorted(_KINDS)}")
    return _KINDS[name]


def available_kinds() -> list[str]:
    return list(_KINDS)


# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class WorkItem:
    """One unit of a sweep (see the module doc). ``key`` / ``key_json`` are derived."""

    kind: str
    method: str
    payload: Any
    model: ModelSpec
    config: Any = None  # None: the method's default config
    seed: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # kind-specific, part of the key
    key: str = field(init=False, compare=False)
    key_json: str = field(init=False, compare=False, repr=False)
    runner: str = field(init=False, compare=False, repr=False)
    needs_model: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        kind = get_kind(self.kind)
        object.__setattr__(self, "model", ModelSpec.coerce(self.model))
        object.__setattr__(self, "options", dict(self.options))
        if kind.methods is not None:
            valid = list(kind.methods())
            if self.method not in valid:
                raise ConfigError(f"{self.kind} method {self.method!r} is unknown; choose one of "
                                  f"{valid}")
        cls = kind.config_class(self.method)
        if cls is None:
            if self.config is not None:
                raise ConfigError(f"{self.kind} method {self.method!r} takes no config")
        elif self.config is None:
            object.__setattr__(self, "config", cls())
        elif not isinstance(self.config, cls):
            raise ConfigError(f"{self.kind} method {self.method!r} takes a {cls.__name__}, got "
                              f"{type(self.config).__name__}")
        if not isinstance(self.payload, kind.payload):
            want = kind.payload if isinstance(kind.payload, tuple) else (kind.payload,)
            raise ConfigError(f"a {self.kind} item takes a {' or '.join(t.__name__ for t in want)}"
                              f" as input, got {type(self.payload).__name__}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ConfigError(f"seed must be an int or None, got {self.seed!r}")
        blob = {"kind": self.kind, "kind_version": kind.version, "method": self.method,
                "method_version": kind.method_version(self.method),
                "config": canonical(self.config), "model": self.model.identity(),
                "input": canonical(self.payload), "seed": self.seed,
                "options": canonical(self.options)}
        text = _dumps(blob)
        object.__setattr__(self, "key_json", text)
        object.__setattr__(self, "key", hashlib.sha256(text.encode()).hexdigest()[:32])
        object.__setattr__(self, "runner", kind.run)
        object.__setattr__(self, "needs_model", kind.needs_model)

    def __hash__(self) -> int:  # the key is the identity (``options`` is a dict)
        return hash(self.key)

    # -------------------------------------------------------------- labels for the index

    @property
    def fact(self) -> Fact | None:
        p = self.payload
        if isinstance(p, Query):
            return p.fact
        if isinstance(p, EditJob):
            return p.request.fact
        if isinstance(p, EditRequest):
            return p.fact
        if isinstance(p, Fact):
            return p
        return getattr(p, "fact", None) if isinstance(getattr(p, "fact", None), Fact) else None

    @property
    def template_index(self) -> int | None:
        t = getattr(self.payload, "template_index", None)
        return t if isinstance(t, int) and t >= 0 else None

    def labels(self) -> dict:
        """The index's queryable columns of this item."""
        f = self.fact
        kind = get_kind(self.kind)
        return {"kind": self.kind, "kind_version": kind.version, "method": self.method,
                "version": kind.method_version(self.method), "model": self.model.label,
                "model_id": self.model.identity_hash(), "subject": f.subject if f else None,
                "relation": f.relation if f else None, "object": f.object if f else None,
                "template": self.template_index, "seed": self.seed}


# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True, kw_only=True)
class ReferenceSpec:
    """Reference prose for dPPL in edit items (:func:`kn_lens.evaluate.reference_slices`)."""

    n_slices: int = 8
    slice_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_slices < 1 or self.slice_len < 2:
            raise ConfigError("ReferenceSpec: n_slices >= 1 and slice_len >= 2")


@dataclass(frozen=True, kw_only=True)
class EditJob:
    """The input of an ``edit`` item: one request, edited alone, judged by the harness
    (``harness``; dPPL when ``reference`` is given). ``keep_edit``: store the ``Edit`` (its
    deltas) with the report."""

    request: EditRequest
    harness: Any = None  # HarnessConfig; None: counterfact + tokens protocols, no bootstrap
    reference: ReferenceSpec | None = None
    keep_edit: bool = True

    def __post_init__(self) -> None:
        from kn_lens.evaluate.harness import HarnessConfig

        if not isinstance(self.request, EditRequest):
            raise ConfigError(f"EditJob.request must be an EditRequest, got "
                              f"{type(self.request).__name__}")
        if self.harness is None:
            object.__setattr__(self, "harness", HarnessConfig(protocols=("counterfact", "tokens"),
                                                              n_bootstrap=0))
        elif not isinstance(self.harness, HarnessConfig):
            raise ConfigError(f"EditJob.harness must be a HarnessConfig, got "
                              f"{type(self.harness).__name__}")
        if self.reference is not None and not isinstance(self.reference, ReferenceSpec):
            raise ConfigError("EditJob.reference must be a ReferenceSpec or None")


@dataclass(frozen=True, kw_only=True)
class KNModificationJob:
    """The input of a ``kn_modification`` item: one fact erased / updated through its KNs as
    selected by N_i, N_g and CAS (QL Tables 2-3, :func:`kn_lens.analysis.kn_selection_edits`).
    The key holds the fact's queries, the locator that scored them (``locator``, its config and
    version: what determines the scores), the selections, the update target, the locality
    queries and the dPPL reference; the scores themselves ride along outside the key
    (``scores``, one per query, in order)."""

    queries: tuple[Query, ...]
    locator: str
    locator_config: Any
    locator_version: int
    selection: Any  # kn_lens.analysis.KNSelection
    cas_config: Any  # kn_lens.analysis.CASConfig
    new_object: str | None
    locality: tuple[Query, ...] = ()
    reference: ReferenceSpec | None = None
    edit_config: Any = None  # KNEditConfig of the updates (None: its defaults)
    # scores from outside the locator registry (hand-made, a user's own) have no method version
    # to vouch for them: their bytes' hash is part of the key instead (None for registry scores)
    scores_hash: str | None = None
    scores: tuple = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name in ("queries", "locality", "scores"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.queries) < 2 or not all(isinstance(q, Query) for q in self.queries):
            raise ConfigError("KNModificationJob.queries must be two or more Queries")
        if len(self.scores) != len(self.queries) or any(
                getattr(s, "query", None) != q for s, q in zip(self.scores, self.queries)):
            raise ConfigError("KNModificationJob.scores must be one NeuronScores per query, "
                              "in the queries' order")
        if self.reference is not None and not isinstance(self.reference, ReferenceSpec):
            raise ConfigError("KNModificationJob.reference must be a ReferenceSpec or None")


@dataclass(frozen=True, kw_only=True)
class KnownJob:
    """The input of a ``known`` item: which of ``facts`` the model knows
    (:func:`kn_lens.datasets.known_facts`, every template of each fact's relation, from
    ``relations``)."""

    facts: tuple[Fact, ...]
    relations: tuple[Relation, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "facts", tuple(self.facts))
        object.__setattr__(self, "relations", tuple(self.relations))
        if not self.facts or not all(isinstance(f, Fact) for f in self.facts):
            raise ConfigError("KnownJob.facts must be one or more Facts")
        if not all(isinstance(r, Relation) for r in self.relations):
            raise ConfigError("KnownJob.relations must be Relations")
        missing = sorted({f.relation for f in self.facts} - {r.id for r in self.relations})
        if missing:
            raise ConfigError(f"KnownJob: no relation given for {missing}")


# --------------------------------------------------------------------------- analyses

# method -> (module, function, config class): per-query analysis steps, fn(model, query, *, config)
_ANALYSES: dict[str, tuple[str, str, str]] = {
    "synapses": ("kn_lens.analysis.synapses", "knowledge_synapses", "SynapseConfig"),
    "trace": ("kn_lens.analysis.tracing", "causal_trace", "TraceConfig"),
}
_ANALYSIS_VERSIONS: dict[str, int] = {}


def register_analysis(name: str, module: str, function: str, config_class: str, *,
                      version: int = 1, overwrite: bool = False) -> None:
    """A per-query analysis step ``fn(model, query, *, config) -> result`` for ``analysis`` items
    (resolved by import path, in the worker)."""
    if name in _ANALYSES and not overwrite:
        raise ConfigError(f"analysis {name!r} is already registered (pass overwrite=True)")
    _ANALYSES[name] = (module, function, config_class)
    _ANALYSIS_VERSIONS[name] = int(version)


def available_analyses() -> list[str]:
    return list(_ANALYSES)


def analysis_function(name: str) -> tuple[Callable, type]:
    import importlib

    if name not in _ANALYSES:
        raise ConfigError(f"unknown analysis {name!r}; choose one of {sorted(_ANALYSES)}")
    module, fn, cfg = _ANALYSES[name]
    mod = importlib.import_module(module)
    return getattr(mod, fn), getattr(mod, cfg)


# --------------------------------------------------------------------------- built-in kinds


def _locator_config(method: str) -> type:
    from kn_lens.locate import get_method

    return get_method(method)[1]


def _locator_version(method: str) -> int:
    from kn_lens.locate import method_version

    return method_version(method)


def _locators() -> list[str]:
    from kn_lens.locate import available_methods

    return available_methods()


def _editor_config(method: str) -> type:
    from kn_lens.edit.registry import get_editor

    return get_editor(method)[1]


def _editor_version(method: str) -> int:
    from kn_lens.edit.registry import editor_version

    return editor_version(method)


def _editors() -> list[str]:
    from kn_lens.edit.registry import available_editors

    return available_editors()


def _decode_locate(stored):
    from kn_lens.sweep.kinds import decode_scores

    return decode_scores(stored)


register_kind(ItemKind(
    name="locate", run="kn_lens.sweep.kinds:run_locate", methods=_locators,
    config_class=_locator_config, method_version=_locator_version, payload=Query,
    decode=_decode_locate))
register_kind(ItemKind(
    name="analysis", run="kn_lens.sweep.kinds:run_analysis", methods=available_analyses,
    config_class=lambda m: analysis_function(m)[1],
    method_version=lambda m: _ANALYSIS_VERSIONS.get(m, 1), payload=Query))
register_kind(ItemKind(
    name="edit", run="kn_lens.sweep.kinds:run_edit", methods=_editors,
    config_class=_editor_config, method_version=_editor_version, payload=EditJob))


register_kind(ItemKind(
    name="kn_modification", run="kn_lens.sweep.kinds:run_kn_modification",
    methods=lambda: ["kn_selections"], config_class=lambda m: _compare_config(),
    payload=KNModificationJob))


def _compare_config() -> type:
    from kn_lens.analysis.cas import CompareConfig

    return CompareConfig


register_kind(ItemKind(
    name="known", run="kn_lens.sweep.kinds:run_known", methods=lambda: ["known_facts"],
    config_class=lambda m: _known_config(), payload=KnownJob))


def _known_config() -> type:
    from kn_lens.datasets.known import KnownFactsConfig

    return KnownFactsConfig


# --------------------------------------------------------------------------- builders


def fact_queries(model, dataset, facts: Iterable[Fact], templates: Sequence[int] | None = None
                 ) -> list[Query]:
    """Every fact rendered with its relation's templates (all, or the given indices that the
    relation has), tokenised for ``model`` (a model, or a ``ModelSpec``: then only its
    tokenizer is loaded)."""
    from kn_lens.facts import queries_for_fact

    view = model.tokenizer_view() if isinstance(model, ModelSpec) else model
    out: list[Query] = []
    for f in facts:
        rel = dataset.relation_of(f)
        idx = None if templates is None else [i for i in templates if 0 <= i < len(rel.templates)]
        out += queries_for_fact(view, f, rel, idx)
    return out


def spec_of(model) -> ModelSpec:
    """The :class:`ModelSpec` of a loaded model (:meth:`ModelSpec.from_model`), a spec, a name or
    a dict of spec fields (:meth:`ModelSpec.coerce`)."""
    if isinstance(model, (ModelSpec, str, Mapping)):
        return ModelSpec.coerce(model)
    return ModelSpec.from_model(model)


def locate_items(model, queries: Iterable[Query], method: str, config: Any = None, *,
                 store_dtype: str = "float32") -> list[WorkItem]:
    """One ``locate`` item per query. ``store_dtype="float16"`` stores each score map as float16
    relative to its largest |score| (half the space; the relative error is < 1e-3 of that
    maximum, ties in KN selection aside the sets do not change) and loads it back as float32."""
    if store_dtype not in ("float32", "float16"):
        raise ConfigError(f"store_dtype must be 'float32' or 'float16', got {store_dtype!r}")
    spec = spec_of(model)
    opts = {} if store_dtype == "float32" else {"store_dtype": store_dtype}
    return [WorkItem("locate", method, q, spec, config, options=opts) for q in queries]


def analysis_items(model, queries: Iterable[Query], method: str, config: Any = None
                   ) -> list[WorkItem]:
    """One ``analysis`` item per query (``synapses``: QL's knowledge synapses, ``trace``: ROME's
    causal trace, or a registered analysis)."""
    spec = spec_of(model)
    return [WorkItem("analysis", method, q, spec, config) for q in queries]


def edit_items(model, requests: Iterable[EditRequest], method: str, config: Any = None, *,
               harness: Any = None, reference: ReferenceSpec | None = None, seed: int = 0,
               keep_edit: bool = True) -> list[WorkItem]:
    """One ``edit`` item per request: the edit computed with editor ``method`` (seeded) and
    judged by the harness."""
    spec = spec_of(model)
    return [WorkItem("edit", method, EditJob(request=r, harness=harness, reference=reference,
                                             keep_edit=keep_edit), spec, config, seed=seed)
            for r in requests]


def kn_modification_items(model, scores_by_fact: Mapping[Fact, Sequence[Any]], *, config: Any,
                          selection: Any, cas_config: Any, new_objects: Mapping[Fact, str] | None,
                          locality: Sequence[Query] = (), reference: ReferenceSpec | None = None,
                          edit_config: Any = None) -> list[WorkItem]:
    """One ``kn_modification`` item per fact (QL Tables 2-3): its located scores (one
    ``NeuronScores`` per neighbour query, all by one locator), ``config`` a
    :class:`~kn_lens.analysis.CompareConfig`; locality queries of the fact itself are dropped,
    as :func:`kn_lens.analysis.compare_kn_selections` does."""
    from kn_lens.locate import available_methods, method_version

    spec = spec_of(model)
    out = []
    for f, scores in scores_by_fact.items():
        scores = tuple(scores)
        method = scores[0].method if scores else None
        registered = method in available_methods()
        digest = None
        if not registered:  # no locator version vouches for these numbers: key them by value
            digest = hashlib.sha1(_dumps(canonical([sc.scores for sc in scores])).encode()
                                  ).hexdigest()
        job = KNModificationJob(
            queries=tuple(s.query for s in scores), locator=method,
            locator_config=scores[0].config if scores else None,
            locator_version=method_version(method) if registered else 0, scores_hash=digest,
            selection=selection,
            cas_config=cas_config, new_object=None if new_objects is None else new_objects[f],
            locality=tuple(q for q in locality if q.fact != f), reference=reference,
            edit_config=edit_config, scores=scores)
        out.append(WorkItem("kn_modification", "kn_selections", job, spec, config))
    return out


def known_item(model, facts: Iterable[Fact], relations, config: Any = None) -> WorkItem:
    """One ``known`` item: the :class:`~kn_lens.datasets.KnownFacts` of ``facts`` on ``model``
    (``relations``: a ``Dataset``, a mapping id -> ``Relation`` or ``Relation`` s; only the facts'
    relations are kept, so the key does not change with unrelated ones)."""
    from kn_lens.datasets.core import Dataset

    facts = tuple(facts)
    if isinstance(relations, Dataset):
        relations = relations.relations
    rels = relations.values() if isinstance(relations, Mapping) else relations
    used = {f.relation for f in facts}
    job = KnownJob(facts=facts, relations=tuple(r for r in rels if r.id in used))
    return WorkItem("known", "known_facts", job, spec_of(model), config)

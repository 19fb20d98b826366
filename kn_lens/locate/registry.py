"""One driver, pluggable locators: the method registry and :func:`locate`.

Every locator has the signature ``fn(model, query, *, config=None) -> NeuronScores``. ``METHODS``
maps a method name to ``(function, config class)``; entries are resolved on first use, so a method
whose module is missing (or fails to import) only errors when it is asked for.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Sequence

from kn_lens.errors import ConfigError
from kn_lens.facts import Query
from kn_lens.neurons import NeuronScores

Locator = Callable[..., NeuronScores]

# name -> (module, function name, config class name)
_SPECS: dict[str, tuple[str, str, str]] = {
    "ig": ("kn_lens.locate.integrated_gradients", "integrated_gradients", "IGConfig"),
    "ig_eos": ("kn_lens.locate.integrated_gradients", "integrated_gradients_eos", "IGConfig"),
    "ig_plain": ("kn_lens.locate.integrated_gradients", "integrated_gradients_plain", "IGConfig"),
    "contribution": ("kn_lens.locate.contribution", "contribution_scores", "ContributionConfig"),
    "mediation": ("kn_lens.locate.mediation", "causal_mediation", "MediationConfig"),
    "atp": ("kn_lens.locate.mediation", "attribution_patching", "AtPConfig"),
}

# name -> version of the locator's *numbers*: bump it when a change to the code alters the scores a
# locator returns (not for refactors), so that score caches keyed on the method know to recompute.
# Unlisted methods are version 1. History: contribution's Gemma post-MLP-norm fix predates this
# table (stale cache entries were deleted by hand then).
_VERSIONS: dict[str, int] = {}


class _LazyMethods(Mapping):
    """Read-only mapping name -> (function, config class), importing modules on first access."""

    def __getitem__(self, name: str) -> tuple[Locator, type]:
        if name not in _SPECS:
            raise KeyError(name)
        module, fn, cfg = _SPECS[name]
        try:
            mod = importlib.import_module(module)
            return getattr(mod, fn), getattr(mod, cfg)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"locator {name!r} is registered but unavailable: {module}.{fn} / "
                              f"{cfg} could not be imported ({type(exc).__name__}: {exc})") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(_SPECS)

    def __len__(self) -> int:
        return len(_SPECS)

    def __contains__(self, name: object) -> bool:
        return name in _SPECS


METHODS: Mapping[str, tuple[Locator, type]] = _LazyMethods()


def register_method(name: str, module: str, function: str, config_class: str, *,
                    overwrite: bool = False, version: int = 1) -> None:
    """Register a locator by import path (resolved lazily). ``version``: see :func:`method_version`."""
    if name in _SPECS and not overwrite:
        raise ConfigError(f"locator {name!r} is already registered (pass overwrite=True)")
    _SPECS[name] = (module, function, config_class)
    _VERSIONS[name] = int(version)


def method_version(name: str) -> int:
    """Version of locator ``name``'s numbers (bumped when a code change alters its scores); caches
    of scores store it and recompute on a mismatch."""
    if name not in _SPECS:
        raise ConfigError(f"unknown locator {name!r}; choose one of {sorted(_SPECS)}")
    return _VERSIONS.get(name, 1)


def available_methods(*, importable_only: bool = False) -> list[str]:
    """Registered method names (only those whose module imports, with ``importable_only``)."""
    if not importable_only:
        return list(_SPECS)
    out = []
    for name in _SPECS:
        try:
            METHODS[name]
        except ConfigError:
            continue
        out.append(name)
    return out


def get_method(name: str) -> tuple[Locator, type]:
    if name not in _SPECS:
        raise ConfigError(f"unknown locator {name!r}; choose one of {sorted(_SPECS)}")
    return METHODS[name]


def locate(model, queries: Query | Sequence[Query], method: str = "ig", config: Any = None,
           progress: bool = True) -> list[NeuronScores]:
    """Run locator ``method`` on each query (one ``NeuronScores`` per query, in order)."""
    fn, cfg_cls = get_method(method)
    if config is not None and not isinstance(config, cfg_cls):
        raise ConfigError(f"locator {method!r} takes a {cfg_cls.__name__}, got "
                          f"{type(config).__name__}")
    if isinstance(queries, Query):
        queries = [queries]
    queries = list(queries)
    if not queries:
        raise ConfigError("locate() needs at least one query")
    iterator = queries
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(queries, desc=f"locate[{method}]", unit="query")
    return [fn(model, q, config=config) for q in iterator]

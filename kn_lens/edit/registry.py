"""One driver, pluggable editors: the editor registry and :func:`edit`.

Every editor has the signature ``fn(model, requests, *, config=None, neurons=None, generator=None)
-> Edit``: one request is a list of one, several requests make one batch edit. An editor computes
and returns an :class:`~kn_lens.edit.delta.Edit`; it never leaves the model changed (the caller
applies the edit through hooks or materialises it). Entries are resolved on first use, like the
locators' registry, and carry a version of their numbers (bump it when a change alters the deltas
an editor returns, so caches of edits know to recompute).
"""
from __future__ import annotations

import importlib
import time
from typing import Any, Callable, Sequence

import torch

from kn_lens import hooks as H
from kn_lens.edit.delta import Edit
from kn_lens.errors import ConfigError, KnLensError
from kn_lens.facts import EditRequest

Editor = Callable[..., Edit]

# name -> (module, function, config class)
_SPECS: dict[str, tuple[str, str, str]] = {
    "ft_l": ("kn_lens.edit.baselines.ft_l", "ft_l", "FTLConfig"),
    "rome": ("kn_lens.edit.baselines.rome", "rome", "ROMEConfig"),
    "memit": ("kn_lens.edit.baselines.memit", "memit", "MEMITConfig"),
    "kn_erase": ("kn_lens.edit.kn", "kn_erase", "KNEditorConfig"),
    "kn_update": ("kn_lens.edit.kn", "kn_update", "KNEditorConfig"),
    "fine": ("kn_lens.edit.fine", "fine", "FiNEConfig"),
    "kne": ("kn_lens.edit.kne", "kne", "KNEConfig"),
    "tnf_da": ("kn_lens.edit.tnf_da", "tnf_da", "TNFDAConfig"),
}
_VERSIONS: dict[str, int] = {}


def register_editor(name: str, module: str, function: str, config_class: str, *,
                    overwrite: bool = False, version: int = 1) -> None:
    """Register an editor by import path (resolved lazily)."""
    if name in _SPECS and not overwrite:
        raise ConfigError(f"editor {name!r} is already registered (pass overwrite=True)")
    _SPECS[name] = (module, function, config_class)
    _VERSIONS[name] = int(version)


def available_editors() -> list[str]:
    return list(_SPECS)


def editor_version(name: str) -> int:
    if name not in _SPECS:
        raise ConfigError(f"unknown editing method {name!r}; choose one of {sorted(_SPECS)}")
    return _VERSIONS.get(name, 1)


def get_editor(name: str) -> tuple[Editor, type]:
    if name not in _SPECS:
        raise ConfigError(f"unknown editing method {name!r}; choose one of {sorted(_SPECS)}")
    module, fn, cfg = _SPECS[name]
    try:
        mod = importlib.import_module(module)
        return getattr(mod, fn), getattr(mod, cfg)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"editor {name!r} is registered but unavailable: {module}.{fn} / {cfg} "
                          f"could not be imported ({type(exc).__name__}: {exc})") from exc


def edit(model, requests: EditRequest | Sequence[EditRequest], *, method: str,
         config: Any = None, neurons=None, seed: int = 0) -> Edit:
    """Compute an edit of ``requests`` with editor ``method`` (see :func:`available_editors`).

    Returns an :class:`Edit` whose ``method`` is the registry name and whose config records the
    editor's config, version, seed and compute time. The model is left as it was: no weight
    changed and no hook attached, also when the editor raises (then nothing is returned)."""
    from kn_lens.edit.requests import check_requests

    fn, cfg_cls = get_editor(method)
    if config is not None and not isinstance(config, cfg_cls):
        raise ConfigError(f"editor {method!r} takes a {cfg_cls.__name__}, got {type(config).__name__}")
    requests = check_requests(model, requests)
    if not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hooks_before = H.active_hook_count(model)
    t0 = time.perf_counter()
    try:
        result = fn(model, requests, config=config, neurons=neurons, generator=generator)
    finally:
        leaked = H.active_hook_count(model) - hooks_before
        if leaked > 0 and hooks_before == 0:  # an editor bug: never hand back a hooked model
            model.reset_hooks(including_permanent=False)
    if leaked > 0:
        raise KnLensError(f"editor {method!r} left {leaked} hook(s) on the model (removed); "
                          "this is a bug in the editor")
    if not isinstance(result, Edit):
        raise ConfigError(f"editor {method!r} returned {type(result).__name__}, not an Edit")
    record = {"editor": method, "editor_version": editor_version(method), "seed": seed,
              "seconds": round(time.perf_counter() - t0, 3), "n_requests": len(requests),
              "details": result.config}
    return Edit(result.deltas, result.description, method, result.model, record)

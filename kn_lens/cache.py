"""One keyed, atomic per-item store: what the score cache (:mod:`kn_lens.locate.cache`), the study
(:mod:`kn_lens.study`) and the experiment scripts keep between runs.

An item is one file ``<folder>/<key>.pt`` (``torch.save``), its key a hash of the canonical JSON
of everything that determines the value (:meth:`ItemCache.key`: model identity, method and its
version, config, prompt, answer ids, ...), so a changed input is a different item, never a stale
hit. Writes go to a temporary file renamed into place: a killed run leaves whole items or none,
and a resumed run computes only what is missing. A file that cannot be read is recomputed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["ItemCache", "item_key", "plain"]


def plain(x: Any, *, nan_as_none: bool = False) -> Any:
    """``x`` as plain JSON data: dataclasses (configs, ``ModelInfo``) by their fields, tuples as
    lists, dict keys as strings, tensors and arrays as (nested) lists; ``nan_as_none``: NaN
    floats as None (JSON has no NaN)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, dict):
        return {str(k): plain(v, nan_as_none=nan_as_none) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v, nan_as_none=nan_as_none) for v in x]
    if hasattr(x, "tolist"):
        return plain(x.tolist(), nan_as_none=nan_as_none)
    if nan_as_none and isinstance(x, float) and x != x:
        return None
    return x


def item_key(length: int = 20, **parts: Any) -> str:
    """The hex key of an item: SHA-1 of the canonical (sorted-key) JSON of ``parts``
    (:func:`plain`)."""
    blob = json.dumps(plain(parts), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:length]


class ItemCache:
    """Items under ``folder`` by key (see the module doc). ``computed`` / ``hits`` count this
    object's stores and reads, for progress lines and resumption checks."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.computed = 0
        self.hits = 0

    key = staticmethod(item_key)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def load(self, key: str) -> Any | None:
        """The stored value of ``key``, or None (absent, or unreadable: then removed)."""
        import torch

        path = self.path(key)
        if not path.exists():
            return None
        try:
            value = torch.load(path, weights_only=False)
        except Exception:  # a corrupt item is recomputed
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return value

    def save(self, key: str, value: Any) -> None:
        """Store ``value`` (not None: None means "absent") under ``key`` atomically (temporary
        file + rename)."""
        import torch

        if value is None:
            from kn_lens.errors import ConfigError

            raise ConfigError(f"item {key}: None cannot be stored (it reads as absent)")
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(value, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.computed += 1

    def get_or(self, key: str, fn: Callable[[], Any]) -> Any:
        """The stored value of ``key``; else ``fn()``, stored, then returned."""
        value = self.load(key)
        if value is None:
            value = fn()
            self.save(key, value)
        return value

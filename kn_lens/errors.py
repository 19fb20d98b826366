"""One error family for kn-lens. Every message says what was wrong and what to do."""
from __future__ import annotations


class KnLensError(Exception):
    """Base class of every error kn-lens raises on purpose."""


class UnknownModelError(KnLensError):
    """A model name that is neither a built-in offline alias, a TransformerLens name, nor a folder."""


class ModelWeightsUnavailableError(KnLensError):
    """The model is known but its weights are not on this machine and cannot be downloaded."""


class InvalidTemplateError(KnLensError, ValueError):
    """A relation template without exactly one ``{}`` placeholder for the subject."""


class InvalidFactError(KnLensError, ValueError):
    """An empty subject/object, or an otherwise malformed fact."""


class TokenizationError(KnLensError, ValueError):
    """An answer or prompt the model's tokenizer cannot encode faithfully."""


class DataFileError(KnLensError, FileNotFoundError):
    """A data file that is missing or not in the expected format."""


class NumericalError(KnLensError, FloatingPointError):
    """NaN or infinite values where finite numbers are required."""


class ConfigError(KnLensError, ValueError):
    """A configuration value outside its valid range."""


class ToolUnavailableError(KnLensError, RuntimeError):
    """An external program kn-lens needs (e.g. a headless browser) is missing or failed."""


class OptionalDependencyError(KnLensError, ImportError):
    """A feature needs a package from an optional extra that is not installed (the message names
    the extra, e.g. ``pip install 'kn-lens[ray]'``)."""


class StoreError(KnLensError, RuntimeError):
    """A result store that is inconsistent, unreadable, or used in a way that would mix results
    (e.g. a model whose weights differ from the ones its stored results were computed with)."""


class SweepIncompleteError(KnLensError, RuntimeError):
    """A sweep ended with items not stored: items that failed (their errors are listed; the next
    sweep tries them again), items of other shards (``--shard``), or items another sweep still
    computes. ``missing`` holds their keys; ``result`` the :class:`~kn_lens.sweep.SweepResult`."""

    def __init__(self, message: str, *, missing: tuple = (), result=None):
        super().__init__(message)
        self.missing = tuple(missing)
        self.result = result

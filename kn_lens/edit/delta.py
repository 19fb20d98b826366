"""An edit is data: sparse deltas on named weights, applied through hooks or materialised.

A :class:`WeightDelta` is "parameter name + indices along one dimension + the delta values of
those slices": ``blocks.5.mlp.W_out`` rows (a neuron's output vector, ``dim=0``),
``blocks.5.mlp.W_in`` / ``W_gate`` columns (a neuron's input vector, ``dim=1``), or one head's
slice of ``attn.W_Q`` / ``W_K`` / ``W_V`` / ``W_O`` (``dim=0``). An :class:`Edit` is a tuple of such
deltas plus provenance (model info, description, method, config). It can be

- applied through hooks, the weights untouched: ``with model.hooks(fwd_hooks=edit.hooks(model))``;
- materialised in a scope that restores the exact original slices on exit, even on error:
  ``with edit.applied(model): ...``;
- saved / loaded (safetensors + a JSON manifest), composed (``a + b``; deltas on the same slice
  add), scaled, and asked which neurons it touches.

Besides slices there are

- **low-rank deltas** (:class:`LowRankDelta`, ``dW = u @ v.T`` on a 2-D MLP matrix, what ROME
  and MEMIT produce), kept factorised: stored, saved and applied through hooks as ``u`` and
  ``v`` (``mlp_out += (hook_post @ u) @ v.T``), never as the dense matrix; composing two
  low-rank deltas on one matrix concatenates their factors (ranks add);
- **dense-layer deltas** (:func:`dense`), a slice delta that covers every slice of a matrix
  (FT-L's whole ``W_out`` of one layer), with every guarantee of the sparse ones.

Deltas live on the weights *as the model was loaded* (kn-lens folds LN weights into the next
matrices and may centre writing weights / the unembedding), so an edit made on a model loaded with
one weight processing must not be applied to a model loaded with another: ``check`` refuses that.

How the hook form works (exact up to float rounding, tested against the materialised form):

- ``W_out`` rows of layer l: ``mlp_out += hook_post[..., idx] @ dW`` (the post-activations are
  cached from ``hooks.mlp_post(l)`` in the same forward pass, which runs before ``hook_mlp_out``).
- ``W_in`` / ``W_gate`` columns: the MLP input ``x = ln2(resid_mid)`` is rebuilt from
  ``ln2.hook_normalized`` (times the LN weight, plus bias, when LN is not folded) and
  ``x @ dW`` is added to the pre-activation: ``hook_pre`` for a plain MLP and for a gated MLP's
  ``W_gate``; ``hook_pre_linear`` for a gated MLP's ``W_in`` (the up projection).
- ``W_Q`` / ``W_K`` / ``W_V`` head slices: ``x @ dW[h]`` is added to ``hook_q/k/v[..., h, :]``
  (before rotary) with ``x = ln1(resid_pre)``; ``W_O``: ``attn_out += z[:, :, h] @ dW_O[h]``.
- Models that normalise block outputs (Gemma's ``ln1_post`` / ``ln2_post``): the
  term is added to the *un-normalised* output, recovered from ``ln{1,2}_post.hook_scale`` and
  ``hook_normalized``, and re-normalised, so the result equals the materialised weights.

The added terms are computed in the dtype of the activation they join (TransformerLens' norms
compute in float32 even in a bfloat16 model, so a post-norm term is float32 there).

Put ``edit.hooks(model)`` *after* other hooks on the same hook points when you combine them: the
edit then reads the activations that the weights actually read.
"""
from __future__ import annotations

import dataclasses
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from kn_lens import hooks as H
from kn_lens.backend import (architecture, bridge_weight, has_post_norms, is_bridge, norm_bias,
                             norm_weight)
from kn_lens.errors import ConfigError, DataFileError, NumericalError
from kn_lens.models import ModelInfo, model_info
from kn_lens.neurons import Neuron, NeuronSet

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

FORMAT = "kn-lens-edit"
FORMAT_VERSION = 2  # 2: low-rank deltas ("type": "low_rank"); version-1 manifests still load
MANIFEST = "edit.json"
TENSORS = "edit.safetensors"

# kind -> (the dimension whose slices a unit owns, what that unit is)
_KINDS: dict[str, tuple[int, str]] = {
    "W_out": (0, "neuron"),
    "W_in": (1, "neuron"),
    "W_gate": (1, "neuron"),
    "W_Q": (0, "head"),
    "W_K": (0, "kv_head"),
    "W_V": (0, "kv_head"),
    "W_O": (0, "head"),
}
_PARAM_RE = re.compile(r"^blocks\.(\d+)\.(mlp|attn)\._?(W_out|W_in|W_gate|W_Q|W_K|W_V|W_O)$")


def param_name(layer: int, kind: str) -> str:
    """``param_name(5, "W_out")`` -> ``"blocks.5.mlp.W_out"``; attention kinds go under ``attn``."""
    if kind not in _KINDS:
        raise ConfigError(f"unknown weight kind {kind!r}; choose one of {sorted(_KINDS)}")
    module = "mlp" if kind in ("W_out", "W_in", "W_gate") else "attn"
    return f"blocks.{int(layer)}.{module}.{kind}"


def parse_param(name: str) -> tuple[int, str] | None:
    """``"blocks.5.mlp.W_out"`` -> ``(5, "W_out")``; None for parameters outside the blocks."""
    m = _PARAM_RE.match(name)
    return None if m is None else (int(m.group(1)), m.group(3))


@dataclass(frozen=True, eq=False)
class WeightDelta:
    """Delta ``values`` for the slices ``index`` along dimension ``dim`` of parameter ``param``.

    ``values`` has the parameter's shape with size ``len(index)`` at ``dim`` (slices in ``index``
    order). Indices are unique.
    """

    param: str
    dim: int
    index: Int[Tensor, "k"]
    values: Tensor

    def __post_init__(self) -> None:
        index = torch.as_tensor(self.index, dtype=torch.long, device="cpu").flatten()
        values = torch.as_tensor(self.values, device="cpu").detach()
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "values", values)
        if not isinstance(self.param, str) or not self.param:
            raise ConfigError("a weight delta needs a parameter name")
        if not 0 <= self.dim < values.ndim:
            raise ConfigError(f"delta on {self.param}: dim {self.dim} outside a {values.ndim}-d value")
        if values.shape[self.dim] != index.numel():
            raise ConfigError(
                f"delta on {self.param}: {index.numel()} indices but values have "
                f"{values.shape[self.dim]} slices along dim {self.dim} (shape {tuple(values.shape)})")
        if index.numel() != torch.unique(index).numel():
            raise ConfigError(f"delta on {self.param}: repeated indices (compose deltas instead)")
        if (index < 0).any():
            raise ConfigError(f"delta on {self.param}: negative index")
        if values.is_floating_point() and not torch.isfinite(values).all():
            raise NumericalError(f"delta on {self.param} has NaN or infinite values")

    @property
    def n_params(self) -> int:
        return int(self.values.numel())

    @property
    def layer(self) -> int | None:
        parsed = parse_param(self.param)
        return None if parsed is None else parsed[0]

    @property
    def kind(self) -> str | None:
        parsed = parse_param(self.param)
        return None if parsed is None else parsed[1]

    def scale(self, alpha: float) -> "WeightDelta":
        return WeightDelta(self.param, self.dim, self.index, self.values * alpha)


def w_out_rows(layer: int, index: Sequence[int] | Tensor, values: Tensor) -> WeightDelta:
    """Delta on neurons' output vectors: rows of ``blocks.{layer}.mlp.W_out``, values [k, d_model]."""
    return WeightDelta(param_name(layer, "W_out"), 0, torch.as_tensor(index, device="cpu"), values)


def w_in_columns(layer: int, index: Sequence[int] | Tensor, values: Tensor, *,
                 gate: bool = False) -> WeightDelta:
    """Delta on neurons' input vectors: columns of ``W_in`` (or ``W_gate``), values [d_model, k]."""
    return WeightDelta(param_name(layer, "W_gate" if gate else "W_in"), 1,
                       torch.as_tensor(index, device="cpu"),
                       values)


def head_slices(layer: int, kind: str, heads: Sequence[int] | Tensor, values: Tensor) -> WeightDelta:
    """Delta on attention heads: ``W_Q/W_K/W_V`` values [k, d_model, d_head] (kv heads for K/V
    under grouped-query attention), ``W_O`` values [k, d_head, d_model]."""
    if kind not in ("W_Q", "W_K", "W_V", "W_O"):
        raise ConfigError(f"head_slices takes W_Q, W_K, W_V or W_O, not {kind!r}")
    return WeightDelta(param_name(layer, kind), 0, torch.as_tensor(heads, device="cpu"), values)


def dense(layer: int, kind: str, values: Tensor) -> WeightDelta:
    """A delta on the whole matrix ``blocks.{layer}.<kind>``: every slice along the kind's unit
    dimension (rows of W_out, columns of W_in / W_gate, all heads of W_Q/W_K/W_V/W_O)."""
    if kind not in _KINDS:
        raise ConfigError(f"unknown weight kind {kind!r}; choose one of {sorted(_KINDS)}")
    values = torch.as_tensor(values, device="cpu")
    dim = _KINDS[kind][0]
    if not 0 <= dim < values.ndim:
        raise ConfigError(f"dense {kind} delta: a {values.ndim}-d value has no dim {dim}")
    return WeightDelta(param_name(layer, kind), dim, torch.arange(values.shape[dim], device="cpu"),
                       values)


_LOW_RANK_KINDS = ("W_out", "W_in", "W_gate")


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """``dW = u @ v.T`` on the 2-D matrix ``param`` (``u``: [rows, r], ``v``: [cols, r]).

    Only MLP matrices (``W_out`` [d_mlp, d_model], ``W_in`` / ``W_gate`` [d_model, d_mlp]): the
    hook form multiplies the matrix's input by ``u`` then ``v.T``; attention matrices are 3-D
    (use slice deltas there)."""

    param: str
    u: Tensor
    v: Tensor

    def __post_init__(self) -> None:
        u = torch.as_tensor(self.u, device="cpu").detach()
        v = torch.as_tensor(self.v, device="cpu").detach()
        if u.ndim == 1:
            u = u[:, None]
        if v.ndim == 1:
            v = v[:, None]
        object.__setattr__(self, "u", u)
        object.__setattr__(self, "v", v)
        parsed = parse_param(self.param) if isinstance(self.param, str) else None
        if parsed is None or parsed[1] not in _LOW_RANK_KINDS:
            raise ConfigError(f"low-rank deltas live on MLP matrices {_LOW_RANK_KINDS}, not "
                              f"{self.param!r}")
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
            raise ConfigError(f"low-rank delta on {self.param}: u {tuple(u.shape)} and v "
                              f"{tuple(v.shape)} must be [rows, r] and [cols, r]")
        for name, t in (("u", u), ("v", v)):
            if not t.is_floating_point():
                raise ConfigError(f"low-rank delta on {self.param}: {name} must be floating point")
            if not torch.isfinite(t).all():
                raise NumericalError(f"low-rank delta on {self.param} has NaN or infinite {name}")

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.u.shape[0]), int(self.v.shape[0])

    @property
    def n_stored(self) -> int:
        return int(self.u.numel() + self.v.numel())

    @property
    def n_params(self) -> int:
        """Weight entries changed: (rows where u != 0) x (columns where v != 0)."""
        return int((self.u != 0).any(1).sum()) * int((self.v != 0).any(1).sum())

    @property
    def layer(self) -> int:
        return parse_param(self.param)[0]

    @property
    def kind(self) -> str:
        return parse_param(self.param)[1]

    def dense(self) -> Tensor:
        """The delta as a dense matrix (for inspection; the edit itself stays factorised)."""
        return self.u @ self.v.T

    def scale(self, alpha: float) -> "LowRankDelta":
        return LowRankDelta(self.param, self.u * alpha, self.v)


def low_rank(layer: int, kind: str, u: Tensor, v: Tensor) -> LowRankDelta:
    """``dW = u @ v.T`` on ``blocks.{layer}.mlp.<kind>`` (see :class:`LowRankDelta`)."""
    return LowRankDelta(param_name(layer, kind), u, v)


Delta = WeightDelta | LowRankDelta


def _jsonable(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    try:
        return json.loads(json.dumps(config, default=str))
    except (TypeError, ValueError) as exc:  # pragma: no cover - default=str handles most
        raise ConfigError(f"edit config is not JSON-serialisable: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Edit:
    """Sparse weight deltas with provenance. See the module docstring."""

    deltas: tuple[Delta, ...] = ()
    description: str = ""
    method: str = ""
    model: ModelInfo | None = None
    config: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "deltas", tuple(self.deltas))
        object.__setattr__(self, "config", _jsonable(self.config))
        seen: set[tuple[str, object]] = set()
        for d in self.deltas:
            if not isinstance(d, (WeightDelta, LowRankDelta)):
                raise ConfigError(f"Edit.deltas must hold WeightDelta or LowRankDelta, got "
                                  f"{type(d).__name__}")
            key = _merge_key(d)
            if key in seen:  # one delta per (param, dim) / low-rank param: merge
                object.__setattr__(self, "deltas", _merge(self.deltas))
                break
            seen.add(key)

    # ------------------------------------------------------------------ inspection
    @property
    def n_params(self) -> int:
        """Number of weight entries the edit changes (slices: stored values; low-rank: the
        entries of the nonzero rows x nonzero columns; a low-rank and a slice delta on the same
        matrix are counted separately, an upper bound)."""
        return sum(d.n_params for d in self.deltas)

    @property
    def n_stored(self) -> int:
        """Numbers stored (a rank-r delta on an m x n matrix stores r (m + n))."""
        return sum(d.n_stored if isinstance(d, LowRankDelta) else d.n_params for d in self.deltas)

    @property
    def layers(self) -> tuple[int, ...]:
        """The blocks the edit changes (sorted)."""
        return tuple(sorted({d.layer for d in self.deltas if d.layer is not None}))

    def __len__(self) -> int:
        return len(self.deltas)

    def __repr__(self) -> str:
        what = ", ".join(f"{d.param}[rank {d.rank}]" if isinstance(d, LowRankDelta)
                         else f"{d.param}[{d.index.numel()} along {d.dim}]" for d in self.deltas[:4])
        more = "" if len(self.deltas) <= 4 else f", ... (+{len(self.deltas) - 4})"
        return f"Edit({what}{more}; {self.n_params} params; {self.description!r})"

    def touched_neurons(self) -> NeuronSet:
        """The FFN neurons whose W_out row or W_in / W_gate column the edit changes."""
        out: list[Neuron] = []
        for d in self.deltas:
            layer, kind = d.layer, d.kind
            if isinstance(d, LowRankDelta):  # units with a nonzero row (W_out) / column (W_in)
                unit = d.u if kind == "W_out" else d.v
                out.extend(Neuron(layer, int(i)) for i in torch.nonzero((unit != 0).any(1))[:, 0])
            elif kind in ("W_out", "W_in", "W_gate") and d.dim == _KINDS[kind][0]:
                out.extend(Neuron(layer, int(i)) for i in d.index)
        return NeuronSet(out, label=self.description)

    def touched_heads(self) -> set[tuple[int, str, int]]:
        """``(layer, kind, head)`` for every attention head slice the edit changes."""
        return {(d.layer, d.kind, int(i)) for d in self.deltas if isinstance(d, WeightDelta)
                and d.kind in ("W_Q", "W_K", "W_V", "W_O") and d.dim == 0 for i in d.index}

    # ------------------------------------------------------------------ algebra
    def scale(self, alpha: float) -> "Edit":
        """The same edit with every delta multiplied by ``alpha``."""
        return Edit(tuple(d.scale(alpha) for d in self.deltas),
                    f"{alpha:g} x ({self.description})" if self.description else "",
                    self.method, self.model, {"scaled_by": alpha, "of": self.config})

    def __add__(self, other: "Edit") -> "Edit":
        return compose([self, other])

    # ------------------------------------------------------------------ validation
    def check(self, model: "HookedTransformer", *, strict: bool = True) -> None:
        """Raise ConfigError if a delta does not fit the model's parameters, or (``strict``) if the
        edit was made on a model with other metadata (name, sizes, weight processing)."""
        if strict and self.model is not None:
            mine, theirs = self.model, model_info(model)
            diff = {k: (getattr(mine, k), getattr(theirs, k)) for k in _WEIGHT_KEYS
                    if getattr(mine, k) != getattr(theirs, k)}
            if diff:
                raise ConfigError(
                    f"edit was made for another model or weight processing: {diff} (edit, model). "
                    "Deltas live on processed weights; load the model as the edit's manifest says, "
                    "or pass strict=False if you know the weights agree.")
        for d in self.deltas:
            p = _param(model, d.param, writable=False)
            if isinstance(d, LowRankDelta):
                if p.ndim != 2 or d.shape != tuple(p.shape):
                    raise ConfigError(f"low-rank delta on {d.param}: u v^T is {d.shape}, the "
                                      f"parameter {tuple(p.shape)}")
                continue
            expect = list(p.shape)
            if d.dim >= p.ndim:
                raise ConfigError(f"{d.param} has {p.ndim} dims; delta indexes dim {d.dim}")
            expect[d.dim] = d.index.numel()
            if list(d.values.shape) != expect:
                raise ConfigError(f"delta on {d.param}: values {tuple(d.values.shape)} do not fit the "
                                  f"parameter {tuple(p.shape)} (expected {tuple(expect)})")
            if d.index.numel() and int(d.index.max()) >= p.shape[d.dim]:
                raise ConfigError(f"delta on {d.param}: index {int(d.index.max())} out of range "
                                  f"{p.shape[d.dim]} along dim {d.dim}")

    # ------------------------------------------------------------------ materialise
    @contextmanager
    def applied(self, model: "HookedTransformer", *, strict: bool = True) -> Iterator["HookedTransformer"]:
        """Add the deltas to the weights for the duration of the block; on exit (also on error) the
        exact original slices are written back, bit for bit."""
        self.check(model, strict=strict)
        saved: list[tuple[Tensor, int | None, Tensor | None, Tensor]] = []
        try:
            with torch.no_grad():
                for d in self.deltas:
                    p = _param(model, d.param)
                    if isinstance(d, LowRankDelta):  # keep the whole matrix: exact undo
                        orig = p.data.clone()
                        saved.append((p, None, None, orig))
                        p.data.copy_(orig + (d.u.to(p.device, torch.float32)
                                             @ d.v.to(p.device, torch.float32).T).to(p.dtype))
                        continue
                    idx = d.index.to(p.device)
                    orig = p.data.index_select(d.dim, idx).clone()
                    saved.append((p, d.dim, idx, orig))
                    p.data.index_copy_(d.dim, idx, orig + d.values.to(p.device, p.dtype))
            yield model
        finally:
            with torch.no_grad():
                for p, dim, idx, orig in reversed(saved):
                    if dim is None:
                        p.data.copy_(orig)
                    else:
                        p.data.index_copy_(dim, idx, orig)

    # ------------------------------------------------------------------ hooks
    def hooks(self, model: "HookedTransformer", *, strict: bool = True) -> H.HookList:
        """Hooks that add the edit's effect to the forward pass, leaving the weights untouched.

        Use inside ``with model.hooks(fwd_hooks=...)``. Supported: W_out rows, W_in / W_gate
        columns, W_Q / W_K / W_V / W_O head slices (their natural dims) and low-rank MLP deltas;
        anything else raises ConfigError (use :meth:`applied`).
        """
        self.check(model, strict=strict)
        return delta_hooks(model, self.deltas)

    # ------------------------------------------------------------------ io
    def save(self, path: str | Path) -> Path:
        """Write ``path/edit.safetensors`` and ``path/edit.json`` (the manifest); returns ``path``."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        entries = []
        for k, d in enumerate(self.deltas):
            if isinstance(d, LowRankDelta):
                tensors[f"d{k}.u"] = d.u.contiguous()
                tensors[f"d{k}.v"] = d.v.contiguous()
                entries.append({"key": f"d{k}", "type": "low_rank", "param": d.param,
                                "rank": d.rank, "shape": list(d.shape),
                                "dtype": str(d.u.dtype).replace("torch.", "")})
                continue
            tensors[f"d{k}.index"] = d.index.contiguous()
            tensors[f"d{k}.values"] = d.values.contiguous()
            entries.append({"key": f"d{k}", "type": "slices", "param": d.param, "dim": d.dim,
                            "n_slices": int(d.index.numel()), "shape": list(d.values.shape),
                            "dtype": str(d.values.dtype).replace("torch.", "")})
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "description": self.description, "method": self.method,
            "model": None if self.model is None else self.model.to_dict(),
            "config": self.config, "n_params": self.n_params, "n_stored": self.n_stored,
            "deltas": entries,
        }
        save_file(tensors, str(folder / TENSORS), metadata={"format": FORMAT})
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "Edit":
        """Read an edit written by :meth:`save`."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / MANIFEST).exists() or not (folder / TENSORS).exists():
            raise DataFileError(f"{folder} is not a saved edit: expected {MANIFEST} and {TENSORS}")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{folder / MANIFEST} is not valid JSON: {exc}") from exc
        if manifest.get("format") != FORMAT or manifest.get("format_version") not in (1, FORMAT_VERSION):
            raise DataFileError(f"{folder / MANIFEST}: not a {FORMAT} manifest of version 1 or "
                                f"{FORMAT_VERSION} (got {manifest.get('format_version')!r})")
        tensors = load_file(str(folder / TENSORS))
        try:
            deltas = tuple(
                LowRankDelta(e["param"], tensors[e["key"] + ".u"], tensors[e["key"] + ".v"])
                if e.get("type") == "low_rank" else
                WeightDelta(e["param"], int(e["dim"]), tensors[e["key"] + ".index"],
                            tensors[e["key"] + ".values"]) for e in manifest["deltas"])
        except KeyError as exc:
            raise DataFileError(f"{folder}: manifest and tensors disagree (missing {exc})") from exc
        info = manifest.get("model")
        if info is not None:  # tolerate manifests written by other kn-lens versions
            known = {f.name for f in dataclasses.fields(ModelInfo)}
            info = ModelInfo(**{k: v for k, v in info.items() if k in known})
        return cls(deltas, manifest.get("description", ""), manifest.get("method", ""), info,
                   manifest.get("config", {}))


# What an edit's deltas depend on: the weights as loaded (model, sizes, weight processing), not
# where or how the model computes (device, dtype, backend: a HookedTransformer and a bridge of
# the same folder have the same processed weights).
_WEIGHT_KEYS = ("name", "n_layers", "d_model", "d_mlp", "fold_ln", "center_writing_weights",
                "center_unembed")


def _weights_of(info: ModelInfo) -> tuple:
    return tuple(getattr(info, k) for k in _WEIGHT_KEYS)


def compose(edits: Iterable[Edit], description: str | None = None) -> Edit:
    """One edit with the summed deltas of ``edits`` (deltas on the same slice add)."""
    edits = list(edits)
    infos = [e.model for e in edits if e.model is not None]
    models = {_weights_of(m): m for m in reversed(infos)}  # the first edit's info per weights
    if len(models) > 1:
        raise ConfigError(f"cannot compose edits made for different models or weight processing: "
                          f"{sorted(models)}")
    deltas = _merge(tuple(d for e in edits for d in e.deltas))
    desc = description if description is not None else " + ".join(e.description for e in edits
                                                                    if e.description)
    methods = sorted({e.method for e in edits if e.method})
    return Edit(deltas, desc, "+".join(methods), next(iter(models.values()), None),
                {"composed_of": [{"description": e.description, "method": e.method,
                                  "config": e.config} for e in edits]})


def _merge_key(d: Delta) -> tuple[str, object]:
    return (d.param, "low_rank") if isinstance(d, LowRankDelta) else (d.param, d.dim)


def _merge(deltas: tuple[Delta, ...]) -> tuple[Delta, ...]:
    """One delta per (param, dim) for slices (values on the same slice add) and one per param for
    low-rank deltas (factors concatenated: u1 v1^T + u2 v2^T = [u1 u2] [v1 v2]^T), in order of
    first appearance."""
    groups: dict[tuple[str, object], list] = {}
    for d in deltas:
        groups.setdefault(_merge_key(d), []).append(d)
    out: list[Delta] = []
    for (param, dim), ds in groups.items():
        if len(ds) == 1:
            out.append(ds[0])
            continue
        if dim == "low_rank":
            dtype = ds[0].u.dtype
            for d in ds[1:]:
                dtype = torch.promote_types(dtype, d.u.dtype)
            out.append(LowRankDelta(param, torch.cat([d.u.to(dtype) for d in ds], 1),
                                    torch.cat([d.v.to(dtype) for d in ds], 1)))
            continue
        dtype = ds[0].values.dtype
        for d in ds[1:]:
            dtype = torch.promote_types(dtype, d.values.dtype)
        index = torch.cat([d.index for d in ds])
        values = torch.cat([d.values.to(dtype) for d in ds], dim=dim)
        uniq, inverse = torch.unique(index, sorted=True, return_inverse=True)
        shape = list(values.shape)
        shape[dim] = uniq.numel()
        summed = torch.zeros(shape, dtype=dtype, device="cpu").index_add_(dim, inverse, values)
        out.append(WeightDelta(param, dim, uniq, summed))
    return tuple(out)


# --------------------------------------------------------------------------- hook construction


def _param(model, name: str, *, writable: bool = True) -> Tensor:
    """The weight ``name`` (``blocks.5.mlp.W_out``) in TransformerLens' layout, as a tensor whose
    in-place writes reach the weights the forward pass reads (a parameter, or on a
    TransformerBridge a view of its Hugging Face weight; ``writable=False`` when only its shape,
    dtype or values are read)."""
    if is_bridge(model):
        parsed = parse_param(name)
        if parsed is None:
            raise ConfigError(f"the bridge has no weight {name!r}: kn-lens edits blocks.<l>.mlp."
                              "W_out / W_in / W_gate and blocks.<l>.attn.W_Q / W_K / W_V / W_O")
        return bridge_weight(model, name, *parsed, writable=writable)
    try:  # attribute walk: much cheaper than listing every parameter
        p = model.get_parameter(name)
        if p is not None:
            return p
    except AttributeError:
        pass
    params = dict(model.named_parameters())
    if name in params:
        return params[name]
    # grouped-query attention stores K/V as _W_K/_W_V: accept either spelling
    alt = re.sub(r"\.(W_K|W_V)$", r"._\1", name) if "._" not in name else name.replace("._", ".")
    if alt in params:
        return params[alt]
    raise ConfigError(f"the model has no parameter {name!r} (e.g. {next(iter(params))!r})")


def _ln_apply(model, ln, normalized: Tensor) -> Tensor:
    """Finish a (possibly unfolded) LayerNorm/RMSNorm from its hook_normalized output."""
    w, b = norm_weight(model, ln), norm_bias(model, ln)
    out = normalized
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out


def _unsupported(model) -> str | None:
    cfg = model.cfg
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:  # pragma: no cover - older TransformerLens
        POST_NORM_ARCHITECTURES = ()
    if architecture(model) in POST_NORM_ARCHITECTURES:
        return "post-norm blocks (the output norm is applied before hook_mlp_out)"
    if cfg.positional_embedding_type == "shortformer":
        return "shortformer positional embeddings"
    return None


OutputTerm = Callable[[Tensor], Tensor]  # like -> a term broadcastable to the block output


def delta_hooks(model: "HookedTransformer", deltas: Sequence[Any], *,
                outputs: dict[tuple[int, str], Sequence[OutputTerm]] | None = None) -> H.HookList:
    """Hooks that add ``deltas`` (slice or low-rank, see the module doc) to a forward pass.

    ``deltas`` are duck-typed: anything with ``param, dim, index, values`` is a slice delta,
    anything with ``param, u, v`` a low-rank one, so the optimisation loop can pass *trainable*
    tensors (gradients flow through the hooks to them; :class:`WeightDelta` detaches).
    ``outputs`` adds activation terms to a block's attention (``(layer, "attn")``) or MLP
    (``(layer, "mlp")``) output: each callable gets the output activation (for its shape, dtype
    and device) and returns a tensor to add (ROME's v* optimisation adds a vector at the
    subject's last token). On models that normalise block outputs (Gemma) every term is added to
    the *raw* output, before the norm, as the weights would act."""
    cfg = model.cfg
    store: dict[str, Tensor] = {}
    readers: dict[str, None] = {}  # hook names whose activations are cached (ordered set)
    inputs: dict[str, list] = {}  # target hook -> [(x_fn, unit_dim, index, values, einsum) | low-rank]
    out_terms: dict[tuple[int, str], list[OutputTerm]] = {}
    reason = _unsupported(model) if (deltas or outputs) else None
    post_norms = has_post_norms(model)

    def input_source(layer: int, which: str):
        """Returns a function store -> the block's MLP ("mlp") or attention ("attn") input."""
        ln = getattr(model.blocks[layer], "ln2" if which == "mlp" else "ln1")
        if cfg.normalization_type is None:
            name = H.resid_pre(layer) if (which == "attn" or cfg.parallel_attn_mlp) else H.resid_mid(layer)
            readers[name] = None
            return lambda: store[name]
        name = H.ln2_normalized(layer) if which == "mlp" else H.ln1_normalized(layer)
        readers[name] = None
        return lambda: _ln_apply(model, ln, store[name])

    def mlp_input_target(layer: int, kind: str) -> str:
        if kind == "W_gate" and not cfg.gated_mlp:
            raise ConfigError(f"blocks.{layer}.mlp.W_gate: the model's MLP is not gated")
        return H.mlp_pre_linear(layer) if (kind == "W_in" and cfg.gated_mlp) else H.mlp_pre(layer)

    for d in deltas:
        parsed = parse_param(d.param)
        low = hasattr(d, "u")
        if parsed is None or (not low and d.dim != _KINDS[parsed[1]][0]):
            raise ConfigError(
                f"delta on {d.param} along dim {getattr(d, 'dim', '?')} cannot be applied through "
                "hooks (supported: W_out rows, W_in/W_gate columns, W_Q/W_K/W_V/W_O heads, "
                "low-rank MLP matrices); use edit.applied(model)")
        if reason is not None:
            raise ConfigError(f"hook-applied edits do not support {reason}; use edit.applied(model)")
        layer, kind = parsed
        if low:
            if kind not in _LOW_RANK_KINDS:
                raise ConfigError(f"low-rank delta on {d.param}: only MLP matrices")
            u, v = d.u, d.v
            if kind == "W_out":
                name = H.mlp_post(layer)
                readers[name] = None
                out_terms.setdefault((layer, "mlp"), []).append(
                    lambda like, name=name, u=u, v=v: (store[name].to(like.dtype)
                                                       @ u.to(like.device, like.dtype))
                    @ v.to(like.device, like.dtype).T)
            else:
                inputs.setdefault(mlp_input_target(layer, kind), []).append(
                    (input_source(layer, "mlp"), None, None, (u, v), None))
            continue
        idx, vals = d.index, d.values
        if kind == "W_out":
            name = H.mlp_post(layer)
            readers[name] = None
            out_terms.setdefault((layer, "mlp"), []).append(
                lambda like, name=name, idx=idx, vals=vals: _index_last(store[name], idx).to(
                    like.dtype) @ vals.to(like.device, like.dtype))
        elif kind == "W_O":
            name = H.attn_z(layer)
            readers[name] = None
            out_terms.setdefault((layer, "attn"), []).append(
                lambda like, name=name, idx=idx, vals=vals: torch.einsum(
                    "bphe,hem->bpm", store[name].index_select(2, idx.to(store[name].device)).to(
                        like.dtype), vals.to(like.device, like.dtype)))
        elif kind in ("W_in", "W_gate"):
            inputs.setdefault(mlp_input_target(layer, kind), []).append(
                (input_source(layer, "mlp"), -1, idx, vals, "bpd,dk->bpk"))
        else:  # W_Q / W_K / W_V
            if cfg.use_split_qkv_input or cfg.use_attn_in:
                raise ConfigError(f"{d.param}: hook-applied Q/K/V deltas need the plain attention "
                                  "input (use_split_qkv_input / use_attn_in are on); use edit.applied")
            target = {"W_Q": H.attn_q, "W_K": H.attn_k, "W_V": H.attn_v}[kind](layer)
            inputs.setdefault(target, []).append((input_source(layer, "attn"), 2, idx, vals, "bpd,kde->bpke"))

    for key, terms in (outputs or {}).items():
        layer, which = key
        if which not in ("mlp", "attn") or not 0 <= int(layer) < cfg.n_layers:
            raise ConfigError(f"output terms go to (layer, 'mlp' | 'attn') of a block, not {key!r}")
        if reason is not None:
            raise ConfigError(f"hook-applied edits do not support {reason}")
        out_terms.setdefault((int(layer), which), []).extend(terms)

    hook_list: H.HookList = []
    for name in readers:
        def cache(act, hook, name=name):
            store[name] = act
        hook_list.append((name, cache))

    for target, items in inputs.items():
        def add_input(act, hook, items=items):
            for x_fn, unit_dim, idx, vals, eq in items:
                x = x_fn().to(act.dtype)
                if eq is None:  # low-rank: x @ u @ v^T
                    u, v = vals
                    act = act + (x @ u.to(act.device, act.dtype)) @ v.to(act.device, act.dtype).T
                    continue
                term = torch.einsum(eq, x, vals.to(act.device, act.dtype))
                act = act.index_add(unit_dim % act.ndim, idx.to(act.device), term)
            return act
        hook_list.append((target, add_input))

    for (layer, which), terms in out_terms.items():
        def total(like, terms=terms):
            out = terms[0](like)
            for t in terms[1:]:
                out = out + t(like)
            return out
        if post_norms:
            ln_post = getattr(model.blocks[layer], "ln2_post" if which == "mlp" else "ln1_post")
            scale_name = H.ln2_post_scale(layer) if which == "mlp" else H.ln1_post_scale(layer)
            norm_name = H.ln2_post_normalized(layer) if which == "mlp" else H.ln1_post_normalized(layer)
            centred = "RMS" not in type(ln_post).__name__
            eps = float(getattr(ln_post, "eps", cfg.eps))

            def cache_scale(act, hook, scale_name=scale_name):
                store[scale_name] = act
            hook_list.append((scale_name, cache_scale))

            def renorm(act, hook, scale_name=scale_name, total=total, centred=centred, eps=eps):
                raw = act * store[scale_name] + total(act).to(act.dtype)  # (centred) raw output + delta
                if centred:
                    raw = raw - raw.mean(-1, keepdim=True)
                return raw / (raw.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            hook_list.append((norm_name, renorm))
        else:
            out_name = H.mlp_out(layer) if which == "mlp" else H.attn_out(layer)

            def add_output(act, hook, total=total):
                return act + total(act).to(act.dtype)
            hook_list.append((out_name, add_output))
    return hook_list


def _index_last(t: Tensor, idx: Tensor) -> Tensor:
    return t.index_select(-1, idx.to(t.device))

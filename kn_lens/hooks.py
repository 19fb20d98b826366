"""The one place that spells hook names, and small hook factories.

Every factory returns a list of ``(hook_name, fn)`` pairs for ``model.hooks(fwd_hooks=...)``;
composition is list concatenation. Nothing here adds a hook to a model.

A "neuron" is a unit of ``blocks.{l}.mlp.hook_post``: for gated MLPs that is act(gate) * up, the
vector W_out reads.
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from kn_lens.neurons import Neuron

HookList = list[tuple[str, Callable]]


def mlp_post(layer: int) -> str:
    """FFN neuron activations (what W_out reads): ``blocks.{layer}.mlp.hook_post``."""
    return f"blocks.{layer}.mlp.hook_post"


def mlp_pre(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_pre"


def mlp_out(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def attn_pattern(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def attn_out(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def resid_mid(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_mid"


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def embed() -> str:
    return "hook_embed"


def ln_final_scale() -> str:
    return "ln_final.hook_scale"


def layer_of(hook_name: str) -> int:
    """``"blocks.7.mlp.hook_post"`` -> 7."""
    parts = hook_name.split(".")
    return int(parts[1])


def _by_layer(neurons: Iterable["Neuron"]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for n in neurons:
        groups[int(n.layer)].append(int(n.index))
    return dict(groups)


def _positions_index(positions: Sequence[int] | int | None):
    if positions is None:
        return slice(None)
    if isinstance(positions, int):
        return [positions]
    return list(positions)


def scale_neurons(neurons: Iterable["Neuron"], factor: float,
                  positions: Sequence[int] | int | None = None) -> HookList:
    """Multiply the neurons' activations by ``factor`` (0 suppresses, 2 enhances) at ``positions``
    (all positions by default)."""
    neurons = list(neurons)
    return set_neurons(neurons, None, positions, factor=factor)


def set_neurons(neurons: Iterable["Neuron"], values: Tensor | float | None,
                positions: Sequence[int] | int | None = None, *, factor: float = 0.0) -> HookList:
    """Set the neurons' activations to ``values`` (a scalar, or one value per neuron in the order
    given) at ``positions`` (all by default). With ``values=None`` they are multiplied by
    ``factor`` instead."""
    neurons = list(neurons)
    vals = None
    if values is not None:
        vals = values.float() if isinstance(values, Tensor) else \
            torch.as_tensor(values, dtype=torch.float32, device="cpu")
        vals = vals.expand(len(neurons)) if vals.ndim == 0 else vals
        if vals.numel() != len(neurons):
            raise ValueError(f"{vals.numel()} values for {len(neurons)} neurons")
    per_layer: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for k, n in enumerate(neurons):
        per_layer[int(n.layer)][0].append(int(n.index))
        per_layer[int(n.layer)][1].append(k)
    pos = _positions_index(positions)
    hooks: HookList = []
    for layer, (idx, order) in sorted(per_layer.items()):
        index = torch.tensor(idx, dtype=torch.long, device="cpu")
        value = None if vals is None else vals[torch.tensor(order, device=vals.device)]

        def fn(act: Tensor, hook, index=index, value=value) -> Tensor:
            act = act.clone()
            sel = act[:, pos]  # a copy when pos is a list
            i = index.to(act.device)
            if value is None:
                sel[..., i] = sel[..., i] * factor
            else:
                sel[..., i] = value.to(act.device, act.dtype)
            act[:, pos] = sel
            return act

        hooks.append((mlp_post(layer), fn))
    return hooks


def patch_activations(name: str, source: Tensor, index: Tensor | None = None,
                      positions: Sequence[int] | int | None = None) -> HookList:
    """Replace activations at hook ``name`` with ``source`` (broadcast over batch) for the given
    last-dimension ``index`` (all units when None) and ``positions``."""
    pos = _positions_index(positions)

    def fn(act: Tensor, hook) -> Tensor:
        act = act.clone()
        src = source.to(act.device, act.dtype)
        view = act[:, pos]
        src_view = src[:, pos] if src.ndim == act.ndim else src
        if index is None:
            view[...] = src_view
        else:
            view[..., index] = src_view[..., index]
        act[:, pos] = view
        return act

    return [(name, fn)]


def add_to(name: str, delta: Tensor) -> HookList:
    """Add ``delta`` (broadcastable to the activation) at hook ``name``."""

    def fn(act: Tensor, hook) -> Tensor:
        return act + delta.to(act.device, act.dtype)

    return [(name, fn)]


def cache_hook(name: str, store: dict, detach: bool = True) -> HookList:
    """Record the activation at ``name`` into ``store[name]``."""

    def fn(act: Tensor, hook) -> None:
        store[name] = act.detach() if detach else act

    return [(name, fn)]


def active_hook_count(model) -> int:
    """How many forward/backward hooks are attached to any hook point (0 means nothing leaked)."""
    total = 0
    for hp in model.hook_dict.values():
        total += len(hp._forward_hooks) + len(hp._backward_hooks) + len(
            getattr(hp, "_forward_pre_hooks", {}))
    return total


# --------------------------------------------------------------------------- names used by edit.delta
# (appended for kn_lens.edit: weight deltas applied through hooks)


def mlp_pre_linear(layer: int) -> str:
    """Gated MLPs: the up projection ``x @ W_in`` (``hook_pre`` is the gate ``x @ W_gate``)."""
    return f"blocks.{layer}.mlp.hook_pre_linear"


def ln1_normalized(layer: int) -> str:
    """Normalised attention input (before the LN weight, which fold_ln folds into W_Q/W_K/W_V)."""
    return f"blocks.{layer}.ln1.hook_normalized"


def ln2_normalized(layer: int) -> str:
    """Normalised MLP input (before the LN weight, which fold_ln folds into W_in/W_gate)."""
    return f"blocks.{layer}.ln2.hook_normalized"


def ln1_post_scale(layer: int) -> str:
    """Models that normalise block outputs (Gemma): the scale of the attention output's norm."""
    return f"blocks.{layer}.ln1_post.hook_scale"


def ln1_post_normalized(layer: int) -> str:
    return f"blocks.{layer}.ln1_post.hook_normalized"


def ln2_post_scale(layer: int) -> str:
    """Models that normalise block outputs (Gemma): the scale of the MLP output's norm."""
    return f"blocks.{layer}.ln2_post.hook_scale"


def ln2_post_normalized(layer: int) -> str:
    return f"blocks.{layer}.ln2_post.hook_normalized"


def attn_q(layer: int) -> str:
    """Queries before rotary: ``[batch, pos, head, d_head]``."""
    return f"blocks.{layer}.attn.hook_q"


def attn_k(layer: int) -> str:
    """Keys before rotary: ``[batch, pos, kv_head, d_head]`` (kv heads for grouped-query attention)."""
    return f"blocks.{layer}.attn.hook_k"


def attn_v(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_v"


def attn_z(layer: int) -> str:
    """Per-head attention result that W_O reads: ``[batch, pos, head, d_head]``."""
    return f"blocks.{layer}.attn.hook_z"

"""What differs between the two model classes kn-lens computes with, in one place.

``load_model(backend="hooked")`` gives a TransformerLens ``HookedTransformer``;
``backend="bridge"`` a ``TransformerBridge`` in compatibility mode (the model class TransformerLens
4 keeps; 3.9 ships it under ``transformer_lens.model_bridge``). Both fire the same hook points
(``blocks.{l}.mlp.hook_post``, ``hook_resid_pre``, ``attn.hook_pattern``, ...) on the same
processed weights, so every locator, hook factory, scorer and edit is written once. What the
bridge does not have, and what kn-lens does instead:

- no ``start_at_layer`` and no TransformerLens key/value cache or block-by-block calls (Hugging
  Face owns the layer loop): the fast paths that restart at a block (IG, exact mediation, the
  editing loop, prepared perplexity) and cached generation run whole forwards on a bridge;
- ``stop_at_layer`` does not mean what it means on a HookedTransformer (``n_layers`` returns
  logits, not the final residual stream; in TransformerLens 4 a block's ``hook_resid_post`` may not
  fire before the stop): the scorer reads the rows it needs from the full logits, and forwards
  that only collect activations run to the end (:func:`stop_before`);
- weights are properties over the wrapped Hugging Face modules (``W_out`` is ``out.weight.T``):
  :func:`weight` returns those views, so an edit materialised in them reaches the forward pass;
- the embedding table is Hugging Face's raw one (Gemma scales it in the forward):
  :func:`embedding_matrix` gives what the residual stream receives;
- norms keep Hugging Face's parametrisation (Gemma stores ``weight`` as an offset from 1):
  :func:`norm_weight` gives the gain the norm applies, for either backend;
- a hook name the bridge lacks is skipped silently by TransformerLens 3.9's ``bridge.hooks``:
  :func:`guard_bridge_hooks` (installed by ``load_model``) makes it a :class:`ConfigError`, as on
  a HookedTransformer.
"""
from __future__ import annotations

import types

from torch import Tensor

from kn_lens.errors import ConfigError


def is_bridge(model) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (``backend="bridge"``).

    Code that needs HookedTransformer internals (``start_at_layer``, TransformerLens key/value
    caches, calling blocks one by one) asks this and takes its whole-forward path on a bridge."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - TransformerLens without the bridge
        return False
    return isinstance(model, TransformerBridge)


def has_post_norms(model) -> bool:
    """Whether the blocks normalise their attention and MLP outputs before the residual (Gemma
    2/3: ``ln1_post`` / ``ln2_post``). A HookedTransformer says so in its config; a bridge's
    config does not carry the flag, its blocks have the modules."""
    if getattr(model.cfg, "use_normalization_before_and_after", False):
        return True
    return is_bridge(model) and hasattr(model.blocks[0], "ln2_post")


def stop_before(model, layer: int) -> dict:
    """Keyword arguments that end a forward pass before block ``layer`` (or the unembedding) when
    only activations of earlier blocks are read: HookedTransformer's ``stop_at_layer``; none on a bridge, whose
    ``stop_at_layer`` differs between TransformerLens versions (the whole forward, the same
    activations)."""
    if is_bridge(model):
        return {}
    return {"stop_at_layer": min(layer, model.cfg.n_layers)}  # n_layers: no unembedding


def architecture(model) -> str | None:
    """The Hugging Face architecture name (``"LlamaForCausalLM"``), for either backend."""
    cfg = model.cfg
    return getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None)


def embedding_matrix(model, rows: slice | Tensor | None = None) -> Tensor:
    """The token embeddings as the residual stream receives them, ``[d_vocab, d_model]`` (or
    only ``rows``). A HookedTransformer folds an embedding scale into ``W_E`` (Gemma's
    sqrt(d_model)); a bridge's ``W_E`` is Hugging Face's raw table and its embedding module
    scales on the fly (``embed_scale``), applied here."""
    w = model.W_E if rows is None else model.W_E[rows]
    if is_bridge(model):
        scale = getattr(getattr(model.embed, "original_component", None), "embed_scale", None)
        if scale is not None:
            w = w * scale.to(w.dtype) if isinstance(scale, Tensor) else w * float(scale)
    return w


def norm_weight(model, ln) -> Tensor | None:
    """The gain a norm module multiplies its normalised input by (None: no gain, e.g. a
    HookedTransformer's ``RMSNormPre`` after folding). A bridge's Gemma norms store Hugging
    Face's offset ``weight`` (the gain is ``1 + weight``); the config says so."""
    if is_bridge(model):
        w = getattr(ln, "weight", None)
        if w is None:
            return None
        return 1.0 + w if getattr(model.cfg, "rmsnorm_uses_offset", False) else w
    w = getattr(ln, "w", None)
    return w if isinstance(w, Tensor) else None


def norm_bias(model, ln) -> Tensor | None:
    """The bias a LayerNorm adds after its gain (None for RMS norms and folded norms)."""
    b = getattr(ln, "bias" if is_bridge(model) else "b", None)
    return b if isinstance(b, Tensor) else None


# the bridge submodule that stores each kind's weight (q, k, v, o, in, gate, out)
_BRIDGE_SUB = {"W_out": "out", "W_in": "in", "W_gate": "gate", "W_Q": "q", "W_K": "k",
               "W_V": "v", "W_O": "o"}


def bridge_weight(model, name: str, layer: int, kind: str, *, writable: bool = True) -> Tensor:
    """A TransformerBridge's weight ``name`` (``blocks.{layer}.mlp.{kind}``) in TransformerLens'
    layout (``mlp.W_out`` is ``[d_mlp, d_model]``, ``attn.W_K`` ``[kv_head, d_model, d_head]``):
    the bridge's own property, a view of the wrapped Hugging Face weight (transposed for
    ``nn.Linear``, reshaped per head), so in-place writes reach the forward pass. A property that
    is a copy (a fused or quantised weight) cannot take an edit in place: a typed error names
    it (``writable=False``: only its shape is needed, a copy will do)."""
    if not 0 <= layer < model.cfg.n_layers:
        raise ConfigError(f"{name}: the model has {model.cfg.n_layers} blocks")
    module = getattr(model.blocks[layer], "mlp" if kind in ("W_out", "W_in", "W_gate") else "attn")
    stored = getattr(getattr(module, _BRIDGE_SUB[kind], None), "weight", None)
    try:
        view = getattr(module, kind)
    except AttributeError:
        view = None
    if view is None or stored is None:
        raise ConfigError(f"{name}: this TransformerBridge ({architecture(model)}) has no "
                          f"separate {kind} weight (e.g. a fused projection); editing it needs "
                          "backend='hooked'")
    if writable and view.untyped_storage().data_ptr() != stored.untyped_storage().data_ptr():
        raise ConfigError(f"{name}: this TransformerBridge ({architecture(model)}) computes "
                          f"{kind} from its stored weights instead of viewing them, so an edit "
                          "cannot be written into it: apply the edit with edit.hooks(model), "
                          "or load the model with backend='hooked'")
    return view


def guard_bridge_hooks(bridge) -> None:
    """Make ``bridge.hooks(...)`` refuse hook names the bridge does not have, as a
    HookedTransformer does (TransformerLens 3.9's bridge skips them silently, which would turn a
    missing hook point into a silently wrong result; 4.x raises a KeyError, here a ConfigError
    on either). Set on this instance only."""
    original = type(bridge).hooks

    def hooks(self, fwd_hooks=(), bwd_hooks=(), *args, **kwargs):
        fwd_hooks, bwd_hooks = list(fwd_hooks), list(bwd_hooks)
        known = self.hook_dict  # in compatibility mode: the HookedTransformer names too
        for name, _ in fwd_hooks + bwd_hooks:
            if isinstance(name, str) and name not in known and self.get_hook_point(name) is None:
                raise ConfigError(
                    f"hook point {name!r} does not exist on this TransformerBridge "
                    f"({architecture(self)}); kn-lens needs it for this computation. Load "
                    "the model with backend='hooked'.")
        return original(self, fwd_hooks, bwd_hooks, *args, **kwargs)

    bridge.__dict__["hooks"] = types.MethodType(hooks, bridge)

"""Faster TransformerLens forwards with the same hook points and the same arithmetic.

TransformerLens 3.9's gated MLP and unembedding call ``F.linear(x, W.T.contiguous())`` on every
forward (to match Hugging Face's bfloat16 accumulation order), copying every MLP matrix and the
whole unembedding (49k x 576 floats for SmolLM2, 262k x 640 for Gemma-3) per call: half the time of
a one-token generation step on CPU. ``x @ W`` computes the same product from the stored layout
(float32 results agree to rounding). :func:`fast_forward` gives the model's gated MLPs and its
unembedding such forwards as *instance* attributes for the duration of a ``with`` block and
removes them in ``finally``; nested use is a no-op.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch
from jaxtyping import Float
from torch import Tensor


def mlp_forward(mlp, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
    """TransformerLens' gated MLP without its per-call ``W.T.contiguous()`` weight copies (same
    hook points, same arithmetic); any other MLP runs as is."""
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    if type(mlp) is not GatedMLP or mlp.cfg.is_layer_norm_activation():
        return mlp(x)
    pre_act = mlp.hook_pre(x @ mlp.W_gate)
    pre_linear = mlp.hook_pre_linear(x @ mlp.W_in)
    post = mlp.hook_post(mlp.act_fn(pre_act) * pre_linear + mlp.b_in)
    return torch.nn.functional.linear(post, mlp.W_out.T, mlp.b_out)


def _unembed_forward(self, residual: Tensor) -> Tensor:
    return self.hook_out(self.hook_in(residual) @ self.W_U + self.b_U)


@contextmanager
def fast_forward(model) -> Iterator:
    """Scope in which ``model``'s gated MLPs and unembedding skip the weight copies."""
    from transformer_lens.components import Unembed
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    patched = []
    try:
        for block in model.blocks:
            mlp = block.mlp
            if type(mlp) is GatedMLP and not mlp.cfg.is_layer_norm_activation() \
                    and "forward" not in vars(mlp):
                mlp.forward = types.MethodType(mlp_forward, mlp)
                patched.append(mlp)
        ue = getattr(model, "unembed", None)
        if type(ue) is Unembed and "forward" not in vars(ue):
            ue.forward = types.MethodType(_unembed_forward, ue)
            patched.append(ue)
        yield model
    finally:
        for mod in patched:
            del mod.forward

"""Faster TransformerLens forwards with the same hook points and the same arithmetic.

TransformerLens 3.9 copies weights on every forward: its gated MLP and unembedding call
``F.linear(x, W.T.contiguous())`` (to match Hugging Face's bfloat16 accumulation order), copying
every MLP matrix and the whole unembedding (49k x 576 floats for SmolLM2, 262k x 640 for Gemma-3)
per call, and its attention rearranges W_Q / W_K / W_V to ``(head d_head) d_model`` and W_O to
``d_model (head d_head)`` with strided copies per call. On CPU the MLP and unembedding copies are
half the time of a one-token generation step; the attention copies were ~1 s of a 7.6 s FT-L edit
on SmolLM2 (profiled, 1 thread).
:func:`fast_forward` gives the model's gated MLPs, attention layers and unembedding forwards that
compute the same products from the stored layout (float32 results agree to rounding; every hook
point fires with the same shapes) as *instance* attributes for the duration of a ``with`` block and
removes them in ``finally``; nested use is a no-op. Attention falls back to TransformerLens' own
code for any configuration the fast path does not cover (split q/k/v inputs, per-head results,
4-bit weights, ALiBi / relative biases, attention sinks, QK clipping, log-n scaling).
A TransformerBridge runs as it is (its modules are Hugging Face's, not TransformerLens').
``fast_forward(model, frozen_weights=True)`` (the optimisation loop, scoring, generation and
perplexity, none of which writes a weight) also projects q, k and v with one matmul on a fused
W_Q | W_K | W_V copy per layer, made on first use and dropped at exit (ROME v* 4.95 -> 4.65 s per
edit on SmolLM2 at 2 threads); see :func:`_one_input` for when the three inputs may share it.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens.backend import is_bridge


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


_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _project(x: Float[Tensor, "batch pos d_model"], W: Float[Tensor, "head d_model d_head"],
             b: Float[Tensor, "head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
    n, d_in, d_head = W.shape
    return (x @ W.transpose(0, 1).reshape(d_in, n * d_head)).view(
        *x.shape[:-1], n, d_head) + b


def _fuse_qkv(W_Q, b_Q, W_K, b_K, W_V, b_V) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """W_Q | W_K | W_V as one ``d_model x (n_q + 2 n_kv) d_head`` matrix (a copy, detached)."""
    n_q, d_model, d_head = W_Q.shape
    n_kv = W_K.shape[0]
    W = torch.cat([w.detach().transpose(0, 1).reshape(d_model, -1) for w in (W_Q, W_K, W_V)], 1)
    b = torch.cat([x.detach().reshape(-1) for x in (b_Q, b_K, b_V)])
    return W, b, (n_q, n_kv, d_head)


def _one_input(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether q, k and v may be projected from one tensor: the same object, or (what a
    TransformerLens block passes: ``ln1`` applied three times) equal values that carry no
    gradient. With gradients equal values are not enough: a zero-initialised delta added to the
    key input alone leaves the values equal but is a different function of the delta, and one
    shared input would give it the query's gradient."""
    if q is k is v:
        return True
    if q.shape != k.shape or k.shape != v.shape:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return torch.equal(q, k) and torch.equal(k, v)


def qkv_forward(attn, query_input: Tensor, key_input: Tensor, value_input: Tensor):
    """``calculate_qkv_matrices`` without TransformerLens' strided weight copies (hook_q / k / v
    fire on the same tensors); split per-head inputs and 4-bit weights run as is."""
    cfg = attn.cfg
    if query_input.ndim != 3 or cfg.load_in_4bit or cfg.use_split_qkv_input or cfg.use_attn_in:
        return type(attn).calculate_qkv_matrices(attn, query_input, key_input, value_input)
    grouped = hasattr(attn, "_W_K") and not getattr(cfg, "ungroup_grouped_query_attention", False)
    W_K, b_K = (attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K)
    W_V, b_V = (attn._W_V, attn._b_V) if grouped else (attn.W_V, attn.b_V)
    fused = attn.__dict__.get("_kn_qkv", False)  # a frozen_weights scope: one cached matrix
    if fused is not False and _one_input(query_input, key_input, value_input) and not (
            torch.is_grad_enabled()
            and any(t.requires_grad for t in (attn.W_Q, attn.b_Q, W_K, b_K, W_V, b_V))):
        if fused is None:
            fused = _fuse_qkv(attn.W_Q, attn.b_Q, W_K, b_K, W_V, b_V)
            attn.__dict__["_kn_qkv"] = fused
        W, b, (n_q, n_kv, d_head) = fused
        out = query_input @ W + b
        nq = n_q * d_head
        nk = n_kv * d_head
        q = attn.hook_q(out[..., :nq].unflatten(-1, (n_q, d_head)))
        k = attn.hook_k(out[..., nq:nq + nk].unflatten(-1, (n_kv, d_head)))
        v = attn.hook_v(out[..., nq + nk:].unflatten(-1, (n_kv, d_head)))
    else:
        q = attn.hook_q(_project(query_input, attn.W_Q, attn.b_Q))
        k = attn.hook_k(_project(key_input, W_K, b_K))
        v = attn.hook_v(_project(value_input, W_V, b_V))
    if cfg.use_qk_norm:
        q = attn._apply_qk_norm(q, attn.q_norm)
        k = attn._apply_qk_norm(k, attn.k_norm)
    return q, k, v


def _attn_fast_ok(attn) -> bool:
    cfg = attn.cfg
    return (cfg.positional_embedding_type in ("standard", "rotary")
            and not (cfg.use_attn_result or cfg.load_in_4bit or cfg.use_split_qkv_input
                     or cfg.use_attn_in or cfg.use_attention_sinks)
            and cfg.clip_qkv is None and not cfg.use_logn_attn
            and cfg.original_architecture not in _OLMO)


def attn_forward(attn, query_input: Tensor, key_input: Tensor, value_input: Tensor,
                 past_kv_cache_entry=None, additive_attention_mask=None, attention_mask=None,
                 position_bias=None) -> Float[Tensor, "batch pos d_model"]:
    """TransformerLens' attention forward (same steps, same hook points) with the projections
    of :func:`qkv_forward` and ``W_O`` read as a view; any configuration outside
    :func:`_attn_fast_ok` (checked per call: ``use_attn_result`` can be switched on later) runs
    TransformerLens' own forward."""
    if not _attn_fast_ok(attn):
        return type(attn).forward(attn, query_input, key_input, value_input,
                                  past_kv_cache_entry, additive_attention_mask, attention_mask,
                                  position_bias)
    q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
    if past_kv_cache_entry is not None:
        offset = past_kv_cache_entry.past_keys.size(1)
        k, v = past_kv_cache_entry.append(k, v)
    else:
        offset = 0
    if attn.cfg.positional_embedding_type == "rotary":
        q = attn.hook_rot_q(attn.apply_rotary(q, offset, attention_mask))
        k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
    scores = attn.calculate_attention_scores(q, k)
    if (attn._attention_dir_override or attn.cfg.attention_dir) == "causal":
        scores = attn.apply_causal_mask(scores, offset, attention_mask)
    if additive_attention_mask is not None:
        scores = scores + additive_attention_mask
    scores = attn.hook_attn_scores(scores)
    pattern = torch.nn.functional.softmax(scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    pattern = attn.hook_pattern(pattern).to(device=v.device, dtype=v.dtype)
    z = attn.calculate_z_scores(v, pattern)  # hook_z fires here
    n, d_head, d_model = attn.W_O.shape
    z = z.reshape(z.shape[0], z.shape[1], n * d_head).to(attn.W_O.dtype)
    return torch.nn.functional.linear(z, attn.W_O.reshape(n * d_head, d_model).T, attn.b_O)


def _unembed_forward(self, residual: Tensor) -> Tensor:
    return self.hook_out(self.hook_in(residual) @ self.W_U + self.b_U)


@contextmanager
def fast_forward(model, *, frozen_weights: bool = False) -> Iterator:
    """Scope in which ``model``'s gated MLPs, attention and unembedding skip the weight copies.

    ``frozen_weights=True`` promises that no weight changes inside the scope (the optimisation
    loop, which trains deltas through hooks): each attention layer then computes q, k and v with
    one matmul on a fused copy of W_Q | W_K | W_V made on first use and dropped at exit. Weights
    that need gradients (``requires_grad`` with grad mode on) never use the copy. A weight
    changed inside such a scope would not be seen (``p.data`` writes bump no version counter,
    so the copy cannot check); that is why it is opt-in."""
    if is_bridge(model):  # Hugging Face modules behind the bridge: nothing of TransformerLens' to
        yield model  # replace (and TransformerLens 4 has no HookedTransformer components)
        return
    from transformer_lens.components import Attention, GroupedQueryAttention, Unembed
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    patched = []  # (module, attribute names set on the instance)
    try:
        for block in model.blocks:
            mlp = block.mlp
            if type(mlp) is GatedMLP and not mlp.cfg.is_layer_norm_activation() \
                    and "forward" not in vars(mlp):
                mlp.forward = types.MethodType(mlp_forward, mlp)
                patched.append((mlp, ("forward",)))
            attn = getattr(block, "attn", None)
            if type(attn) in (Attention, GroupedQueryAttention) and "forward" not in vars(attn):
                attn.forward = types.MethodType(attn_forward, attn)
                attn.calculate_qkv_matrices = types.MethodType(qkv_forward, attn)
                names = ("forward", "calculate_qkv_matrices")
                if frozen_weights:
                    attn.__dict__["_kn_qkv"] = None  # filled on first use
                    names += ("_kn_qkv",)
                patched.append((attn, names))
        ue = getattr(model, "unembed", None)
        if type(ue) is Unembed and "forward" not in vars(ue):
            ue.forward = types.MethodType(_unembed_forward, ue)
            patched.append((ue, ("forward",)))
        yield model
    finally:
        for mod, names in patched:
            for name in names:
                mod.__dict__.pop(name, None)

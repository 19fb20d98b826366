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

Computations that restart from cached state (integrated gradients, causal mediation, the
optimisation loop's frozen prefix) run blocks on a few suffix positions with
:func:`prefix_block`, which attends to prefix keys / values computed once
(:func:`relative_prefix_keys`: rotary folded into them) instead of copying, rotating and repeating
them per batch row, and normalises with :func:`norm` (RMS norms with a one-function backward);
per-row prefixes (the optimisation loop's) attend through ``scaled_dot_product_attention``, and
rotary runs without TransformerLens' per-call clone and slice writes (:func:`_rotary0`); with
these, ROME's v* steps went from 5.87 to 4.42 s per edit on SmolLM2 (17 requests, 2 threads).
:func:`answer_prob` is P(answer) from final residual rows with its gradient formed in the same
sweep over the vocabulary, never holding rows x vocabulary logits.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kn_lens.backend import is_bridge


def _bias(module, name: str) -> Tensor | None:
    """``module.<name>``, or None inside a ``frozen_weights`` scope when it is all zeros (adding
    it would change nothing; LLaMA-style models store zero biases), checked once per scope; kept
    when a gradient w.r.t. it may be asked for (as for the fused W_Q | W_K | W_V copy)."""
    b = getattr(module, name)
    zero = module.__dict__.get("_kn_zero_bias")
    if zero is None or b is None or (torch.is_grad_enabled() and b.requires_grad
                                     and not module.__dict__.get("_kn_no_weight_grads")):
        return b
    if name not in zero:
        zero[name] = not bool(b.detach().any())
    return None if zero[name] else b


def mlp_forward(mlp, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
    """TransformerLens' gated MLP without its per-call ``W.T.contiguous()`` weight copies (same
    hook points, same arithmetic); any other MLP runs as is."""
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    if type(mlp) is not GatedMLP or mlp.cfg.is_layer_norm_activation():
        return mlp(x)
    pre_act = mlp.hook_pre(x @ mlp.W_gate)
    pre_linear = mlp.hook_pre_linear(x @ mlp.W_in)
    post = mlp.act_fn(pre_act) * pre_linear
    b_in = _bias(mlp, "b_in")
    post = mlp.hook_post(post if b_in is None else post + b_in)
    return mlp_out_from_post(mlp, post)


_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _project(x: Float[Tensor, "batch pos d_model"], W: Float[Tensor, "head d_model d_head"],
             b: Float[Tensor, "head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
    n, d_in, d_head = W.shape
    return (x @ W.transpose(0, 1).reshape(d_in, n * d_head)).view(
        *x.shape[:-1], n, d_head) + b


def _fuse_qkv(W_Q, b_Q, W_K, b_K, W_V, b_V) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """W_Q | W_K | W_V as one ``d_model x (n_q + 2 n_kv) d_head`` matrix (a copy, detached), and
    the biases (None when all zero)."""
    n_q, d_model, d_head = W_Q.shape
    n_kv = W_K.shape[0]
    W = torch.cat([w.detach().transpose(0, 1).reshape(d_model, -1) for w in (W_Q, W_K, W_V)], 1)
    b = torch.cat([x.detach().reshape(-1) for x in (b_Q, b_K, b_V)])
    return W, (b if bool(b.any()) else None), (n_q, n_kv, d_head)


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
    weight_grads = torch.is_grad_enabled() and not attn.__dict__.get("_kn_no_weight_grads") and \
        any(t.requires_grad for t in (attn.W_Q, attn.b_Q, W_K, b_K, W_V, b_V))
    if fused is not False and not weight_grads:  # a frozen_weights scope: the fused copy
        if fused is None:
            fused = _fuse_qkv(attn.W_Q, attn.b_Q, W_K, b_K, W_V, b_V)
            attn.__dict__["_kn_qkv"] = fused
        W, b, (n_q, n_kv, d_head) = fused
        sizes = [n_q * d_head, n_kv * d_head, n_kv * d_head]
        if _one_input(query_input, key_input, value_input):
            out = query_input @ W if b is None else query_input @ W + b
            # split, not three slices: its backward is one concatenation, not three
            # zero-filled tensors summed
            q, k, v = out.split(sizes, dim=-1)
        else:  # separate inputs (gradients flow into them): matmuls on column views of W
            q, k, v = (x @ w if b is None else x @ w + c for x, w, c in zip(
                (query_input, key_input, value_input), W.split(sizes, dim=1),
                [None] * 3 if b is None else b.split(sizes)))
        q = attn.hook_q(q.unflatten(-1, (n_q, d_head)))
        k = attn.hook_k(k.unflatten(-1, (n_kv, d_head)))
        v = attn.hook_v(v.unflatten(-1, (n_kv, d_head)))
    else:
        q = attn.hook_q(_project(query_input, attn.W_Q, attn.b_Q))
        k = attn.hook_k(_project(key_input, W_K, b_K))
        v = attn.hook_v(_project(value_input, W_V, b_V))
    if cfg.use_qk_norm:
        q, k = _qk_norm(attn, q, attn.q_norm), _qk_norm(attn, k, attn.k_norm)
    return q, k, v


def _qk_norm(attn, x: Tensor, module) -> Tensor:
    """A q/k norm over ``d_head``: :func:`norm`, or TransformerLens' own when hooked (it runs the
    module on ``[-1, d_head]`` rows, the shape its hooks see)."""
    return norm(module, x) if _own_norm(module) else attn._apply_qk_norm(x, module)


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
        if offset == 0 and attention_mask is None:  # positions 0..: the same products, fewer ops
            q = attn.hook_rot_q(_rotary0(attn, q))
            k = attn.hook_rot_k(_rotary0(attn, k))
        else:
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
    return torch.nn.functional.linear(z, attn.W_O.reshape(n * d_head, d_model).T,
                                      _bias(attn, "b_O"))


def _unembed_forward(self, residual: Tensor) -> Tensor:
    return self.hook_out(self.hook_in(residual) @ self.W_U + self.b_U)


@contextmanager
def fast_forward(model, *, frozen_weights: bool = False, weight_grads: bool = True) -> Iterator:
    """Scope in which ``model``'s gated MLPs, attention and unembedding skip the weight copies.

    ``frozen_weights=True`` promises that no weight changes inside the scope (the optimisation
    loop, which trains deltas through hooks): each attention layer then computes q, k and v with
    one matmul on a fused copy of W_Q | W_K | W_V made on first use and dropped at exit, and
    all-zero biases are skipped (checked once). Weights that need gradients (``requires_grad``
    with grad mode on) never use the copy and are never skipped. A weight
    changed inside such a scope would not be seen (``p.data`` writes bump no version counter,
    so the copy cannot check); that is why it is opt-in. ``weight_grads=False`` (with
    ``frozen_weights``) further promises that no gradient w.r.t. a weight is asked for inside the
    scope (gradients w.r.t. activations only, as integrated gradients needs), so the fused copy is
    used with grad mode on even though the weights have ``requires_grad`` set."""
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
                names = ("forward",)
                if frozen_weights:
                    mlp.__dict__["_kn_zero_bias"] = {}  # filled on first use
                    names += ("_kn_zero_bias",)
                    if not weight_grads:
                        mlp.__dict__["_kn_no_weight_grads"] = True
                        names += ("_kn_no_weight_grads",)
                patched.append((mlp, names))
            attn = getattr(block, "attn", None)
            if type(attn) in (Attention, GroupedQueryAttention) and "forward" not in vars(attn):
                attn.forward = types.MethodType(attn_forward, attn)
                attn.calculate_qkv_matrices = types.MethodType(qkv_forward, attn)
                names = ("forward", "calculate_qkv_matrices")
                if frozen_weights:
                    attn.__dict__["_kn_qkv"] = None  # filled on first use
                    attn.__dict__["_kn_zero_bias"] = {}
                    names += ("_kn_qkv", "_kn_zero_bias")
                    if not weight_grads:
                        attn.__dict__["_kn_no_weight_grads"] = True
                        names += ("_kn_no_weight_grads",)
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


# ------------------------------------------------------------- suffixes over a cached prefix


def prefix_block_ok(model) -> bool:
    """Whether :func:`prefix_block` reproduces every block of ``model`` exactly: TransformerLens
    ``TransformerBlock``s (pre-norm, optionally Gemma's extra norms after attention and MLP, or
    GPT-J/NeoX's parallel attention and MLP) with standard or rotary positions (rotary as pure
    rotations: not YaRN's attention factor, not dynamic NTK), causal softmax attention as
    :func:`_attn_fast_ok` covers it (MHA or grouped-query, q/k norms, local windows, score
    soft-capping) and a dense (gated) MLP. Evaluated per call (attention flags such as
    ``use_attn_result`` can be switched on later). Never on a TransformerBridge (its blocks are
    Hugging Face layers behind hooks)."""
    if is_bridge(model):
        return False
    from transformer_lens.components import Attention, GroupedQueryAttention, TransformerBlock
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.components.mlps.mlp import MLP

    cfg = model.cfg
    if cfg.positional_embedding_type not in ("standard", "rotary") or cfg.attention_dir != "causal":
        return False
    if cfg.use_qk_norm and cfg.positional_embedding_type != "rotary":
        return False  # the keys callers can capture (hook_k) are from before the q/k norm
    yarn_scaled = getattr(cfg, "use_yarn_rope", False) and \
        getattr(cfg, "yarn_attention_factor", 1.0) != 1.0
    if cfg.attn_only or getattr(cfg, "use_dynamic_ntk_rope", False) or yarn_scaled:
        return False
    return all(type(b) is TransformerBlock and type(b.attn) in (Attention, GroupedQueryAttention)
               and _attn_fast_ok(b.attn) and type(b.mlp) in (MLP, GatedMLP)
               and (b.attn.attn_type != "local" or isinstance(cfg.window_size, int))
               for b in model.blocks)


def relative_prefix_keys(attn, keys: Float[Tensor, "... prefix kv_head d_head"], *,
                         rotated: bool = False) -> Float[Tensor, "... prefix kv_head d_head"]:
    """Prefix keys made ready for :func:`prefix_block`: rotated to their positions ``j`` and then
    back by the suffix's start ``P`` (the number of prefix slots), i.e. ``R_P^T R_j k_j``. A rotary
    score depends only on the relative position: ``(R_{P+i} q) . (R_j k) = (R_i q) . (R_P^T R_j
    k)``, so the suffix's queries and keys are rotated at positions ``0..`` (not at all for a
    single suffix position, ``R_0 = I``). ``keys``: as TransformerLens' key/value cache stores
    them (after any q/k norm, before rotary; ``hook_k`` fires *before* the q/k norm), or with
    ``rotated=True`` already rotated to their positions (``hook_rot_k``). Unchanged for
    non-rotary attention."""
    P = keys.shape[-3]
    if attn.cfg.positional_embedding_type != "rotary" or P == 0:
        return keys
    d_head = keys.shape[-1]
    eye = torch.eye(d_head, dtype=keys.dtype, device=keys.device)[:, None, None, :]
    back = attn.apply_rotary(eye, P)[:, 0, 0, :]  # row i = R_P e_i, i.e. the matrix R_P^T
    if not rotated:
        keys = attn.apply_rotary(keys if keys.ndim == 4 else keys[None], 0).reshape(keys.shape)
    return keys @ back.T  # rows k_j^T R_j^T R_P


def _mlp_in(block, resid: Tensor) -> Tensor:
    return block.hook_mlp_in(resid.clone()) if block.cfg.use_hook_mlp_in else resid


def prefix_block(block, x: Float[Tensor, "batch suffix d_model"],
                 keys: Float[Tensor, "... prefix kv_head d_head"],
                 values: Float[Tensor, "... prefix kv_head d_head"], *,
                 valid: Tensor | None = None, mask: Tensor | None = None
                 ) -> Float[Tensor, "batch suffix d_model"]:
    """One TransformerLens block (see :func:`prefix_block_ok`) on the suffix positions
    ``P..P+suffix-1`` of each batch row, attending to cached keys / values of prefix positions
    ``0..P-1``: keys through :func:`relative_prefix_keys`, as ``[P, kv_head, d_head]`` shared by
    every row (used once for the whole batch, never copied per row), or per row as
    ``[batch, P, kv_head, d_head]`` with ``valid [batch, P]`` marking real prefix slots. Only
    relative positions matter (rotary; absolute positions are already in the residual), so rows
    whose true prefixes are shorter than ``P`` may sit right-aligned with their slots masked.
    Same arithmetic as the block's own forward up to float rounding; the hook points of the
    residual stream, q / k / v (before rotary), z, the MLP and the block outputs fire on the same
    shapes (not the rotated q / k, attention scores or pattern: the prefix is split off here).
    ``mask``: :func:`prefix_mask` for this block's attention, when the caller runs many blocks
    (or steps) on the same rows and builds it once."""
    attn, cfg = block.attn, block.cfg
    b, s, _ = x.shape
    resid_pre = block.hook_resid_pre(x)
    h_in = norm(block.ln1, resid_pre)
    q, k, v = attn.calculate_qkv_matrices(h_in, h_in, h_in)  # k, v: kv heads, q/k norms applied
    if cfg.positional_embedding_type == "rotary" and s > 1:  # positions relative to P
        q = _rotary0(attn, q)
        k = _rotary0(attn, k)
    if s == 1 and keys.ndim == 3:
        z = _attend_one(attn, q, k, v, keys, values)
    else:
        z = _attend(attn, q, k, v, keys, values, valid, mask)
    n_q, dh = q.shape[2], q.shape[3]
    z = attn.hook_z(z)
    attn_out = z.reshape(b, s, n_q * dh) @ attn.W_O.reshape(n_q * dh, -1)
    b_O = _bias(attn, "b_O")
    if b_O is not None:
        attn_out = attn_out + b_O
    if cfg.use_normalization_before_and_after:
        attn_out = norm(block.ln1_post, attn_out)
    attn_out = block.hook_attn_out(attn_out)
    if cfg.parallel_attn_mlp:  # both read resid_pre; resid_post = (resid_pre + attn) + mlp
        mlp_out = mlp_forward(block.mlp, norm(block.ln2, _mlp_in(block, resid_pre)))
        return block_tail(block, mlp_out, resid_pre + attn_out)
    resid_mid = block.hook_resid_mid(resid_pre + attn_out)
    return block_tail(block, mlp_forward(block.mlp, norm(block.ln2, _mlp_in(block, resid_mid))),
                      resid_mid)


def _scores(attn, scores: Tensor) -> Tensor:
    from transformer_lens.utils import apply_softcap

    return apply_softcap(scores / attn.attn_scale, attn.cfg.attn_scores_soft_cap)


def prefix_mask(attn, s: int, P: int, valid: Tensor | None, device=None
                ) -> Bool[Tensor, "rows 1 suffix keys"]:
    """Which keys (``P`` prefix slots, then the ``s`` suffix positions) each suffix query may
    attend to: causal, the local window of a local-attention layer, and ``valid [batch, P]``
    (real prefix slots of right-aligned per-row prefixes). ``rows`` is the batch, or 1 without
    ``valid``."""
    cfg = attn.cfg
    q_slot = torch.arange(P, P + s, device=device)[:, None]
    k_slot = torch.arange(P + s, device=device)[None, :]
    mask = k_slot <= q_slot  # [suffix, prefix + suffix]
    if attn.attn_type == "local":
        mask = mask & (k_slot > q_slot - cfg.window_size)
    if valid is not None and P:
        b = valid.shape[0]
        mask = mask[None] & torch.cat([valid[:, None, :].expand(b, s, P),
                                       valid.new_ones(b, s, s)], dim=-1)
        return mask[:, None]
    return mask[None, None]


# scaled_dot_product_attention takes grouped-query heads (enable_gqa) from torch 2.5
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _attend(attn, q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor,
            valid: Tensor | None, mask: Tensor | None = None
            ) -> Float[Tensor, "batch suffix head d_head"]:
    """Attention of suffix queries over prefix keys/values (shared or per row) and the suffix's
    own keys/values, causal, with the local window and the per-row validity mask
    (:func:`prefix_mask`). Per-row prefixes (the optimisation loop) go through
    ``scaled_dot_product_attention`` on the concatenated keys (one fused kernel forward and
    backward: half the time of the einsums at ROME's shapes, same rounding level); shared
    prefixes, score soft-capping, and grouped-query heads before torch 2.5 use einsums."""
    cfg = attn.cfg
    b, s, n_q, dh = q.shape
    n_kv, P = k.shape[2], keys.shape[-3]
    if mask is None:
        mask = prefix_mask(attn, s, P, valid, q.device)
    if keys.ndim == 4 and not cfg.attn_scores_soft_cap and (n_kv == n_q or _SDPA_GQA):
        K = torch.cat([keys.to(q.dtype), k], dim=1).transpose(1, 2)
        V = torch.cat([values.to(v.dtype), v], dim=1).transpose(1, 2)
        z = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), K, V, attn_mask=mask, scale=1.0 / float(attn.attn_scale),
            **({"enable_gqa": True} if n_kv != n_q else {}))
        return z.transpose(1, 2).to(v.dtype)
    qg = q.reshape(b, s, n_kv, n_q // n_kv, dh)
    parts = [torch.einsum("bsngd,btnd->bngst", qg, k)]
    if P:
        prefix_eq = "bsngd,pnd->bngsp" if keys.ndim == 3 else "bsngd,bpnd->bngsp"
        parts.insert(0, torch.einsum(prefix_eq, qg, keys.to(q.dtype)))
    scores = _scores(attn, torch.cat(parts, dim=-1) if P else parts[0])
    pattern = torch.softmax(scores.masked_fill(~mask[:, :, None], float("-inf")),
                            dim=-1).to(v.dtype)
    z = torch.einsum("bngst,btnd->bsngd", pattern[..., P:], v)
    if P:
        prefix_eq = "bngsp,pnd->bsngd" if keys.ndim == 3 else "bngsp,bpnd->bsngd"
        z = z + torch.einsum(prefix_eq, pattern[..., :P], values.to(v.dtype))
    return z.reshape(b, s, n_q, dh)


def _rotary0(attn, x: Float[Tensor, "batch pos head d_head"]
             ) -> Float[Tensor, "batch pos head d_head"]:
    """``attn.apply_rotary(x, 0)`` (positions ``0..pos-1``, no attention mask) with the same
    products (``x cos + flip(x) sin``; the flip's sign moved onto ``sin``, exact) but without
    TransformerLens' clone and slice writes; anything unusual (adjacent pairs, dynamic NTK,
    positions past the cached table, another device) runs TransformerLens' own."""
    cfg = attn.cfg
    s, r = x.shape[1], cfg.rotary_dim
    cos = getattr(attn, "rotary_cos", None)
    if (cfg.rotary_adjacent_pairs or getattr(cfg, "use_dynamic_ntk_rope", False) or r is None
            or r % 2 or cos is None or cos.shape[0] < s or x.device != cos.device):
        return attn.apply_rotary(x, 0)
    n = r // 2
    cos = cos[None, :s, None, :]
    sin = attn.rotary_sin[None, :s, None, :]
    sin = torch.cat([-sin[..., :n], sin[..., n:]], dim=-1)
    x_rot = x[..., :r]
    out = x_rot * cos + x_rot.roll(n, dims=-1) * sin
    return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], dim=-1)


def _attend_one(attn, q: Tensor, k: Tensor, v: Tensor,
                keys: Float[Tensor, "prefix kv_head d_head"],
                values: Float[Tensor, "prefix kv_head d_head"]
                ) -> Float[Tensor, "batch 1 head d_head"]:
    """:func:`_attend` for one suffix position over a shared prefix, laid out for speed: scores
    as ``[kv_head, key, batch x group]`` (the softmax runs across keys with the long batch axis
    innermost; a softmax over a last axis of a few keys is slow on CPU), the prefix through one
    batched matmul per kv head, the position's own key and value elementwise."""
    cfg = attn.cfg
    b, _, n_q, dh = q.shape
    n_kv, P = k.shape[2], keys.shape[0]
    g = n_q // n_kv
    qn = q.reshape(b, n_kv, g, dh).transpose(0, 1)  # [n, b, g, d]
    own = (qn * k[:, 0].transpose(0, 1)[:, :, None, :]).sum(-1).reshape(n_kv, 1, b * g)
    if P:
        pre = torch.bmm(keys.to(q.dtype).transpose(0, 1),
                        qn.reshape(n_kv, b * g, dh).transpose(1, 2))
        scores = torch.cat([pre, own], dim=1)  # [n, P + 1, b g]
    else:
        scores = own
    scores = _scores(attn, scores)
    if attn.attn_type == "local" and P + 1 > cfg.window_size:  # keys j > P - window only
        scores = scores.masked_fill(
            (torch.arange(P + 1, device=q.device) <= P - cfg.window_size)[None, :, None],
            float("-inf"))
    pattern = torch.softmax(scores, dim=1).to(v.dtype)
    z = pattern[:, P].reshape(n_kv, b, g, 1) * v[:, 0].transpose(0, 1)[:, :, None, :]
    if P:
        z = z + torch.bmm(pattern[:, :P].transpose(1, 2),
                          values.to(v.dtype).transpose(0, 1)).reshape(n_kv, b, g, dh)
    return z.transpose(0, 1).reshape(b, 1, n_q, dh)


def _hooked(*points) -> bool:
    return any(p._forward_hooks or p._backward_hooks or p._forward_pre_hooks for p in points)


class _RMSNorm(torch.autograd.Function):
    """``x / sqrt(mean(x^2) + eps)`` with a backward of three passes instead of autograd's ~10
    ops through pow / mean / sqrt / div (a tenth of a one-position block's time)."""

    @staticmethod
    def forward(ctx, x, eps: float):
        r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        y = x * r
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, g):
        y, r = ctx.saved_tensors
        return torch.addcmul(g, y, (g * y).mean(-1, keepdim=True), value=-1.0).mul_(r), None


def norm(module, x: Tensor) -> Tensor:
    """``module(x)`` for a TransformerLens norm; ``RMSNormPre`` / ``RMSNorm`` (LLaMA, Gemma: the
    block norms, Gemma's norms after attention and MLP, q/k norms, the final norm) through
    :class:`_RMSNorm` when none of its hook points has a hook (same arithmetic up to rounding:
    ``x * rsqrt`` for ``x / sqrt``, float32 or wider as TransformerLens computes it)."""
    if not _own_norm(module):
        return module(x)
    y = _RMSNorm.apply(x.to(torch.promote_types(x.dtype, torch.float32)), module.eps)
    y = y.to(module.cfg.dtype)
    return y * module.w if hasattr(module, "w") else y  # RMSNorm has a weight, RMSNormPre none


def _own_norm(module) -> bool:
    from transformer_lens.components import RMSNorm, RMSNormPre

    return type(module) in (RMSNorm, RMSNormPre) and "forward" not in vars(module) \
        and not _hooked(module.hook_scale, module.hook_normalized)  # (a patched forward is kept)


def mlp_out_from_post(mlp, post: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_model"]:
    """What a dense (gated) MLP writes given its neurons ``hook_post``: ``post @ W_out + b_out``
    (every TransformerLens MLP / GatedMLP ends so)."""
    return torch.nn.functional.linear(post, mlp.W_out.T, _bias(mlp, "b_out"))


def block_tail(block, mlp_out: Float[Tensor, "... d_model"],
               resid_before: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The end of a block after its MLP: Gemma's post-MLP norm, ``hook_mlp_out`` and the residual
    add to ``resid_before`` (``resid_mid``; ``resid_pre + attn_out`` for parallel blocks)."""
    if block.cfg.use_normalization_before_and_after:
        mlp_out = norm(block.ln2_post, mlp_out)
    return block.hook_resid_post(resid_before + block.hook_mlp_out(mlp_out))


# ------------------------------------------------------------- P(answer) and its gradient

VOCAB_CHUNK = 4096  # unembedding columns per step of answer_prob's sweep (logits stay in cache)


class _AnswerProb(torch.autograd.Function):
    """P(token) per row and dP/dx in one sweep over the vocabulary (see :func:`answer_prob`)."""

    @staticmethod
    def forward(ctx, x, W_U, b_U, token: int, cap: float | None, chunk: int):
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        rows, d_vocab = x.shape[0], W_U.shape[1]
        m = torch.full((rows,), float("-inf"), dtype=acc_dtype, device=x.device)
        s = torch.zeros(rows, dtype=acc_dtype, device=x.device)
        acc = torch.zeros(rows, x.shape[1], dtype=acc_dtype, device=x.device)
        for c0 in range(0, d_vocab, chunk):
            Wc = W_U[:, c0:c0 + chunk]
            z = (x @ Wc if b_U is None else torch.addmm(b_U[c0:c0 + chunk], x, Wc)).to(acc_dtype)
            if cap:
                t = torch.tanh(z / cap)
                z = cap * t
            m_new = torch.maximum(m, z.amax(1))
            rescale = torch.exp(m - m_new)
            e = z.sub_(m_new[:, None]).exp_()
            s = s * rescale + e.sum(1)
            if cap:
                e = e * (1 - t * t)  # d cap*tanh(z/cap) / dz
            acc = acc * rescale[:, None]
            acc = torch.addmm(acc, e, Wc.T) if Wc.dtype == acc_dtype else \
                acc + (e.to(Wc.dtype) @ Wc.T).to(acc_dtype)
            m = m_new
        u = W_U[:, token].to(acc_dtype)
        z_a = x.to(acc_dtype) @ u
        if b_U is not None:
            z_a = z_a + b_U[token].to(acc_dtype)
        slope = torch.ones_like(z_a)
        if cap:
            t_a = torch.tanh(z_a / cap)
            z_a, slope = cap * t_a, 1 - t_a * t_a
        p = torch.exp(z_a - (m + torch.log(s)))
        # dP/dx = P (dz_a/dx - sum_v p_v dz_v/dx) = P (slope_a u_a - E_p[slope_v u_v])
        ctx.save_for_backward(p[:, None] * (slope[:, None] * u[None] - acc / s[:, None]))
        ctx.x_dtype = x.dtype
        return p

    @staticmethod
    def backward(ctx, grad_p):
        (dp_dx,) = ctx.saved_tensors
        return (grad_p[:, None] * dp_dx).to(ctx.x_dtype), None, None, None, None, None


def answer_prob(model, resid: Float[Tensor, "rows d_model"], token: int, *,
                chunk: int = VOCAB_CHUNK) -> Float[Tensor, "rows"]:
    """``P(token)`` (softmax over the whole vocabulary, ``ln_final``, ``b_U`` and the logit
    soft-cap included) from final residual rows, differentiable w.r.t. ``resid``.

    Exact, and at the FLOP floor of a forward + input-gradient backward: the logits are made
    ``chunk`` vocabulary columns at a time and reduced on the spot (an online softmax) into the
    normaliser and ``E_p[u_v]`` (``u_v``: the unembedding column of token v), from which the
    gradient ``dP/dx = P (u_token - E_p[u_v])`` is formed, so no ``rows x d_vocab`` tensor is ever
    written (on Gemma-3's 262k vocabulary the softmax and its backward over the full logits cost
    as much as the two unembedding matmuls themselves, measured). The backward is then one
    product; float32 (or wider) accumulation."""
    x = resid
    if model.cfg.normalization_type is not None:
        x = norm(model.ln_final, resid[:, None, :])[:, 0]
    b_U = model.b_U if model.b_U is not None and bool(model.b_U.any()) else None  # often all 0
    cap = model.cfg.output_logits_soft_cap
    return _AnswerProb.apply(x, model.W_U, b_U, int(token), cap if cap and cap > 0 else None,
                             int(chunk))

"""kn_lens._fast: the copy-free forwards compute what TransformerLens computes, fire the same hook
points with the same values, and leave nothing on the model."""
import pytest
import torch

from kn_lens import testing
from kn_lens._fast import fast_forward

BUILDERS = {"gpt2": testing.tiny_gpt2, "llama": testing.tiny_llama, "gemma": testing.tiny_gemma}
# block structures kn_lens._fast.prefix_block covers (gemma3: q/k norms, sliding windows shorter
# than the inputs below, soft-caps; neox: parallel blocks, partial rotary)
PREFIX_BUILDERS = {**BUILDERS, "gemma3": testing.tiny_gemma3, "neox": testing.tiny_neox}


def _run(model, toks, **kw):
    logits, cache = model.run_with_cache(toks, **kw)
    return logits, {k: v.detach().clone() for k, v in cache.items()}


@pytest.mark.parametrize("arch", sorted(PREFIX_BUILDERS))
def test_fast_forward_matches_transformer_lens(arch):
    model = PREFIX_BUILDERS[arch](seed=3)
    toks = torch.randint(0, model.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(toks)
    mask[1, :4] = 0  # a left-padded row
    for kw in ({}, {"attention_mask": mask}):
        ref_logits, ref = _run(model, toks, **kw)
        with fast_forward(model):
            patched = [m for m in model.modules() if "forward" in vars(m)]
            assert any(type(m).__name__.endswith("Attention") for m in patched)
            logits, got = _run(model, toks, **kw)
        assert set(got) == set(ref)  # every hook point fired, none added
        for name in ref:
            assert got[name].shape == ref[name].shape, name
            torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert not [m for m in model.modules() if "forward" in vars(m)
                or "calculate_qkv_matrices" in vars(m)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fast_forward_gradients_and_kv_cache(arch):
    model = BUILDERS[arch](seed=1)
    toks = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(1))

    def grad(fast):
        x = torch.zeros(model.cfg.d_model, requires_grad=True)
        hook = ("blocks.0.hook_resid_post", lambda act, hook: act + x)
        if fast:
            with fast_forward(model), model.hooks(fwd_hooks=[hook]):
                out = model(toks)
        else:
            with model.hooks(fwd_hooks=[hook]):
                out = model(toks)
        out.logsumexp(-1).sum().backward()
        return x.grad

    torch.testing.assert_close(grad(True), grad(False), atol=1e-4, rtol=1e-4)
    prompt = toks[:1, :4]
    ref = model.generate(prompt, max_new_tokens=5, do_sample=False, verbose=False)
    with fast_forward(model):
        got = model.generate(prompt, max_new_tokens=5, do_sample=False, verbose=False)
    assert torch.equal(got, ref)


def test_fast_forward_falls_back_for_per_head_results():
    model = testing.tiny_llama(seed=2)
    toks = torch.randint(0, model.cfg.d_vocab, (1, 6), generator=torch.Generator().manual_seed(2))
    model.set_use_attn_result(True)
    try:
        ref_logits, ref = _run(model, toks)
        with fast_forward(model):
            logits, got = _run(model, toks)
        assert "blocks.0.attn.hook_result" in got and set(got) == set(ref)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    finally:
        model.set_use_attn_result(False)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_frozen_weights_fused_qkv_matches_transformer_lens(arch):
    """frozen_weights=True: evaluation (no gradients) projects q, k and v with one fused
    W_Q|W_K|W_V matmul and gets TransformerLens' hook values and logits; the copy is dropped."""
    model = BUILDERS[arch](seed=4)
    toks = torch.randint(0, model.cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_logits, ref = _run(model, toks)
        with fast_forward(model, frozen_weights=True):
            logits, got = _run(model, toks)
            fused = [m for m in model.modules() if m.__dict__.get("_kn_qkv") is not None]
            assert len(fused) == model.cfg.n_layers  # every attention took the fused path
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert not [m for m in model.modules() if "_kn_qkv" in vars(m) or "forward" in vars(m)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_frozen_weights_gradients(arch):
    """With gradients: one input tensor (ROME's lean block) takes the fused matmul and gives
    TransformerLens' q, k, v and input gradient; a zero delta added to one of a block's three
    ln1 calls (equal values, different functions of the delta) keeps the unfused path and TL's
    gradient."""
    model = BUILDERS[arch](seed=5)
    toks = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(5))
    attn = model.blocks[1].attn
    h0 = torch.randn(2, 6, model.cfg.d_model, generator=torch.Generator().manual_seed(6))
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        def qkv(**kw):
            h = h0.clone().requires_grad_(True)
            with fast_forward(model, **kw):
                out = attn.calculate_qkv_matrices(h, h, h)
                took = attn.__dict__.get("_kn_qkv") is not None
            sum((o * (i + 1)).sum() for i, o in enumerate(out)).backward()
            return out, h.grad, took

        (ref, ref_g, _), (got, got_g, took) = qkv(), qkv(frozen_weights=True)
        assert took
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_g, ref_g, atol=1e-5, rtol=1e-4)

        def ln1_grad(**kw):  # a zero delta on the key input only: values still equal
            x = torch.zeros(model.cfg.d_model, requires_grad=True)
            calls = []

            def on_key(act, hook):
                calls.append(1)
                return act + x if len(calls) % 3 == 2 else act  # q, k, v: three ln1 calls

            with fast_forward(model, **kw), \
                    model.hooks(fwd_hooks=[("blocks.1.ln1.hook_normalized", on_key)]):
                model(toks).logsumexp(-1).sum().backward()
            assert len(calls) == 3
            return x.grad

        torch.testing.assert_close(ln1_grad(frozen_weights=True), ln1_grad(), atol=1e-4, rtol=1e-4)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_frozen_weights_falls_back_when_a_weight_needs_grad():
    """A weight that requires grad never goes through the detached fused copy: its gradient is
    the one TransformerLens gives."""
    model = testing.tiny_llama(seed=5)
    toks = torch.randint(0, model.cfg.d_vocab, (1, 6), generator=torch.Generator().manual_seed(5))
    W = model.blocks[0].attn.W_Q

    def grad(**kw):
        model.zero_grad(set_to_none=True)
        with fast_forward(model, **kw):
            model(toks).logsumexp(-1).sum().backward()
        return W.grad.clone()

    torch.testing.assert_close(grad(frozen_weights=True), grad(), atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- prefix_block


def _keys_values(model, toks):
    """Every layer's keys (as the key/value cache stores them) and values, and the residuals."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, toks.shape[0])
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, past_kv_cache=kv,
                                        attention_mask=torch.ones_like(toks))
    return ([e.past_keys for e in kv.entries], [e.past_values for e in kv.entries],
            {k: v.clone() for k, v in cache.items()})


@pytest.mark.parametrize("arch", sorted(PREFIX_BUILDERS))
@pytest.mark.parametrize("suffix", [1, 3])
def test_prefix_block_matches_transformer_lens(arch, suffix):
    """Rows sharing their first P tokens: blocks 1.. on the last ``suffix`` positions over the
    shared prefix keys/values (relative rotary, no per-row copy) give TransformerLens' residual
    stream; the hook points of the suffix fire with TransformerLens' shapes."""
    from kn_lens._fast import prefix_block, prefix_block_ok, relative_prefix_keys

    model = PREFIX_BUILDERS[arch](seed=7)
    assert prefix_block_ok(model)
    g = torch.Generator().manual_seed(7)
    n, P = 9, 9 - suffix
    toks = torch.randint(0, model.cfg.d_vocab, (3, n), generator=g)
    toks[1:, :P] = toks[0, :P]  # a shared prefix
    keys, values, ref = _keys_values(model, toks)
    x = ref["blocks.1.hook_resid_pre"][:, P:]
    seen = {}
    hook = ("blocks.2.attn.hook_z", lambda act, hook: seen.update(z=act.shape))
    with torch.no_grad(), model.hooks(fwd_hooks=[hook]):
        for layer in range(1, model.cfg.n_layers):
            k = relative_prefix_keys(model.blocks[layer].attn, keys[layer][0, :P])
            x = prefix_block(model.blocks[layer], x, k, values[layer][0, :P])
            torch.testing.assert_close(x, ref[f"blocks.{layer}.hook_resid_post"][:, P:],
                                       atol=1e-5, rtol=1e-4, msg=f"layer {layer}")
    assert seen["z"] == ref["blocks.2.attn.hook_z"][:, P:].shape


@pytest.mark.parametrize("arch", ["llama", "gemma3", "neox"])
def test_prefix_block_per_row_prefixes(arch):
    """Rows with different prefix lengths, right-aligned in P slots (masked where empty; keys from
    ``hook_rot_k``, relative to each row's own suffix start), as the optimisation loop uses them."""
    from kn_lens._fast import prefix_block, relative_prefix_keys

    model = PREFIX_BUILDERS[arch](seed=8)
    g = torch.Generator().manual_seed(8)
    rows = [torch.randint(0, model.cfg.d_vocab, (n,), generator=g) for n in (9, 7)]
    sites, s = (6, 4), 3  # each row's suffix: its last 3 tokens
    P = max(sites)
    refs = [model.run_with_cache(r[None])[1] for r in rows]
    x = torch.stack([c["blocks.0.hook_resid_pre"][0, p:] for c, p in zip(refs, sites)])
    valid = torch.zeros(2, P, dtype=torch.bool)
    key_name = "rot_k" if model.cfg.positional_embedding_type == "rotary" else "k"
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            attn = model.blocks[layer].attn
            k = torch.zeros(2, P, *refs[0][f"blocks.{layer}.attn.hook_v"].shape[2:])
            v = torch.zeros_like(k)
            for i, (c, p) in enumerate(zip(refs, sites)):
                rot_k = c[f"blocks.{layer}.attn.hook_{key_name}"][0, :p]
                k[i, P - p:] = relative_prefix_keys(attn, rot_k, rotated=True)
                v[i, P - p:] = c[f"blocks.{layer}.attn.hook_v"][0, :p]
                valid[i, P - p:] = True
            x = prefix_block(model.blocks[layer], x, k, v, valid=valid)
            for i, (c, p) in enumerate(zip(refs, sites)):
                torch.testing.assert_close(x[i], c[f"blocks.{layer}.hook_resid_post"][0, p:p + s],
                                           atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_prefix_block_gradient(arch):
    """The gradient w.r.t. the suffix residual through prefix blocks is TransformerLens'."""
    from kn_lens._fast import prefix_block, relative_prefix_keys

    model = PREFIX_BUILDERS[arch](seed=9)
    toks = torch.randint(0, model.cfg.d_vocab, (1, 8), generator=torch.Generator().manual_seed(9))
    keys, values, ref = _keys_values(model, toks)
    P = 7
    delta = torch.zeros(model.cfg.d_model, requires_grad=True)

    def add(act, hook):
        act = act.clone()
        act[:, P] = act[:, P] + delta
        return act

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", add)]):
        model(toks)[0, P].logsumexp(-1).backward()
    want, delta.grad = delta.grad.clone(), None
    x = ref["blocks.1.hook_resid_pre"][:, P:] + delta
    for layer in range(1, model.cfg.n_layers):
        x = prefix_block(model.blocks[layer], x,
                         relative_prefix_keys(model.blocks[layer].attn, keys[layer][0, :P]),
                         values[layer][0, :P])
    from transformer_lens.utils import apply_softcap

    logits = apply_softcap(model.unembed(model.ln_final(x)), model.cfg.output_logits_soft_cap)
    logits[0, 0].logsumexp(-1).backward()
    torch.testing.assert_close(delta.grad, want, atol=1e-5, rtol=1e-4)


def test_prefix_block_ok_refuses_what_it_does_not_cover():
    from kn_lens._fast import prefix_block_ok

    model = testing.tiny_llama(seed=2)
    assert prefix_block_ok(model)
    model.set_use_attn_result(True)  # per-head results: hook_result must fire
    try:
        assert not prefix_block_ok(model)
    finally:
        model.set_use_attn_result(False)
    model.cfg.use_yarn_rope, model.cfg.yarn_attention_factor = True, 1.2  # not a pure rotation
    try:
        assert not prefix_block_ok(model)
    finally:
        model.cfg.use_yarn_rope, model.cfg.yarn_attention_factor = False, 1.0
    assert prefix_block_ok(model)


# --------------------------------------------------------------------------- answer_prob


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
@pytest.mark.parametrize("chunk", [7, 100, 10_000])
def test_answer_prob_and_gradient(arch, chunk):
    """P(token) from the vocabulary sweep (any chunk, incl. one that does not divide the
    vocabulary; gemma3 soft-caps its logits) and its gradient equal the plain softmax's; with a
    non-zero unembedding bias too."""
    from transformer_lens.utils import apply_softcap

    from kn_lens._fast import answer_prob

    model = PREFIX_BUILDERS[arch](seed=10)
    resid = torch.randn(5, model.cfg.d_model, generator=torch.Generator().manual_seed(10))
    for bias in (False, True):
        if bias:
            with torch.no_grad():
                model.b_U.copy_(torch.randn(model.cfg.d_vocab,
                                            generator=torch.Generator().manual_seed(11)))
        try:
            x = resid.clone().requires_grad_(True)
            p = answer_prob(model, x, 17, chunk=chunk)
            (g,) = torch.autograd.grad((p * torch.arange(1.0, 6.0)).sum(), x)
            y = resid.clone().requires_grad_(True)
            logits = apply_softcap(model.unembed(model.ln_final(y[:, None]))[:, 0],
                                   model.cfg.output_logits_soft_cap)
            q = torch.softmax(logits, -1)[:, 17]
            (h,) = torch.autograd.grad((q * torch.arange(1.0, 6.0)).sum(), y)
            torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-5)
            torch.testing.assert_close(g, h, atol=1e-7, rtol=1e-4)
        finally:
            with torch.no_grad():
                model.b_U.zero_()


def test_fused_qkv_without_weight_gradients():
    """weight_grads=False: the fused W_Q|W_K|W_V copy is used with grad mode on although the
    weights require grad (gradients w.r.t. activations only), with TransformerLens' gradient."""
    model = testing.tiny_llama(seed=12)
    attn = model.blocks[1].attn
    h0 = torch.randn(2, 5, model.cfg.d_model, generator=torch.Generator().manual_seed(12))
    assert attn.W_Q.requires_grad

    def run(**kw):
        h = h0.clone().requires_grad_(True)
        with fast_forward(model, **kw):
            out = attn.calculate_qkv_matrices(h, h, h)
            took = attn.__dict__.get("_kn_qkv") is not None
            (g,) = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(out)), h)
        return out, g, took

    (ref, ref_g, _), (got, got_g, took) = run(), run(frozen_weights=True, weight_grads=False)
    assert took and not run(frozen_weights=True)[2]
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_g, ref_g, atol=1e-5, rtol=1e-4)
    assert not [m for m in model.modules() if "_kn_no_weight_grads" in vars(m)]

"""kn_lens._fast: the copy-free forwards compute what TransformerLens computes, fire the same hook
points with the same values, and leave nothing on the model."""
import pytest
import torch

from kn_lens import testing
from kn_lens._fast import fast_forward

BUILDERS = {"gpt2": testing.tiny_gpt2, "llama": testing.tiny_llama, "gemma": testing.tiny_gemma}


def _run(model, toks, **kw):
    logits, cache = model.run_with_cache(toks, **kw)
    return logits, {k: v.detach().clone() for k, v in cache.items()}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_fast_forward_matches_transformer_lens(arch):
    model = BUILDERS[arch](seed=3)
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

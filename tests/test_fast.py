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

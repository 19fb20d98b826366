"""FiNE contribution scores: equal a direct computation, per-token maps, layer freezing."""
import pytest
import torch

from kn_lens import hooks
from kn_lens.errors import ConfigError
from kn_lens.facts import query_from_prompt
from kn_lens.locate.contribution import (
    ContributionConfig,
    contribution_scores,
    select_contribution_neurons,
)
from kn_lens.neurons import NeuronScores

PROMPT = "The capital of France is"


@pytest.mark.parametrize("answer", ["Paris", "Guido van Rossum"])
def test_equals_direct_computation(tiny_model, answer):
    q = query_from_prompt(tiny_model, PROMPT, answer)
    s = contribution_scores(tiny_model, q)
    L, d = tiny_model.cfg.n_layers, tiny_model.cfg.d_mlp
    assert isinstance(s, NeuronScores) and s.method == "contribution"
    assert s.shape == (L, d) and s.per_token.shape == (q.n_answer, L, d)
    torch.testing.assert_close(s.scores, s.per_token.sum(0))
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(q.tokens())
    for t, (pos, tok) in enumerate(zip(q.answer_positions, q.answer_ids)):
        for layer in range(L):
            act = cache[hooks.mlp_post(layer)][0, pos]  # [d_mlp]
            w_out = tiny_model.blocks[layer].mlp.W_out  # [d_mlp, d_model]
            for i in (0, 7, d - 1):
                direct = float(act[i] * (tiny_model.W_U[:, tok] @ w_out[i]).detach())
                assert float(s.per_token[t, layer, i]) == pytest.approx(direct, rel=1e-4, abs=1e-6)
    assert hooks.active_hook_count(tiny_model) == 0


def test_teacher_forced_positions_differ(tiny_model):
    q = query_from_prompt(tiny_model, PROMPT, "Guido van Rossum")
    s = contribution_scores(tiny_model, q)
    assert not torch.allclose(s.per_token[0], s.per_token[1])


def test_selection_freezes_last_layers():
    from kn_lens.testing import tiny_gpt2

    m = tiny_gpt2(n_layers=5)
    q = query_from_prompt(m, PROMPT, "Guido van Rossum")
    s = contribution_scores(m, q)
    cfg = ContributionConfig()
    assert (cfg.k, cfg.freeze_last) == (5, 3)
    sel = select_contribution_neurons(s, cfg)
    assert cfg.k <= len(sel) <= cfg.k * q.n_answer
    assert all(n.layer < 5 - 3 for n in sel)
    # per token: each token's own top-k (over unfrozen layers) is inside the union
    for t in range(q.n_answer):
        masked = s.per_token[t].clone()
        masked[5 - 3:] = float("-inf")
        top = masked.flatten().topk(cfg.k).indices
        for i in top.tolist():
            assert (i // m.cfg.d_mlp, i % m.cfg.d_mlp) in {(n.layer, n.index) for n in sel}
    unfrozen = select_contribution_neurons(s, ContributionConfig(freeze_last=0))
    top_layers = {n.layer for n in unfrozen}
    assert top_layers, "selection is never empty"


def test_same_input_same_result(tiny_model):
    q = query_from_prompt(tiny_model, PROMPT, "Paris")
    assert torch.equal(contribution_scores(tiny_model, q).scores,
                       contribution_scores(tiny_model, q).scores)


def test_bad_config(gpt2_tiny):
    with pytest.raises(ConfigError):
        ContributionConfig(k=0)
    with pytest.raises(ConfigError):
        ContributionConfig(freeze_last=-1)
    q = query_from_prompt(gpt2_tiny, PROMPT, "Paris")
    s = contribution_scores(gpt2_tiny, q)  # scoring does not depend on the selection settings
    with pytest.raises(ConfigError):  # but freezing all 3 layers leaves nothing to select
        select_contribution_neurons(s, ContributionConfig(freeze_last=3))


@pytest.mark.parametrize("post_norm", [False, True])
def test_layer_sum_is_the_direct_logit_effect(post_norm):
    """Summed over a layer's neurons, contribution + the bias's share = hook_mlp_out . W_U[:, t]
    (the layer's direct effect on the answer logit), also for Gemma-style models whose MLP output
    is normalised before the residual (the norm's scale frozen at the clean run)."""
    from kn_lens import hooks as H
    from kn_lens.facts import Fact, make_query
    from kn_lens.locate import contribution_scores
    from kn_lens.testing import _build

    model = _build(dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=48, act_fn="gelu",
                        gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary",
                        rotary_dim=8, use_normalization_before_and_after=post_norm), 0, "tiny-post", True)
    if post_norm:  # a non-trivial norm weight
        with torch.no_grad():
            for b in model.blocks:
                b.ln2_post.w.copy_(torch.linspace(0.5, 2.0, 32))
    q = make_query(model, Fact("France", "capital", "Paris"), "The capital of {} is")
    s = contribution_scores(model, q)
    store: dict = {}
    names = [f"blocks.{l}.hook_mlp_out" for l in range(2)] + [H.ln2_post_scale(l) for l in range(2) if post_norm]
    with model.hooks(fwd_hooks=[h for n in names for h in H.cache_hook(n, store)]):
        model(torch.tensor([q.input_ids]))
    pos, t = q.answer_positions[0], q.answer_ids[0]
    for l, b in enumerate(model.blocks):
        bias = b.mlp.b_out.float()
        if post_norm:
            bias = bias * b.ln2_post.w / store[H.ln2_post_scale(l)][0, pos]
        direct = (store[f"blocks.{l}.hook_mlp_out"][0, pos] - bias) @ model.W_U[:, t]
        torch.testing.assert_close(s.per_token[0, l].sum(), direct.float(), rtol=1e-4, atol=1e-5)
    assert ("post_mlp_norm" in s.extras) == post_norm

"""Knowledge synapses (QL eq. 4-6), synapse scaling hooks and the Dynamic-KN-Selection test."""
import math

import pytest
import torch

from kn_lens import hooks
from kn_lens.analysis.synapses import (
    SynapseConfig,
    SynapseManipulationConfig,
    activation_maps,
    attention_patterns,
    knowledge_synapses,
    predominance_from_patterns,
    predominance_score,
    scale_synapses,
    synapse_manipulation,
    synapses_from_patterns,
)
from kn_lens.errors import ConfigError, InvalidFactError, NumericalError
from kn_lens.facts import Fact, make_query
from kn_lens.neurons import NeuronSet


def _hand_patterns():
    # 1 layer, 2 heads, 3 positions. Column sums: head 0 -> [3, 0, 0], head 1 -> [1, 1.5, 0.5].
    h0 = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]])
    h1 = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0.5, 0.5]])
    return torch.stack([h0, h1])[None]


def test_synapses_known_answer():
    mask, col, tau = synapses_from_patterns(_hand_patterns(), alpha=0.3)
    # eq. 5: tau = 0.3 * (3 + 3) / (1 * 2) = 0.9
    assert tau == pytest.approx(0.9)
    assert col[0].tolist() == [[3.0, 0.0, 0.0], [1.0, 1.5, 0.5]]
    # eq. 6 as (c, l, h): key 0 for both heads, key 1 for head 1; 0.5 < tau is not a synapse
    got = {(int(c), int(l), int(h)) for l, h, c in mask.nonzero().tolist()}
    assert got == {(0, 0, 0), (0, 0, 1), (1, 0, 1)}


def test_synapses_threshold_is_strict_and_ignore_first():
    mask, _, tau = synapses_from_patterns(_hand_patterns(), alpha=0.5)
    assert tau == pytest.approx(1.5)
    # head 1 key 1 sums to exactly tau: not "> tau"
    assert mask.nonzero().tolist() == [[0, 0, 0]]
    mask, _, _ = synapses_from_patterns(_hand_patterns(), alpha=0.3, ignore_first=True)
    assert mask.nonzero().tolist() == [[0, 1, 1]]


def test_synapse_inputs_are_validated():
    with pytest.raises(ConfigError):
        SynapseConfig(alpha=0.0)
    with pytest.raises(ConfigError):
        synapses_from_patterns(_hand_patterns(), alpha=float("nan"))
    bad = _hand_patterns().clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NumericalError):
        synapses_from_patterns(bad)
    with pytest.raises(ValueError):
        synapses_from_patterns(torch.ones(2, 3, 3))


def _received(pos: int, n: int = 4) -> torch.Tensor:
    """A (non-causal) [1, 1, n, n] pattern where every row puts all its weight on key ``pos``."""
    a = torch.zeros(1, 1, n, n)
    a[0, 0, :, pos] = 1.0
    return a


def test_predominance_known_answer():
    pats = [_received(2), _received(1), _received(3)]
    ids = [[5, 6, 7, 8], [5, 7, 9, 9], [1, 2, 3, 4]]  # most attended: 7, 7, 4
    p, toks, pos = predominance_from_patterns(pats, ids)
    assert toks == [7, 7, 4] and pos == [2, 1, 3]
    assert p == pytest.approx(2 / 3)
    # the printed argmax over rows of row sums is degenerate: every row sums to one
    _, _, pos_q = predominance_from_patterns(pats, ids, axis="query")
    assert all(0 <= x < 4 for x in pos_q)
    with pytest.raises(InvalidFactError):
        predominance_from_patterns([], [])


def _queries(model):
    q1 = make_query(model, Fact("France", "capital", "Paris"), "The capital of {} is")
    q2 = make_query(model, Fact("Japan", "capital", "Tokyo"), "The capital of {} is")
    q3 = make_query(model, Fact("Kenya", "located", "Africa"), "{} is located in")
    return [q1, q2, q3]


def _all_keys(model, n):
    return torch.ones(model.cfg.n_layers, model.cfg.n_heads, n, dtype=torch.bool)


def test_model_synapses_shape_and_tau(tiny_model):
    q = _queries(tiny_model)[0]
    pats = attention_patterns(tiny_model, q)
    # per query head, also for grouped-query attention (tiny_llama: 4 heads, 2 KV heads)
    assert pats.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, q.n_prompt, q.n_prompt)
    s = knowledge_synapses(tiny_model, q)
    assert s.mask.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, q.n_prompt)
    # softmax rows sum to one, so eq. 5 reduces to alpha * R
    assert s.tau == pytest.approx(0.3 * q.n_prompt, rel=1e-5)
    assert len(s) == len(s.triples()) > 0
    assert sum(s.per_position()) == len(s)
    assert hooks.active_hook_count(tiny_model) == 0


def test_scale_by_one_is_noop(tiny_model):
    q = _queries(tiny_model)[0]
    toks = q.tokens()
    base = tiny_model(toks)
    for renorm in (False, True):
        fwd = scale_synapses(_all_keys(tiny_model, q.n_prompt), 1.0, renormalize=renorm)
        assert len(fwd) == tiny_model.cfg.n_layers
        with tiny_model.hooks(fwd_hooks=fwd):
            out = tiny_model(toks)
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)


def test_suppress_all_keys_changes_output(tiny_model):
    q = _queries(tiny_model)[0]
    toks = q.tokens()
    base = tiny_model(toks)
    store = {}
    fwd = scale_synapses(_all_keys(tiny_model, q.n_prompt), 0.0) + hooks.cache_hook(
        hooks.attn_pattern(0), store)
    with tiny_model.hooks(fwd_hooks=fwd):
        out = tiny_model(toks)
    assert (out - base).abs().max() > 1e-3
    # the cache hook runs after the scaling hook: the pattern it sees is all zero
    assert float(store[hooks.attn_pattern(0)].abs().max()) == 0.0
    # enhancing only part of the keys also changes the output
    mask = _all_keys(tiny_model, q.n_prompt)
    mask[..., 1:] = False
    with tiny_model.hooks(fwd_hooks=scale_synapses(mask, 2.0)):
        out2 = tiny_model(toks)
    assert (out2 - base).abs().max() > 1e-4


def test_no_hooks_left_after_error(tiny_model):
    q = _queries(tiny_model)[0]
    wrong_heads = torch.ones(tiny_model.cfg.n_layers, tiny_model.cfg.n_heads + 1, q.n_prompt,
                             dtype=torch.bool)
    with pytest.raises(ValueError, match="heads"):
        with tiny_model.hooks(fwd_hooks=scale_synapses(wrong_heads, 0.0)):
            tiny_model(q.tokens())
    assert hooks.active_hook_count(tiny_model) == 0
    with pytest.raises(InvalidFactError):  # an empty KN set is refused before any hook
        synapse_manipulation(tiny_model, _queries(tiny_model)[:2], [NeuronSet(), NeuronSet()])
    assert hooks.active_hook_count(tiny_model) == 0


def test_manipulation_identity_factors_give_zero_change(llama_tiny):
    qs = _queries(llama_tiny)
    kns = [NeuronSet([(0, 1), (2, 5)]), NeuronSet([(1, 3)]), NeuronSet([(2, 0), (2, 7)])]
    cfg = SynapseManipulationConfig(suppress_factor=1.0, enhance_factor=1.0)
    res = synapse_manipulation(llama_tiny, qs, kns, config=cfg, seed=1)
    assert len(res.effects) == 3
    for e, q in zip(res.effects, qs):
        assert e.irrelevant_prompt != q.prompt  # another fact's query
        assert e.n_synapses > 0
        for k in ("self_suppress", "self_enhance", "irrelevant_suppress", "irrelevant_enhance"):
            assert e.delta_value[k] == pytest.approx(0.0, abs=1e-5)
            assert e.delta_prob[k] == pytest.approx(0.0, abs=1e-5)
    s = res.summary()
    assert s["delta_prob"]["self_avg"] == pytest.approx(0.0, abs=1e-5)
    assert res.to_dict()["effects"][0]["prompt"] == qs[0].prompt


def test_manipulation_matches_direct_measurement(gpt2_tiny):
    from kn_lens.facts import answer_probs

    qs = _queries(gpt2_tiny)
    kn = NeuronSet([(1, 2), (2, 9)])
    res = synapse_manipulation(gpt2_tiny, qs[:2], [kn, kn], irrelevant=[qs[2], qs[2]])
    e = res.effects[0]
    q = qs[0]
    s = knowledge_synapses(gpt2_tiny, q)
    p_b = float(answer_probs(gpt2_tiny, [q])[0])
    p_sup = float(answer_probs(gpt2_tiny, [q], fwd_hooks=scale_synapses(s, 0.0))[0])
    assert e.prob_before == pytest.approx(p_b, rel=1e-5)
    assert e.prob_after["self_suppress"] == pytest.approx(p_sup, rel=1e-5)
    assert e.delta_prob["self_suppress"] == pytest.approx(-(p_sup - p_b) / p_b, rel=1e-4)
    assert e.n_synapses == len(s)
    store = {}
    with gpt2_tiny.hooks(fwd_hooks=hooks.cache_hook(hooks.mlp_post(1), store)):
        gpt2_tiny(q.tokens())
    acts = store[hooks.mlp_post(1)][0, q.last_position]
    with gpt2_tiny.hooks(fwd_hooks=hooks.cache_hook(hooks.mlp_post(2), store)):
        gpt2_tiny(q.tokens())
    v_b = (float(acts[2]) + float(store[hooks.mlp_post(2)][0, q.last_position][9])) / 2
    assert e.value_before == pytest.approx(v_b, rel=1e-5)
    assert math.isfinite(e.delta_value["irrelevant_enhance"])


def test_irrelevant_needs_another_fact(gpt2_tiny):
    q = _queries(gpt2_tiny)[0]
    with pytest.raises(InvalidFactError, match="irrelevant"):
        synapse_manipulation(gpt2_tiny, [q], [NeuronSet([(0, 0)])])


def test_activation_maps(tiny_model):
    q = _queries(tiny_model)[1]
    am = activation_maps(tiny_model, q)
    L, d = tiny_model.cfg.n_layers, tiny_model.cfg.d_mlp
    assert set(am.maps) == {"none", "suppressed", "enhanced"}
    assert all(m.shape == (L, d) for m in am.maps.values())
    _, cache = tiny_model.run_with_cache(q.tokens())
    direct = torch.stack([cache[hooks.mlp_post(l)][0, q.last_position] for l in range(L)])
    torch.testing.assert_close(am.maps["none"], direct)
    # layer 0's MLP sees only its own input, the attention of layer 0 already differs
    assert not torch.allclose(am.maps["suppressed"], am.maps["none"])
    assert hooks.active_hook_count(tiny_model) == 0


def test_predominance_on_model(tiny_model):
    qs = _queries(tiny_model)[:2]
    p = predominance_score(tiny_model, qs)
    assert 0.5 <= p.score <= 1.0  # k = 2
    assert len(p.most_attended) == 2
    assert all(t in q.prompt_ids for t, q in zip(p.most_attended, qs))


@pytest.mark.real_model
def test_real_model_own_synapses_matter(default_model):
    """On SmolLM2, suppressing the query's own synapses lowers P(answer) a lot."""
    m = default_model
    q = make_query(m, Fact("Eiffel Tower", "located", "Paris"), "The {} is located in the city of")
    s = knowledge_synapses(m, q)
    from kn_lens.facts import answer_probs

    p = float(answer_probs(m, [q])[0])
    p_sup = float(answer_probs(m, [q], fwd_hooks=scale_synapses(s, 0.0))[0])
    assert p > 0.3
    assert p_sup < 0.5 * p
    assert hooks.active_hook_count(m) == 0


def test_ignore_first_on_model(gpt2_tiny):
    q = _queries(gpt2_tiny)[0]
    s = knowledge_synapses(gpt2_tiny, q)
    s0 = knowledge_synapses(gpt2_tiny, q, config=SynapseConfig(ignore_first=True))
    assert s0.tau == pytest.approx(s.tau)  # position 0 still counts in eq. 5
    assert not s0.mask[..., 0].any()
    assert torch.equal(s0.mask[..., 1:], s.mask[..., 1:])
    p = predominance_score(gpt2_tiny, _queries(gpt2_tiny)[:2], ignore_first=True)
    assert all(pos > 0 for pos in p.most_attended_position)

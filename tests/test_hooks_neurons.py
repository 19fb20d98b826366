import pytest
import torch

from kn_lens import errors, hooks
from kn_lens.facts import Fact, answer_logprobs, make_query
from kn_lens.neurons import (Neuron, NeuronScores, NeuronSet, freeze_layers, intersection,
                             quantile, random_like, refine, threshold_relative, top_fraction, top_k,
                             top_k_per_token, union)


def _q(m):
    return make_query(m, Fact("France", "capital", "Paris"), "The capital of {} is")


def test_hook_names():
    assert hooks.mlp_post(3) == "blocks.3.mlp.hook_post"
    assert hooks.layer_of(hooks.mlp_post(12)) == 12


def test_scale_by_one_is_noop(tiny_model):
    q = _q(tiny_model)
    base = tiny_model(q.tokens())
    ns = NeuronSet([(0, 1), (1, 5), (2, 7)])
    with tiny_model.hooks(fwd_hooks=hooks.scale_neurons(ns, 1.0)):
        out = tiny_model(q.tokens())
    assert torch.equal(base, out)
    assert hooks.active_hook_count(tiny_model) == 0


def test_zeroing_equals_setting_zero(tiny_model):
    q = _q(tiny_model)
    ns = NeuronSet([(0, 1), (1, 5), (1, 6)])
    a = answer_logprobs(tiny_model, [q], fwd_hooks=hooks.scale_neurons(ns, 0.0))
    b = answer_logprobs(tiny_model, [q], fwd_hooks=hooks.set_neurons(ns, 0.0))
    c = answer_logprobs(tiny_model, [q])
    assert torch.allclose(a, b) and not torch.allclose(a, c)


def test_scale_at_position_only(tiny_model):
    q = _q(tiny_model)
    store = {}
    ns = NeuronSet([(1, 3)])
    with tiny_model.hooks(fwd_hooks=hooks.scale_neurons(ns, 2.0, positions=q.last_position)
                          + hooks.cache_hook(hooks.mlp_post(1), store)):
        tiny_model(q.tokens())
    _, cache = tiny_model.run_with_cache(q.tokens(), names_filter=hooks.mlp_post(1))
    clean = cache[hooks.mlp_post(1)]
    assert torch.allclose(store[hooks.mlp_post(1)][0, -1, 3], 2 * clean[0, -1, 3])
    assert torch.equal(store[hooks.mlp_post(1)][0, :-1], clean[0, :-1])


def test_no_hooks_after_error(tiny_model):
    with pytest.raises(RuntimeError):
        with tiny_model.hooks(fwd_hooks=hooks.scale_neurons(NeuronSet([(0, 0)]), 0.0)):
            raise RuntimeError("boom")
    assert hooks.active_hook_count(tiny_model) == 0


def test_set_algebra():
    a, b, c = NeuronSet([(0, 1), (1, 2)]), NeuronSet([(1, 2), (2, 3)]), NeuronSet([(2, 3)])
    assert union([a, b]) == NeuronSet([(0, 1), (1, 2), (2, 3)]) == a | b
    assert intersection([a, b]) == NeuronSet([(1, 2)]) == a & b
    assert refine([a, b, c]) == NeuronSet([(1, 2), (2, 3)])
    assert Neuron(1, 2) in a and len(a - b) == 1
    m = a.mask(3, 4)
    assert NeuronSet.from_mask(m) == a and m.sum() == 2


def test_selection():
    s = torch.zeros(4, 10)
    s[0, 1], s[1, 2], s[2, 3], s[3, 4] = 1.0, 5.0, 3.0, 10.0
    assert top_k(s, 2) == NeuronSet([(3, 4), (1, 2)])
    assert top_k(s, 2, freeze_last=1) == NeuronSet([(1, 2), (2, 3)])
    assert threshold_relative(s, 0.2) == NeuronSet([(3, 4), (1, 2), (2, 3)])
    assert len(top_fraction(s, 0.05)) == 2
    assert quantile(s, 0.95) == NeuronSet([(3, 4), (1, 2)])
    assert torch.isinf(freeze_layers(s, last=2)[2:]).all()
    with pytest.raises(errors.ConfigError):
        quantile(s, 1.5)
    per_tok = torch.stack([s, s.flip(1)])
    from kn_lens.models import ModelInfo

    info = ModelInfo("x", "random", "float32", False, False, False, False, 4, 8, 10, False, "LN")
    ns = NeuronScores(s, "test", None, None, info, per_token=per_tok)
    assert top_k_per_token(ns, 1) == NeuronSet([(3, 4), (3, 5)])
    with pytest.raises(errors.NumericalError):
        NeuronScores(torch.full((2, 2), float("nan")), "t", None, None, info)


def test_random_like_is_seeded_and_disjoint():
    ex = NeuronSet([(0, i) for i in range(5)])
    a = random_like(10, 2, 8, generator=torch.Generator().manual_seed(1), exclude=ex)
    b = random_like(10, 2, 8, generator=torch.Generator().manual_seed(1), exclude=ex)
    assert a == b and len(a) == 10 and not (a & ex)

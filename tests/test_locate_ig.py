"""Integrated gradients: fast == plain, completeness, baselines, per-token maps, hygiene."""
import importlib

import pytest
import torch

from kn_lens import hooks
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import answer_probs, query_from_prompt
from kn_lens.locate.integrated_gradients import (
    IGConfig,
    baseline_tokens,
    integrated_gradients,
    integrated_gradients_eos,
    integrated_gradients_plain,
    path_endpoint_probs,
)
from kn_lens.neurons import NeuronScores

PROMPT = "The capital of France is"


@pytest.fixture(params=["Paris", "Guido van Rossum"], ids=["single", "multi"])
def query(request, tiny_model):
    q = query_from_prompt(tiny_model, PROMPT, request.param)
    assert (q.n_answer == 1) == (request.param == "Paris")
    return q


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("baseline", ["zero", "eos"])
def test_fast_equals_plain(tiny_model, query, baseline):
    cfg = IGConfig(baseline=baseline)
    fast = integrated_gradients(tiny_model, query, config=cfg)
    plain = integrated_gradients_plain(tiny_model, query, config=cfg)
    assert plain.per_token.abs().max() > 0
    assert _rel(fast.per_token, plain.per_token) < 1e-4
    assert _rel(fast.scores, plain.scores) < 1e-4
    assert fast.method == ("ig" if baseline == "zero" else "ig_eos")
    assert plain.method == "ig_plain" and plain.config.baseline == baseline


@pytest.mark.parametrize("arch", ["gemma3", "neox", "llama"])
@pytest.mark.parametrize("blocks", ["prefix", "transformer_lens"])
def test_fast_equals_plain_across_blocks(arch, blocks, monkeypatch):
    """Both fast paths (kn-lens' one-position prefix blocks; TransformerLens' forward with a
    frozen key/value cache) equal the plain loop on Gemma-3-style blocks (q/k norms, sliding
    windows shorter than the prompt, soft-caps), GPT-NeoX-style parallel blocks with partial
    rotary, and LLaMA-style blocks; a small chunk splits the steps and layers over calls."""
    from kn_lens import testing

    model = {"gemma3": testing.tiny_gemma3, "neox": testing.tiny_neox,
             "llama": testing.tiny_llama}[arch](seed=1)
    ig_mod = importlib.import_module("kn_lens.locate.integrated_gradients")
    if blocks == "transformer_lens":
        monkeypatch.setattr(ig_mod, "_use_prefix_blocks", lambda model: False)
    q = query_from_prompt(model, PROMPT, "Guido van Rossum")  # multi-token: several positions
    for cfg in (IGConfig(baseline="eos"), IGConfig(chunk=7, steps=5)):
        fast = integrated_gradients(model, q, config=cfg)
        plain = integrated_gradients_plain(model, q, config=cfg)
        assert fast.extras["blocks"] == blocks
        assert plain.per_token.abs().max() > 0
        assert _rel(fast.per_token, plain.per_token) < 1e-4


def test_hooks_on_the_model_are_honoured(llama_tiny):
    """With a hook attached (here: an edit-like scaling of some neurons), the fast IG runs
    TransformerLens' forward, which fires every hook point, and equals the plain loop under the
    same hook."""
    q = query_from_prompt(llama_tiny, PROMPT, "Paris")
    scale = [("blocks.0.mlp.hook_post", lambda act, hook: act * 1.5)]
    with llama_tiny.hooks(fwd_hooks=scale):
        fast = integrated_gradients(llama_tiny, q)
        plain = integrated_gradients_plain(llama_tiny, q)
    assert fast.extras["blocks"] == "transformer_lens"
    assert _rel(fast.per_token, plain.per_token) < 1e-4
    assert _rel(fast.per_token, integrated_gradients(llama_tiny, q).per_token) > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_fast_ig_does_the_floor_flops(arch, monkeypatch):
    """The matmul FLOPs the fast IG executes (counted by torch's FlopCounterMode around its
    batched forward/backward calls) are the floor ``ig_flops`` counts, to 1 % (einsum computes
    the answer position's own attention terms elementwise; gemma3's sliding window masks
    scores the floor does not count)."""
    from torch.utils.flop_counter import FlopCounterMode

    from kn_lens import testing
    from kn_lens.locate.integrated_gradients import ig_flops

    model = {"gpt2": testing.tiny_gpt2, "llama": testing.tiny_llama,
             "gemma3": testing.tiny_gemma3}[arch]()
    ig_mod = importlib.import_module("kn_lens.locate.integrated_gradients")
    inner, counted = ig_mod._grad_prefix, []

    def counting(*args, **kw):
        with FlopCounterMode(display=False) as fc:
            out = inner(*args, **kw)
        counted.append(fc.get_total_flops())
        return out

    monkeypatch.setattr(ig_mod, "_grad_prefix", counting)
    q = query_from_prompt(model, PROMPT, "Guido van Rossum")
    cfg = IGConfig(steps=5, chunk=7, layers=(0, 2))
    integrated_gradients(model, q, config=cfg)
    floor = ig_flops(model, q, config=cfg)
    assert floor.rows == 5 * 2 * q.n_answer
    assert floor.unembed == floor.rows * 4 * model.cfg.d_model * model.cfg.d_vocab
    assert abs(sum(counted) - floor.total) < 0.01 * floor.total


def test_shapes_and_metadata(tiny_model, query):
    s = integrated_gradients(tiny_model, query)
    L, d = tiny_model.cfg.n_layers, tiny_model.cfg.d_mlp
    assert isinstance(s, NeuronScores)
    assert s.shape == (L, d)
    assert s.per_token.shape == (query.n_answer, L, d)
    torch.testing.assert_close(s.scores, s.per_token.sum(0))
    assert s.query is query and s.config == IGConfig()
    assert s.model.n_layers == L and s.model.d_mlp == d
    p = float(answer_probs(tiny_model, [query])[0])
    assert p == pytest.approx(float(torch.tensor(s.extras["p_clean"]).prod()), rel=1e-4)


@pytest.mark.parametrize("baseline", ["zero", "eos"])
def test_completeness(tiny_model, query, baseline):
    """A layer's attributions sum to P(real) - P(baseline); the Riemann error shrinks with m."""
    cfg = IGConfig(baseline=baseline)
    n = tiny_model.cfg.n_layers
    for j in range(query.n_answer):
        ends = [path_endpoint_probs(tiny_model, query, l, config=cfg, answer_index=j)
                for l in range(n)]
        layer = max(range(n), key=lambda l: abs(ends[l][0] - ends[l][1]))
        diff = ends[layer][0] - ends[layer][1]
        assert abs(diff) > 1e-5
        errs = []
        for steps in (5, 20, 200):
            s = integrated_gradients(tiny_model, query,
                                     config=IGConfig(steps=steps, baseline=baseline))
            errs.append(abs(float(s.per_token[j, layer].sum()) - diff))
        assert errs[2] < errs[1] < errs[0]
        assert errs[2] < 0.03 * abs(diff)


def test_chunk_and_layers_do_not_change_result(tiny_model, query):
    full = integrated_gradients(tiny_model, query)
    chunked = integrated_gradients(tiny_model, query, config=IGConfig(chunk=3))
    assert _rel(chunked.per_token, full.per_token) < 1e-5
    part = integrated_gradients(tiny_model, query, config=IGConfig(layers=(1,)))
    assert _rel(part.scores[1], full.scores[1]) < 1e-5
    assert part.scores[0].abs().sum() == 0 and part.scores[2].abs().sum() == 0


def test_same_input_same_result(tiny_model, query):
    a = integrated_gradients(tiny_model, query, config=IGConfig(baseline="eos"))
    b = integrated_gradients(tiny_model, query, config=IGConfig(baseline="eos"))
    assert torch.equal(a.per_token, b.per_token)


def test_eos_baseline(tiny_model, query):
    toks = baseline_tokens(tiny_model, query)
    eos = tiny_model.tokenizer.eos_token_id
    assert len(toks) == len(query.input_ids)
    assert all(t == eos for t in toks[1:])
    z = integrated_gradients(tiny_model, query)
    e = integrated_gradients_eos(tiny_model, query)
    assert e.method == "ig_eos" and e.config.baseline == "eos"
    assert not torch.allclose(z.scores, e.scores)
    with pytest.raises(ConfigError):
        integrated_gradients_eos(tiny_model, query, config=IGConfig())


@pytest.mark.parametrize("fn", [integrated_gradients, integrated_gradients_plain])
def test_no_hooks_left_after_error(tiny_model, query, fn, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("forced failure inside the backward")

    # the module, not the function of the same name re-exported by kn_lens.locate
    ig_mod = importlib.import_module("kn_lens.locate.integrated_gradients")
    monkeypatch.setattr(ig_mod.torch.autograd, "grad", boom)
    with pytest.raises(RuntimeError, match="forced failure"):
        fn(tiny_model, query)
    assert hooks.active_hook_count(tiny_model) == 0


def test_bad_config_and_input(gpt2_tiny):
    for bad in (dict(steps=0), dict(chunk=0), dict(baseline="mask"), dict(layers=())):
        with pytest.raises(ConfigError):
            IGConfig(**bad)
    q = query_from_prompt(gpt2_tiny, PROMPT, "Paris")
    with pytest.raises(ConfigError):
        integrated_gradients(gpt2_tiny, q, config=IGConfig(layers=(99,)))
    with pytest.raises(InvalidFactError):
        integrated_gradients(gpt2_tiny, "not a query")


@pytest.mark.real_model
def test_real_model_located_neurons_matter(default_model):
    """Zeroing the top 0.1 % neurons of IG or FiNE contribution lowers P(answer) far more than
    zeroing as many random neurons."""
    from kn_lens.locate.contribution import contribution_scores
    from kn_lens.neurons import random_like, top_fraction

    m = default_model
    L, d = m.cfg.n_layers, m.cfg.d_mlp
    facts = [("The Eiffel Tower is located in the city of", "Paris"),
             ("The capital of Japan is the city of", "Tokyo")]
    gen = torch.Generator().manual_seed(0)
    for prompt, answer in facts:
        q = query_from_prompt(m, prompt, answer)
        p0 = float(answer_probs(m, [q])[0])
        assert p0 > 0.2, f"the model does not know {prompt!r} -> {answer!r} (p={p0:.3f})"
        for scores in (integrated_gradients(m, q, config=IGConfig(steps=10)),
                       contribution_scores(m, q)):
            sel = top_fraction(scores, 0.001)
            assert len(sel) == round(0.001 * L * d)
            drop = p0 - float(answer_probs(m, [q], fwd_hooks=hooks.scale_neurons(sel, 0.0))[0])
            rand = [p0 - float(answer_probs(m, [q], fwd_hooks=hooks.scale_neurons(
                random_like(sel, L, d, generator=gen), 0.0))[0]) for _ in range(3)]
            rand_drop = max(0.0, sum(rand) / len(rand))
            assert drop > 0.05 and drop > 2 * rand_drop, (scores.method, prompt, drop, rand)
    assert hooks.active_hook_count(m) == 0


@pytest.mark.real_model
def test_real_model_fast_equals_plain(default_model):
    """On SmolLM2 (LLaMA-style: rotary, grouped-query attention, 49k vocabulary) the fast IG's
    own blocks and vocabulary sweep give the plain loop's scores; P(a) of the clean run too."""
    m = default_model
    q = query_from_prompt(m, "The Eiffel Tower is located in the city of", "Paris")
    cfg = IGConfig(steps=4, layers=(0, 14, 29))
    fast = integrated_gradients(m, q, config=cfg)
    plain = integrated_gradients_plain(m, q, config=cfg)
    assert fast.extras["blocks"] == "prefix"
    assert _rel(fast.scores, plain.scores) < 1e-4
    assert fast.extras["p_clean"][0] == pytest.approx(float(answer_probs(m, [q])[0]), rel=1e-4)

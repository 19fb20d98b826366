"""``load_model(..., backend="bridge")``: TransformerLens' TransformerBridge (TransformerLens 4's
model class) computes what the HookedTransformer of the same weights computes, through every
locator, hook factory, the scorer, generation and edits.

Each tiny model is a random Hugging Face model saved to a folder and loaded twice, once per
backend, with the same weight processing (folded norms; centred writing weights for LayerNorm
models). Tolerances: ``_close`` compares with an absolute error of 1e-4 x the largest value (the
two backends run different kernels - Hugging Face's eager attention vs TransformerLens' - so they
agree to float32 rounding, measured ~1e-6 relative; 1e-4 leaves room for other BLAS builds).
"""
import pytest
import torch

from kn_lens import hooks as H
from kn_lens.backend import is_bridge
from kn_lens.edit import Edit, edit, head_slices, low_rank, w_in_columns, w_out_rows
from kn_lens.errors import ConfigError
from kn_lens.facts import Fact, make_query, query_from_prompt
from kn_lens.models import load_model, model_info
from kn_lens.neurons import Neuron
from kn_lens.testing import tiny_hf_folder

FAMILIES = ("llama", "gpt2", "gemma-3")  # gated RMS + GQA + rotary; LayerNorm + learned
# positions; Gemma's post-norms, q/k norms, local attention and scaled embeddings


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    folder = tiny_hf_folder(tmp_path_factory.mktemp("bridge") / request.param, request.param,
                            n_layers=3, initializer_range=0.2)
    return load_model(folder), load_model(folder, backend="bridge")


def _close(a, b, rel: float = 1e-4):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    scale = float(a.abs().max())
    assert scale > 0, "a trivially equal comparison (all zero)"
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x {scale:.3g}"


def _queries(model):
    return (query_from_prompt(model, "The capital of France is", "Guido van Rossum"),
            make_query(model, Fact("France", "capital", "Paris"), "The capital of {} is"))


def test_bridge_is_loaded_like_the_hooked_model(pair):
    hooked, bridge = pair
    assert is_bridge(bridge) and not is_bridge(hooked)
    a, b = model_info(hooked).to_dict(), model_info(bridge).to_dict()
    assert a.pop("backend") == "hooked" and b.pop("backend") == "bridge"
    assert a == b  # same name, processing, normalisation name, sizes, device, dtype
    for qa, qb in zip(_queries(hooked), _queries(bridge)):
        assert qa.input_ids == qb.input_ids and qa.answer_positions == qb.answer_positions
    toks = torch.tensor([list(_queries(hooked)[0].input_ids)])
    with torch.no_grad():
        _close(hooked(toks), bridge(toks))


def test_unknown_hook_name_is_an_error_on_the_bridge(pair):
    """TransformerLens 3.9's bridge skips hook names it does not have; kn-lens's bridges refuse
    them (a missing hook point must not turn into a silently unchanged forward pass)."""
    _, bridge = pair
    with pytest.raises(ConfigError, match="blocks.0.mlp.hook_nothing"):
        with bridge.hooks(fwd_hooks=[("blocks.0.mlp.hook_nothing", lambda a, hook: a)]):
            pass
    assert H.active_hook_count(bridge) == 0


def test_every_locator_gives_the_hooked_scores(pair):
    """IG (fast path on the HookedTransformer, whole forwards on the bridge), IG with the EOS
    baseline, FiNE's contribution, exact mediation and attribution patching."""
    from kn_lens.locate import IGConfig, contribution_scores, integrated_gradients
    from kn_lens.locate.mediation import (AtPConfig, MediationConfig, attribution_patching,
                                          causal_mediation)

    hooked, bridge = pair
    runs = {
        "ig": lambda m, q, q2: integrated_gradients(m, q, config=IGConfig(steps=6)),
        "ig_eos": lambda m, q, q2: integrated_gradients(m, q, config=IGConfig(steps=6,
                                                                              baseline="eos")),
        "contribution": lambda m, q, q2: contribution_scores(m, q),
        "mediation": lambda m, q, q2: causal_mediation(m, q2, config=MediationConfig(
            n_noise=2, gamma=10.0)),
        "atp": lambda m, q, q2: attribution_patching(m, q2, config=AtPConfig(n_noise=2)),
    }
    for name, fn in runs.items():
        a, b = fn(hooked, *_queries(hooked)), fn(bridge, *_queries(bridge))
        assert a.method == b.method, name
        _close(a.scores, b.scores)
        assert b.model.backend == "bridge"
    ig = integrated_gradients(bridge, _queries(bridge)[0], config=IGConfig(steps=2))
    assert ig.extras["implementation"] == "plain (TransformerBridge)"


def test_hook_factories_act_alike(pair):
    hooked, bridge = pair
    d, d_mlp = hooked.cfg.d_model, hooked.cfg.d_mlp
    toks = torch.randint(0, hooked.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    factories = [
        H.scale_neurons([Neuron(0, 3), Neuron(1, 5)], 0.0),
        H.set_neurons([Neuron(0, 3), Neuron(2, 5)], torch.tensor([1.5, -2.0]), positions=[2, 3]),
        H.add_to(H.resid_pre(1), torch.linspace(-1.0, 1.0, d)),  # not constant: LN removes that
        H.patch_activations(H.mlp_post(1), torch.zeros(1, 7, d_mlp), index=torch.tensor([1, 2]),
                            positions=[4]),
    ]
    with torch.no_grad():
        base = torch.log_softmax(hooked(toks), -1)
        for fwd in factories:
            outs = []
            for m in (hooked, bridge):
                with m.hooks(fwd_hooks=fwd):
                    outs.append(torch.log_softmax(m(toks), -1))
            _close(*outs)
            assert not torch.allclose(outs[0], base)  # the hook changed something
    stores = ({}, {})
    for m, store in zip((hooked, bridge), stores):
        with torch.no_grad(), m.hooks(fwd_hooks=H.cache_hook(H.attn_pattern(1), store)):
            m(toks)
    _close(stores[0][H.attn_pattern(1)], stores[1][H.attn_pattern(1)])
    assert H.active_hook_count(bridge) == 0


def test_scorer_generation_and_tracing_agree(pair):
    from kn_lens.analysis import TraceConfig, causal_trace
    from kn_lens.evaluate import generation as G
    from kn_lens.evaluate.scoring import score

    hooked, bridge = pair
    (qa, qa2), (qb, qb2) = _queries(hooked), _queries(bridge)
    sa, sb = score(hooked, [qa, qa2], top_k=3), score(bridge, [qb, qb2], top_k=3)
    for x, y in zip(sa, sb):
        _close(x.token_logprobs, y.token_logprobs)
        assert x.argmax == y.argmax and x.top_ids == y.top_ids
    prompts = [list(qa.prompt_ids), list(qa.prompt_ids)[2:]]
    assert G.greedy(hooked, prompts[0], 5) == G.greedy(bridge, prompts[0], 5)
    assert G.greedy_batch(hooked, prompts, 5) == G.greedy_batch(bridge, prompts, 5)
    ta = causal_trace(hooked, qa2, config=TraceConfig(n_noise=2))
    tb = causal_trace(bridge, qb2, config=TraceConfig(n_noise=2))
    _close(ta.p_restored, tb.p_restored)


def _every_kind_of_delta(model, seed=1) -> Edit:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    deltas = [w_out_rows(1, [2, 7], torch.randn(2, cfg.d_model, generator=g)),
              w_in_columns(0, [1, 4], torch.randn(cfg.d_model, 2, generator=g)),
              head_slices(2, "W_Q", [1], torch.randn(1, cfg.d_model, cfg.d_head, generator=g)),
              head_slices(1, "W_K", [0], torch.randn(1, cfg.d_model, cfg.d_head, generator=g)),
              head_slices(1, "W_V", [0], torch.randn(1, cfg.d_model, cfg.d_head, generator=g)),
              head_slices(0, "W_O", [2], torch.randn(1, cfg.d_head, cfg.d_model, generator=g)),
              low_rank(2, "W_out", torch.randn(cfg.d_mlp, 1, generator=g),
                       torch.randn(cfg.d_model, 1, generator=g))]
    if cfg.gated_mlp:
        deltas.append(w_in_columns(2, [3], torch.randn(cfg.d_model, 1, generator=g), gate=True))
    return Edit(tuple(deltas), "every kind", "test", model_info(model))


def test_edits_through_hooks_and_materialised_equal_the_hooked_effect(pair):
    """An edit made on one backend applies to the other (same processed weights); on the bridge
    it acts the same through hooks and written into the weights (views of the Hugging Face
    weights), and the weights come back bit for bit."""
    hooked, bridge = pair
    e = _every_kind_of_delta(hooked)
    toks = torch.randint(0, hooked.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    with torch.no_grad():
        base = bridge(toks)
        with hooked.hooks(fwd_hooks=e.hooks(hooked)):
            ref = torch.log_softmax(hooked(toks), -1)
        with bridge.hooks(fwd_hooks=e.hooks(bridge)):
            via_hooks = torch.log_softmax(bridge(toks), -1)
        with e.applied(bridge):
            written = torch.log_softmax(bridge(toks), -1)
        assert torch.equal(bridge(toks), base)
    assert (ref - torch.log_softmax(base, -1)).abs().max() > 0.1  # the edit does something
    _close(ref, via_hooks)
    _close(ref, written)
    after = bridge.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert H.active_hook_count(bridge) == 0


def test_a_weight_the_bridge_computes_cannot_be_written(pair, monkeypatch):
    """A bridge property that is a copy (as a fused or quantised weight would be) is refused by
    name instead of being edited silently without effect; hooks still apply the edit."""
    _, bridge = pair
    cls = type(bridge.blocks[1].mlp)
    plain = cls.W_out.fget
    monkeypatch.setattr(cls, "W_out", property(lambda self: plain(self).clone()))
    e = Edit((w_out_rows(1, [0], torch.ones(1, bridge.cfg.d_model)),), "", "", model_info(bridge))
    with pytest.raises(ConfigError, match="blocks.1.mlp.W_out"):
        with e.applied(bridge):
            pass
    with bridge.hooks(fwd_hooks=e.hooks(bridge)):
        pass


def test_editors_compute_the_same_edit_on_both_backends(pair):
    """The optimisation loop (FiNE: weight deltas; ROME / MEMIT: k*/v* and their updates; KNE on
    attention heads) and the neuron editors run on the bridge and give the hooked model's
    deltas."""
    from kn_lens.edit.baselines.memit import MEMITConfig
    from kn_lens.edit.baselines.rome import ROMEConfig
    from kn_lens.edit.fine import FiNEConfig
    from kn_lens.edit.kn import KNEditorConfig
    from kn_lens.edit.kne import KNEConfig
    from test_edit_engine import STATS, _reference_available, _request

    hooked, bridge = pair
    configs = {"kn_erase": KNEditorConfig(locator="contribution"),
               "fine": FiNEConfig(steps=3, freeze_last=1),
               "kne": KNEConfig(steps=2, ig_steps=3, module="W_Q")}
    if _reference_available():  # the reference prose gives ROME / MEMIT their second moments
        configs["rome"] = ROMEConfig(v_steps=3, stats_tokens=STATS)
        configs["memit"] = MEMITConfig(v_steps=3, stats_tokens=STATS)
    for method, config in configs.items():
        ea = edit(hooked, [_request()], method=method, config=config, seed=1)
        eb = edit(bridge, [_request()], method=method, config=config, seed=1)
        assert len(ea.deltas) == len(eb.deltas) > 0
        for da, db in zip(ea.deltas, eb.deltas):
            if hasattr(da, "u"):
                _close(da.dense(), db.dense(), rel=1e-3)
            else:
                assert torch.equal(da.index, db.index)
                _close(da.values, db.values, rel=1e-3)


def test_fast_forward_leaves_a_bridge_as_it_is(pair):
    from kn_lens._fast import fast_forward

    _, bridge = pair
    toks = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = bridge(toks)
        with fast_forward(bridge, frozen_weights=True):
            assert not any("forward" in vars(m) for m in bridge.modules())
            assert torch.equal(bridge(toks), ref)


def test_start_at_layer_is_refused_on_a_bridge(pair):
    from kn_lens.evaluate.scoring import logits_at

    _, bridge = pair
    with pytest.raises(ConfigError, match="start_at_layer"):
        logits_at(bridge, [[1, 2, 3]], [[2]], start_at_layer=1,
                  resid=torch.zeros(1, 3, bridge.cfg.d_model))


@pytest.mark.real_model
def test_smollm2_bridge_matches_hooked(default_model):
    """SmolLM2-135M through both backends: contribution and IG on one query (IG on two layers and
    five steps: the bridge runs whole forwards), and a KN erasure's effect through hooks and
    materialised on the bridge."""
    from kn_lens.evaluate.scoring import score
    from kn_lens.locate import IGConfig, contribution_scores, integrated_gradients
    from kn_lens.neurons import top_k

    bridge = load_model(backend="bridge", device=default_model.cfg.device)
    fact = Fact("Eiffel Tower", "located_in", "Paris")
    qa = make_query(default_model, fact, "The {} is located in the city of")
    qb = make_query(bridge, fact, "The {} is located in the city of")
    assert qa.input_ids == qb.input_ids
    ca, cb = contribution_scores(default_model, qa), contribution_scores(bridge, qb)
    _close(ca.scores, cb.scores)
    cfg = IGConfig(steps=5, layers=(12, 24))
    _close(integrated_gradients(default_model, qa, config=cfg).scores,
           integrated_gradients(bridge, qb, config=cfg).scores)
    from kn_lens.edit import erase

    e = erase(default_model, top_k(ca, 20))
    before = score(default_model, [qa])[0].logprob
    with default_model.hooks(fwd_hooks=e.hooks(default_model)):
        ref = score(default_model, [qa])[0].logprob
    with bridge.hooks(fwd_hooks=e.hooks(bridge)):
        via_hooks = score(bridge, [qb])[0].logprob
    with e.applied(bridge):
        written = score(bridge, [qb])[0].logprob
    assert ref < before - 0.5  # the erasure lowers P(Paris)
    assert abs(via_hooks - ref) < 1e-3 and abs(written - ref) < 1e-3

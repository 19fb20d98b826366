"""Neuron-level causal mediation (TNF-DA) with DNI pruning, and attribution patching."""
from __future__ import annotations

import math

import pytest
import torch

from kn_lens import hooks
from kn_lens.errors import ConfigError
from kn_lens.facts import Fact, answer_probs, make_query
from kn_lens.locate import mediation as med
from kn_lens.locate.mediation import (AtPConfig, MediationConfig, attribution_patching,
                                      causal_mediation, causal_mediation_plain,
                                      mediation_agreement)


def _query(model, obj="Paris", subject="France"):
    return make_query(model, Fact(subject, "capital", obj), "The capital of {} is")


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("model_name,restore,corrupt,obj,shared_prefix", [
    ("gpt2_tiny", "last", "subject", "Paris", True),
    ("llama_tiny", "last", "subject", "Paris", True),
    ("gpt2_tiny", "all", "all", "Paris", True),
    ("llama_tiny", "last", "all", "Guido van Rossum", True),  # multi-token answer
    ("llama_tiny", "all", "subject", "Guido van Rossum", True),
    ("gpt2_tiny", "last", "subject", "Guido van Rossum", False),
    ("llama_tiny", "last", "subject", "Paris", False),
])
def test_fast_equals_plain(request, monkeypatch, model_name, restore, corrupt, obj,
                           shared_prefix):
    """Both fast paths (own shared-prefix attention; TransformerLens blocks with a frozen KV
    cache) equal one hooked full forward pass per neuron."""
    monkeypatch.setattr(med, "_USE_SHARED_PREFIX_ATTENTION", shared_prefix)
    model = request.getfixturevalue(model_name)
    assert med._shared_prefix_ok(model) == shared_prefix
    q = _query(model, obj)
    cfg = MediationConfig(n_noise=1, gamma=5.0, restore_positions=restore, corrupt=corrupt,
                          chunk=3)
    fast = causal_mediation(model, q, config=cfg)
    plain = causal_mediation_plain(model, q, config=cfg)
    assert torch.equal(fast.extras["searched"], plain.extras["searched"])
    p_scale = max(fast.extras["p_clean"], fast.extras["p_corrupted"][0])
    assert fast.scores.abs().max() > 1e-3 * p_scale  # something to compare
    # 1e-4: float32 round-off of products of small per-token probabilities (multi-token answers)
    # reaches ~1e-5 of the scale on one thread
    assert torch.allclose(fast.scores, plain.scores, atol=1e-4 * p_scale, rtol=0)
    assert math.isclose(fast.extras["p_corrupted"][0], plain.extras["p_corrupted"][0],
                        rel_tol=1e-5)
    assert fast.extras["restored_positions"] == (
        (q.last_position,) if restore == "last" else tuple(range(len(q.input_ids))))


@pytest.mark.parametrize("arch", ["gemma3", "neox"])
@pytest.mark.parametrize("restore", ["last", "all"])
def test_fast_equals_plain_other_blocks(arch, restore):
    """The shared-prefix path on Gemma-3-style blocks (q/k norms, sliding windows shorter than
    the prompt, soft-caps) and GPT-NeoX-style parallel blocks equals the plain pass."""
    from kn_lens import testing

    model = {"gemma3": testing.tiny_gemma3, "neox": testing.tiny_neox}[arch](seed=2)
    assert med._shared_prefix_ok(model)
    q = _query(model, "Guido van Rossum")
    cfg = MediationConfig(n_noise=1, gamma=5.0, restore_positions=restore, chunk=5)
    fast = causal_mediation(model, q, config=cfg)
    plain = causal_mediation_plain(model, q, config=cfg)
    p_scale = max(fast.extras["p_clean"], fast.extras["p_corrupted"][0])
    assert fast.scores.abs().max() > 1e-3 * p_scale
    assert torch.allclose(fast.scores, plain.scores, atol=1e-4 * p_scale, rtol=0)


def test_chunk_never_changes_result(llama_tiny):
    q = _query(llama_tiny)
    a = causal_mediation(llama_tiny, q, config=MediationConfig(n_noise=1, gamma=30, chunk=1))
    b = causal_mediation(llama_tiny, q, config=MediationConfig(n_noise=1, gamma=30, chunk=10_000))
    assert torch.allclose(a.scores, b.scores, atol=1e-7, rtol=0)


def test_restoring_every_neuron_equals_restoring_the_mlp_output(tiny_model):
    """What restoring "every neuron" really guarantees. Restoring all of ``hook_post`` (even in
    every layer, at every position) does NOT give back the clean run: attention outputs and the
    noisy embeddings still carry the corruption. The exact invariant is that the neurons are the
    MLP's complete mediators: W_out reads ``hook_post`` and nothing else, so restoring every
    neuron of layer l equals restoring the MLP's output ``hook_mlp_out(l)``, at any set of
    positions, and restoring them in every layer equals restoring every MLP output."""
    q = _query(tiny_model)
    cfg = MediationConfig(n_noise=1, gamma=100)
    noise, _, _ = med.noise_samples(tiny_model, q, cfg)
    _, clean = tiny_model.run_with_cache(q.tokens())
    noisy = hooks.add_to(hooks.embed(), noise[0][None])
    p_clean = float(answer_probs(tiny_model, [q])[0])
    p_corr = float(answer_probs(tiny_model, [q], fwd_hooks=noisy)[0])
    assert abs(p_corr - p_clean) > 1e-3 * p_clean  # the noise does something

    def prob(fwd):
        return float(answer_probs(tiny_model, [q], fwd_hooks=noisy + fwd)[0])

    L = tiny_model.cfg.n_layers
    for positions in (None, [q.last_position]):
        every_neuron, every_mlp = [], []
        for layer in range(L):
            neurons = hooks.patch_activations(hooks.mlp_post(layer), clean[hooks.mlp_post(layer)],
                                              positions=positions)
            mlp = hooks.patch_activations(hooks.mlp_out(layer), clean[hooks.mlp_out(layer)],
                                          positions=positions)
            p_n, p_m = prob(neurons), prob(mlp)
            assert math.isclose(p_n, p_m, rel_tol=1e-5), (layer, positions)
            every_neuron += neurons
            every_mlp += mlp
        assert math.isclose(prob(every_neuron), prob(every_mlp), rel_tol=1e-5)


def test_zero_noise_gives_zero_effects(tiny_model):
    q = _query(tiny_model)
    cfg = MediationConfig(n_noise=1, gamma=100, noise_scale=0.0, restore_positions="all")
    res = causal_mediation(tiny_model, q, config=cfg)
    assert math.isclose(res.extras["p_corrupted"][0], res.extras["p_clean"], rel_tol=1e-5)
    assert res.scores.abs().max() < 1e-5 * res.extras["p_clean"]
    assert float(res.extras["dni"].max()) < 1e-5


def test_atp_matches_exact_in_the_small_noise_limit(tiny_model):
    """IE_i = (h_i - h*_i) dP/dh_i + O(|h - h*|^2): the relative error of AtP shrinks ~linearly
    with the noise scale."""
    q = _query(tiny_model)
    errs = []
    for nu in (0.03, 0.003):
        e = causal_mediation(tiny_model, q, config=MediationConfig(n_noise=1, gamma=100,
                                                                   noise_scale=nu))
        a = attribution_patching(tiny_model, q, config=AtPConfig(n_noise=1, noise_scale=nu))
        errs.append(float((e.scores - a.scores).abs().max() / e.scores.abs().max()))
    assert errs[1] < 0.02
    assert errs[1] < errs[0] / 3


def test_atp_uses_the_same_noise_as_exact(gpt2_tiny):
    q = _query(gpt2_tiny)
    e = causal_mediation(gpt2_tiny, q, config=MediationConfig(n_noise=2, gamma=5, seed=3))
    a = attribution_patching(gpt2_tiny, q, config=AtPConfig(n_noise=2, seed=3))
    assert a.extras["p_corrupted"] == pytest.approx(e.extras["p_corrupted"], rel=1e-4)
    ag = mediation_agreement(e, a)
    assert -1 <= ag.spearman <= 1 and 0 <= ag.top_overlap <= 1
    assert ag.n_searched == int(e.extras["searched"].sum())


# ----------------------------------------------------------------------------- DNI, seeds, errors


@pytest.mark.parametrize("gamma", [5.0, 20.0, 37.5, 100.0])
def test_dni_pruning_keeps_exactly_gamma_percent(gpt2_tiny, gamma):
    q = _query(gpt2_tiny)
    res = causal_mediation(gpt2_tiny, q, config=MediationConfig(n_noise=1, gamma=gamma))
    mask, dni = res.extras["searched"], res.extras["dni"]
    n = mask.numel()
    assert int(mask.sum()) == max(1, round(gamma / 100 * n))
    assert torch.all(res.scores[~mask] == 0)
    if gamma < 100:
        assert dni[mask].min() >= dni[~mask].max()  # the searched ones are the top DNI


def test_dni_formula(llama_tiny):
    """DNI = |h - h*| / |h| at the restored position (TNF-DA eq. 6)."""
    q = _query(llama_tiny)
    cfg = MediationConfig(n_noise=1, gamma=50)
    res = causal_mediation(llama_tiny, q, config=cfg)
    noise, _, _ = med.noise_samples(llama_tiny, q, cfg)
    _, clean = llama_tiny.run_with_cache(q.tokens())
    with llama_tiny.hooks(fwd_hooks=hooks.add_to(hooks.embed(), noise[0][None])):
        _, corr = llama_tiny.run_with_cache(q.tokens())
    p = q.last_position
    for layer in range(llama_tiny.cfg.n_layers):
        h = clean[hooks.mlp_post(layer)][0, p]
        hs = corr[hooks.mlp_post(layer)][0, p]
        assert torch.allclose(res.extras["dni"][layer], (h - hs).abs() / h.abs(), rtol=1e-3,
                              atol=1e-5)


def test_same_seed_same_result_different_seed_different(gpt2_tiny):
    q = _query(gpt2_tiny)
    a = causal_mediation(gpt2_tiny, q, config=MediationConfig(n_noise=2, gamma=5, seed=1))
    b = causal_mediation(gpt2_tiny, q, config=MediationConfig(n_noise=2, gamma=5, seed=1))
    c = causal_mediation(gpt2_tiny, q, config=MediationConfig(n_noise=2, gamma=5, seed=2))
    assert torch.equal(a.scores, b.scores)
    assert not torch.equal(a.scores, c.scores)
    x = attribution_patching(gpt2_tiny, q, config=AtPConfig(n_noise=2, seed=1))
    y = attribution_patching(gpt2_tiny, q, config=AtPConfig(n_noise=2, seed=1))
    z = attribution_patching(gpt2_tiny, q, config=AtPConfig(n_noise=2, seed=2))
    assert torch.equal(x.scores, y.scores)
    assert not torch.equal(x.scores, z.scores)


def test_subject_positions_cover_the_subject(tiny_model):
    q = make_query(tiny_model, Fact("Eiffel Tower", "loc", "Paris"),
                   "The {} is located in the city of")
    pos = med.subject_positions(tiny_model, q)
    text = tiny_model.tokenizer.decode([q.input_ids[p] for p in pos])
    assert text.strip() == "Eiffel Tower"
    assert pos == tuple(range(pos[0], pos[-1] + 1))
    all_pos = med.corrupted_positions(tiny_model, q, "all")
    n_bos = int(tiny_model.cfg.default_prepend_bos)
    assert all_pos == tuple(range(n_bos, q.n_prompt))  # never BOS, never answer tokens
    noise, cpos, nu = med.noise_samples(tiny_model, q, MediationConfig(n_noise=2))
    assert cpos == pos and nu == pytest.approx(3 * float(tiny_model.W_E.detach().std()))
    outside = [i for i in range(len(q.input_ids)) if i not in pos]
    assert torch.all(noise[:, outside] == 0) and torch.all(noise[:, list(pos)] != 0)


def test_no_hooks_left_after_an_error(llama_tiny, monkeypatch):
    q = _query(llama_tiny)
    mlp = llama_tiny.blocks[1].ln2  # called by every path
    orig = mlp.forward

    def failing(x, *a, **k):  # fails only in the batched restoration runs
        if x.shape[0] > 1:
            raise RuntimeError("boom")
        return orig(x, *a, **k)

    monkeypatch.setattr(mlp, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        causal_mediation(llama_tiny, q, config=MediationConfig(n_noise=1, gamma=50))
    assert hooks.active_hook_count(llama_tiny) == 0

    def always(x, *a, **k):
        raise RuntimeError("bang")

    monkeypatch.setattr(mlp, "forward", always)
    with pytest.raises(RuntimeError, match="bang"):
        attribution_patching(llama_tiny, q, config=AtPConfig(n_noise=1))
    assert hooks.active_hook_count(llama_tiny) == 0


@pytest.mark.parametrize("kw", [dict(gamma=0.0), dict(gamma=-5.0), dict(gamma=100.5),
                                dict(gamma=float("nan")), dict(n_noise=0), dict(n_noise=-1),
                                dict(chunk=0), dict(corrupt="object"),
                                dict(restore_positions="first"), dict(noise_scale=-1.0),
                                dict(noise_multiplier=float("inf"))])
def test_bad_config_raises(kw):
    with pytest.raises(ConfigError):
        MediationConfig(**kw)


def test_bad_atp_config_raises():
    with pytest.raises(ConfigError):
        AtPConfig(n_noise=0)
    with pytest.raises(ConfigError):
        AtPConfig(corrupt="none")


def test_agreement_of_identical_scores(gpt2_tiny):
    q = _query(gpt2_tiny)
    e = causal_mediation(gpt2_tiny, q, config=MediationConfig(n_noise=1, gamma=50))
    ag = mediation_agreement(e, e)
    assert ag.spearman == pytest.approx(1.0) and ag.top_overlap == 1.0
    assert ag.k == max(1, round(0.01 * e.scores.numel()))


def test_result_metadata(gpt2_tiny):
    q = _query(gpt2_tiny)
    cfg = MediationConfig(n_noise=1, gamma=5)
    res = causal_mediation(gpt2_tiny, q, config=cfg)
    assert res.method == "mediation" and res.config == cfg and res.query == q
    assert res.shape == (gpt2_tiny.cfg.n_layers, gpt2_tiny.cfg.d_mlp)
    assert res.model.name == "tiny-gpt2"
    assert res.extras["ie_per_sample"].shape == (1, *res.shape)


# ----------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def eiffel_mediation(default_model):
    m = default_model
    q = make_query(m, Fact("Eiffel Tower", "loc", "Paris"), "The {} is located in the city of")
    cfg = MediationConfig(n_noise=1, gamma=5.0, seed=0)
    return q, cfg, causal_mediation(m, q, config=cfg)


def _random_sets(top, model, n=3):
    from kn_lens.neurons import random_like

    gen = torch.Generator().manual_seed(0)
    return [random_like(top, model.cfg.n_layers, model.cfg.d_mlp, generator=gen, exclude=top)
            for _ in range(n)]


@pytest.mark.real_model
def test_restoring_top_mediation_neurons_recovers_more_than_random(default_model,
                                                                   eiffel_mediation):
    """What mediation measures: restoring the top 0.1 % neurons (jointly, at the restored
    position, same noise) in the corrupted run recovers far more probability than restoring as
    many random neurons."""
    from kn_lens.neurons import top_fraction

    m = default_model
    q, cfg, res = eiffel_mediation
    noise, _, _ = med.noise_samples(m, q, cfg)
    _, clean = m.run_with_cache(q.tokens())
    noisy = hooks.add_to(hooks.embed(), noise[0][None])
    p_corr = float(answer_probs(m, [q], fwd_hooks=noisy)[0])

    def restore(neurons):
        fwd = list(noisy)
        for layer in sorted({n.layer for n in neurons}):
            idx = torch.tensor([n.index for n in neurons if n.layer == layer])
            fwd += hooks.patch_activations(hooks.mlp_post(layer), clean[hooks.mlp_post(layer)],
                                           index=idx, positions=[q.last_position])
        return float(answer_probs(m, [q], fwd_hooks=fwd)[0]) - p_corr

    top = top_fraction(res, 0.001)
    gain_top = restore(top)
    gains = [restore(r) for r in _random_sets(top, m)]
    assert gain_top > 0.02
    assert gain_top > 2 * max(max(gains), 1e-4), (gain_top, gains)


@pytest.mark.real_model
@pytest.mark.xfail(strict=False, reason=(
    "measured: with TNF-DA's DNI pruning, zeroing the top 0.1 % mediation neurons (46) lowers "
    "P(Paris) only 0.70 -> 0.66-0.68 while 46 random neurons move it by -0.12..+0.05: DNI "
    "(|h - h*| / |h|) drops 32 of the 46 neurons with the largest (AtP-estimated) IE from the "
    "search space. With prune='atp' the same test passes (tests/test_locate_behaviour.py)"))
def test_zeroing_top_mediation_neurons_hurts_more_than_random(default_model, eiffel_mediation):
    from kn_lens.neurons import top_fraction

    m = default_model
    q, _, res = eiffel_mediation
    top = top_fraction(res, 0.001)
    p0 = float(answer_probs(m, [q])[0])
    p_top = float(answer_probs(m, [q], fwd_hooks=hooks.scale_neurons(top, 0.0))[0])
    drops = [p0 - float(answer_probs(m, [q], fwd_hooks=hooks.scale_neurons(r, 0.0))[0])
             for r in _random_sets(top, m)]
    drop_rnd = max(sum(drops) / len(drops), 1e-6)
    assert p0 - p_top > 2 * drop_rnd, (p0, p_top, drops)


def test_prune_options(gpt2_tiny):
    q = make_query(gpt2_tiny, Fact("France", "capital", "Paris"), "The capital of {} is")
    full = causal_mediation(gpt2_tiny, q, config=MediationConfig(n_noise=1, gamma=100))
    none = causal_mediation(gpt2_tiny, q, config=MediationConfig(n_noise=1, prune="none", gamma=5))
    assert torch.allclose(full.scores, none.scores)
    atp = causal_mediation(gpt2_tiny, q, config=MediationConfig(n_noise=1, prune="atp", gamma=10))
    searched = atp.extras["searched"]
    assert int(searched.sum()) == round(0.10 * searched.numel())
    # exact IE on the searched neurons equals the unpruned IE there
    assert torch.allclose(atp.scores[searched], full.scores[searched], atol=1e-6)
    with pytest.raises(ConfigError):
        MediationConfig(prune="nope")

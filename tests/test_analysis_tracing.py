"""ROME-style causal tracing (kn_lens.analysis.tracing) and its experiment script."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from kn_lens import hooks
from kn_lens.analysis.tracing import TraceConfig, causal_trace, layer_sweep, layer_window
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import Fact, answer_probs, make_query, query_from_prompt, subject_positions
from kn_lens.locate.mediation import noise_samples

EXP = Path(__file__).resolve().parents[1] / "experiments"
NAME_OF_KIND = {"mlp": hooks.mlp_out, "attn": hooks.attn_out, "resid": hooks.resid_post}


def _query(model, obj="Paris", subject="France", template="The capital of {} is"):
    return make_query(model, Fact(subject, "capital", obj), template)


def _multi(model):
    q = make_query(model, Fact("Python", "creator", "Guido van Rossum"), "{} was created by")
    assert q.n_answer > 1
    return q


@pytest.fixture(scope="module")
def deep_llama():
    """Six layers, so that windows differ from layer to layer."""
    from kn_lens.testing import tiny_llama

    return tiny_llama(n_layers=6)


def _plain_trace(model, query, cfg: TraceConfig) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Reference: one ordinary hooked forward pass per (noise sample, layer)."""
    noise, _, _ = noise_samples(model, query, cfg)
    _, cache = model.run_with_cache(query.tokens())
    pos = (max(subject_positions(model, query)) if cfg.position == "subject_last"
           else query.last_position)
    name = NAME_OF_KIND[cfg.kind]
    L = model.cfg.n_layers
    p_clean = float(answer_probs(model, [query])[0])
    p_corr = torch.zeros(cfg.n_noise)
    p_rest = torch.zeros(cfg.n_noise, L)
    for s in range(cfg.n_noise):
        noisy = hooks.add_to(hooks.embed(), noise[s][None])
        p_corr[s] = float(answer_probs(model, [query], fwd_hooks=noisy)[0])
        for l in range(L):
            lo, hi = layer_window(l, cfg.effective_window, L)
            fwd = noisy + [h for j in range(lo, hi)
                           for h in hooks.patch_activations(name(j), cache[name(j)], positions=[pos])]
            p_rest[s, l] = float(answer_probs(model, [query], fwd_hooks=fwd)[0])
    return p_clean, p_corr, p_rest


# ----------------------------------------------------------------------------- windows and config


def test_layer_window_is_romes():
    # ROME: range(max(0, l - w // 2), min(L, l - (-w // 2)))
    assert layer_window(0, 10, 30) == (0, 5)
    assert layer_window(17, 10, 30) == (12, 22)
    assert layer_window(29, 10, 30) == (24, 30)
    assert layer_window(4, 1, 30) == (4, 5)
    assert layer_window(4, 3, 30) == (3, 6)
    for w in (1, 2, 3, 10):
        for l in range(12):
            lo, hi = layer_window(l, w, 12)
            assert lo <= l < hi and hi - lo <= w


def test_default_windows():
    assert TraceConfig().effective_window == 10
    assert TraceConfig(kind="attn").effective_window == 10
    assert TraceConfig(kind="resid").effective_window == 1
    assert TraceConfig(kind="resid", window=3).effective_window == 3
    c = TraceConfig()
    assert (c.n_noise, c.noise_multiplier, c.position, c.min_effect) == (10, 3.0, "subject_last", 0.01)


@pytest.mark.parametrize("kw", [
    dict(kind="ffn"), dict(window=0), dict(window=2.5), dict(n_noise=0), dict(n_noise=1.5),
    dict(noise_multiplier=-1.0), dict(noise_multiplier=float("nan")), dict(noise_scale=-0.1),
    dict(noise_scale=float("inf")), dict(position="first"), dict(chunk=0), dict(min_effect=1.5),
    dict(min_effect=float("nan")), dict(seed="0"),
])
def test_bad_config(kw):
    with pytest.raises(ConfigError):
        TraceConfig(**kw)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind,position,window", [
    ("mlp", "subject_last", 3), ("attn", "subject_last", 2), ("resid", "subject_last", None),
    ("mlp", "last", 10), ("resid", "last", None),
])
def test_batched_equals_plain_loop(deep_llama, gpt2_tiny, kind, position, window):
    for model, q in ((deep_llama, _query(deep_llama)), (gpt2_tiny, _multi(gpt2_tiny))):
        cfg = TraceConfig(kind=kind, position=position, window=window, n_noise=3, chunk=2)
        r = causal_trace(model, q, config=cfg)
        p_clean, p_corr, p_rest = _plain_trace(model, q, cfg)
        scale = max(p_clean, float(p_corr.max()), float(p_rest.max()))
        assert math.isclose(r.p_clean, p_clean, rel_tol=1e-5)
        assert torch.allclose(r.p_corrupt_samples, p_corr, atol=1e-5 * scale, rtol=1e-4)
        assert torch.allclose(r.p_restored_samples, p_rest, atol=1e-5 * scale, rtol=1e-4)
        assert torch.allclose(r.p_restored, p_rest.mean(0), atol=1e-5 * scale, rtol=1e-4)
        assert r.p_corrupt == pytest.approx(float(p_corr.mean()), rel=1e-4)
        assert torch.allclose(r.indirect_effect, r.p_restored - r.p_corrupt, atol=1e-7)
        assert (r.p_restored - r.p_corrupt).abs().max() > 1e-3 * scale  # something to compare


def test_chunk_never_changes_result(tiny_model):
    q = _query(tiny_model)
    a = causal_trace(tiny_model, q, config=TraceConfig(n_noise=4, chunk=1, window=2))
    b = causal_trace(tiny_model, q, config=TraceConfig(n_noise=4, chunk=3, window=2))
    assert torch.allclose(a.p_restored_samples, b.p_restored_samples, rtol=1e-5, atol=1e-9)
    assert a.p_corrupt == pytest.approx(b.p_corrupt, rel=1e-5)


def test_restoring_final_residual_at_last_position_gives_p_clean(tiny_model, deep_llama):
    """With a single-token answer the logits are read at the prompt's last token only: restoring
    the last layer's residual stream there undoes the corruption exactly."""
    for model in (tiny_model, deep_llama):
        q = _query(model)
        assert q.n_answer == 1
        L = model.cfg.n_layers
        r = causal_trace(model, q, config=TraceConfig(kind="resid", position="last", n_noise=3))
        assert abs(r.p_clean - r.p_corrupt) > 1e-2 * r.p_clean  # the noise does something
        assert r.p_restored[L - 1] == pytest.approx(r.p_clean, rel=1e-4)
        # a window covering every layer restores the final state in every row
        w = causal_trace(model, q, config=TraceConfig(kind="resid", position="last", n_noise=3,
                                                      window=2 * L))
        assert all(wi == (0, L) for wi in w.windows)
        assert torch.allclose(w.p_restored, torch.full((L,), r.p_clean), rtol=1e-4, atol=0)


def test_window_covering_all_layers_restores_the_same_everywhere(deep_llama):
    q = _query(deep_llama)
    r = causal_trace(deep_llama, q, config=TraceConfig(kind="mlp", window=12, n_noise=2))
    assert torch.allclose(r.p_restored, r.p_restored[0].expand_as(r.p_restored), rtol=1e-5)


def test_zero_noise_restores_nothing(tiny_model):
    q = _query(tiny_model)
    for kind in ("mlp", "resid"):
        r = causal_trace(tiny_model, q, config=TraceConfig(kind=kind, noise_multiplier=0.0, n_noise=2))
        assert r.noise_scale == 0.0
        assert r.p_corrupt == pytest.approx(r.p_clean, rel=1e-5)
        assert torch.allclose(r.p_restored, torch.full_like(r.p_restored, r.p_clean), rtol=1e-5)
        assert r.indirect_effect.abs().max() <= 1e-5 * r.p_clean


def test_same_seed_same_result_other_seed_differs(tiny_model):
    q = _query(tiny_model)
    a = causal_trace(tiny_model, q, config=TraceConfig(n_noise=3, seed=7))
    b = causal_trace(tiny_model, q, config=TraceConfig(n_noise=3, seed=7))
    c = causal_trace(tiny_model, q, config=TraceConfig(n_noise=3, seed=8))
    assert torch.equal(a.p_restored_samples, b.p_restored_samples) and a.p_corrupt == b.p_corrupt
    assert not torch.equal(a.p_corrupt_samples, c.p_corrupt_samples)


def test_result_fields(tiny_model):
    q = _query(tiny_model)
    cfg = TraceConfig(n_noise=2)
    r = causal_trace(tiny_model, q, config=cfg)
    L = tiny_model.cfg.n_layers
    subj = subject_positions(tiny_model, q)
    assert r.position == max(subj) and r.subject_positions == subj
    assert r.kind == "mlp" and r.window == 10 and r.config is cfg
    assert r.prompt == q.prompt == "The capital of France is" and r.query is q
    assert r.p_restored.shape == r.indirect_effect.shape == (L,)
    assert r.p_restored_samples.shape == (2, L) and r.p_corrupt_samples.shape == (2,)
    assert r.total_effect == pytest.approx(r.p_clean - r.p_corrupt)
    assert r.noise_scale == pytest.approx(3.0 * float(tiny_model.W_E.detach().float().std()))
    assert causal_trace(tiny_model, q, config=TraceConfig(position="last", n_noise=1)
                        ).position == q.last_position


# ----------------------------------------------------------------------------- hooks


def test_no_hooks_left(tiny_model):
    causal_trace(tiny_model, _query(tiny_model), config=TraceConfig(n_noise=2))
    assert hooks.active_hook_count(tiny_model) == 0


def test_no_hooks_left_after_an_exception(tiny_model, monkeypatch):
    """Fail inside the corrupted, restored forward pass (the second pass through block 1's MLP)."""
    mlp = tiny_model.blocks[1].mlp
    original = mlp.forward
    calls = []

    def boom(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            assert hooks.active_hook_count(tiny_model) > 0  # inside the hooked corrupted run
            raise RuntimeError("boom")
        return original(*a, **kw)

    monkeypatch.setattr(mlp, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        causal_trace(tiny_model, _query(tiny_model), config=TraceConfig(n_noise=2))
    assert hooks.active_hook_count(tiny_model) == 0


# ----------------------------------------------------------------------------- sweeps


def test_subject_not_found(tiny_model):
    q = query_from_prompt(tiny_model, "The capital of France is", "Paris")  # no subject span
    with pytest.raises(InvalidFactError):
        causal_trace(tiny_model, q)


def test_layer_sweep_aggregates_and_skips(deep_llama):
    qs = [_query(deep_llama), _query(deep_llama, "Berlin", "Germany"), _multi(deep_llama),
          query_from_prompt(deep_llama, "The capital of Italy is", "Rome")]
    cfg = TraceConfig(kind="mlp", window=3, n_noise=2, min_effect=-1.0)
    sw = layer_sweep(deep_llama, qs, config=cfg)
    assert sw.n_queries == 3 and sw.skipped == 1
    assert "subject not located" in sw.skipped_queries[0][1]
    ies = torch.stack([causal_trace(deep_llama, q, config=cfg).indirect_effect for q in qs[:3]])
    assert torch.allclose(sw.ie, ies, atol=1e-7)
    assert torch.allclose(sw.mean_ie, ies.mean(0), atol=1e-7)
    assert torch.allclose(sw.std_ie, ies.std(0), atol=1e-7)
    assert sw.best_layer == int(ies.mean(0).argmax())
    top = sw.top_layers(3)
    assert top[0][0] == sw.best_layer and top[0][1] >= top[1][1] >= top[2][1]
    assert sw.window == 3 and sw.kind == "mlp" and sw.prompts[2] == qs[2].prompt
    d = sw.to_dict()
    assert d["best_layer"] == sw.best_layer and len(d["per_query"]) == 3
    assert json.loads(json.dumps(d))["n_queries"] == 3
    assert hooks.active_hook_count(deep_llama) == 0


def test_layer_sweep_min_effect(tiny_model):
    """A random model's P(answer) is ~1e-3: the default 0.01 threshold skips every query."""
    qs = [_query(tiny_model), _query(tiny_model, "Berlin", "Germany")]
    with pytest.raises(InvalidFactError, match="kept none"):
        layer_sweep(tiny_model, qs, config=TraceConfig(n_noise=1))
    traces = [causal_trace(tiny_model, q, config=TraceConfig(n_noise=1)) for q in qs]
    cut = (traces[0].total_effect + traces[1].total_effect) / 2
    assert traces[0].total_effect != traces[1].total_effect
    sw = layer_sweep(tiny_model, qs, config=TraceConfig(n_noise=1, min_effect=cut))
    assert sw.n_queries == 1 and sw.skipped == 1 and "min_effect" in sw.skipped_queries[0][1]
    assert torch.equal(sw.std_ie, torch.zeros_like(sw.std_ie))  # a single query


# ----------------------------------------------------------------------------- the script


def test_rome_layers_script_quick(tmp_path, capsys):
    n_threads = torch.get_num_threads()
    sys.path.insert(0, str(EXP))
    try:
        spec = importlib.util.spec_from_file_location("exp_rome_layers", EXP / "rome_layers.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        argv = ["--quick", "--model", "tiny-llama", "--no-known-filter", "--min-effect", "-1",
                "--n-noise", "2", "--window", "2", "--results-dir", str(tmp_path),
                "--figures-dir", str(tmp_path / "figures")]
        mod.main(argv)
        path = tmp_path / "quick" / "rome_layers_tiny-llama.json"
        doc = json.loads(path.read_text())
        r = doc["results"]
        assert doc["experiment"] == "rome_layers" and doc["mode"] == "quick"
        assert r["n_facts"] == 4 and set(r["sweeps"]) == {"mlp", "resid"}
        L = r["n_layers"]
        for kind, s in r["sweeps"].items():
            assert 0 <= s["best_layer"] < L and len(s["mean_ie"]) == len(s["std_ie"]) == L
            assert s["n_queries"] + s["skipped"] == 4 and s["n_queries"] >= 1
            assert s["best_layer"] == max(range(L), key=lambda l: s["mean_ie"][l])
        assert r["sweeps"]["mlp"]["window"] == 2 and r["sweeps"]["resid"]["window"] == 1
        assert doc["config"]["trace"]["mlp"]["n_noise"] == 2
        png = tmp_path / "figures" / "rome_layers_tiny-llama.png"  # --figures-dir, in quick mode too
        assert png.stat().st_size > 1000
        out = capsys.readouterr().out
        assert "best mlp layer (window 2):" in out
        # --plot-only redraws from the saved file without recomputing
        mtime = path.stat().st_mtime_ns
        mod.main(argv + ["--plot-only"])
        assert path.stat().st_mtime_ns == mtime
    finally:
        sys.path.remove(str(EXP))
        torch.set_num_threads(n_threads)

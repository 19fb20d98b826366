"""The locator registry, the locate() driver and cross-method agreement."""
import numpy as np
import pytest
import torch

from kn_lens import hooks
from kn_lens.errors import ConfigError
from kn_lens.facts import query_from_prompt
from kn_lens.locate import (
    METHODS,
    ContributionConfig,
    IGConfig,
    agreement,
    available_methods,
    contribution_scores,
    integrated_gradients,
    integrated_gradients_eos,
    locate,
)
from kn_lens.locate import registry
from kn_lens.neurons import NeuronScores


@pytest.fixture
def queries(tiny_model):
    return [query_from_prompt(tiny_model, "The capital of France is", "Paris"),
            query_from_prompt(tiny_model, "Python was created by", "Guido van Rossum")]


def test_methods_listed():
    names = available_methods()
    for name in ("ig", "ig_eos", "contribution", "mediation", "atp"):
        assert name in names and name in METHODS
    assert METHODS["ig"] == (integrated_gradients, IGConfig)
    assert METHODS["ig_eos"] == (integrated_gradients_eos, IGConfig)
    assert METHODS["contribution"] == (contribution_scores, ContributionConfig)
    assert set(available_methods(importable_only=True)) <= set(names)


@pytest.mark.parametrize("method", ["ig", "ig_eos", "contribution"])
def test_round_trip(tiny_model, queries, method):
    fn, cfg_cls = METHODS[method]
    out = locate(tiny_model, queries, method=method, progress=False)
    assert len(out) == len(queries)
    for q, s in zip(queries, out):
        assert isinstance(s, NeuronScores) and s.query is q and s.method == method
        assert isinstance(s.config, cfg_cls)
        assert torch.equal(s.scores, fn(tiny_model, q).scores)
    single = locate(tiny_model, queries[0], method=method, progress=True)
    assert torch.equal(single[0].scores, out[0].scores)


def test_mediation_methods_resolve_lazily(tiny_model, queries):
    """mediation/atp come from kn_lens.locate.mediation (another module); when present they follow
    the common signature."""
    try:
        fn, cfg_cls = METHODS["atp"]
    except ConfigError:
        pytest.skip("kn_lens.locate.mediation is not available")
    s = locate(tiny_model, queries[:1], method="atp", config=cfg_cls(), progress=False)[0]
    assert s.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.d_mlp)


def test_scores_name_their_registry_method(tiny_model, queries):
    """``NeuronScores.method`` is the name the locator is registered under (so a score can be
    looked up, cached and re-run by it), for every registered locator."""
    for name in available_methods(importable_only=True):
        s = locate(tiny_model, queries[:1], method=name, progress=False)[0]
        assert s.method == name, (name, s.method)


def test_bad_method_and_config(tiny_model, queries, monkeypatch):
    with pytest.raises(ConfigError, match="unknown locator"):
        locate(tiny_model, queries, method="nope", progress=False)
    with pytest.raises(ConfigError, match="IGConfig"):
        locate(tiny_model, queries, method="ig", config=ContributionConfig(), progress=False)
    with pytest.raises(ConfigError):
        locate(tiny_model, [], method="ig", progress=False)
    monkeypatch.setitem(registry._SPECS, "ghost", ("kn_lens.no_such_module", "f", "C"))
    assert "ghost" in available_methods()
    assert "ghost" not in available_methods(importable_only=True)
    with pytest.raises(ConfigError, match="unavailable"):
        METHODS["ghost"]
    with pytest.raises(ConfigError, match="already registered"):
        registry.register_method("ig", "kn_lens.locate.integrated_gradients",
                                 "integrated_gradients", "IGConfig")
    with pytest.raises(ConfigError, match="unknown locator"):
        registry.method_version("nope")


def test_register_method_with_version(monkeypatch):
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    monkeypatch.setattr(registry, "_VERSIONS", dict(registry._VERSIONS))
    assert registry.method_version("ig") == 1  # unlisted -> 1
    registry.register_method("ig_v3", "kn_lens.locate.integrated_gradients",
                             "integrated_gradients", "IGConfig", version=3)
    assert registry.method_version("ig_v3") == 3
    assert METHODS["ig_v3"][0] is METHODS["ig"][0]


def _failing_locator(model, query, *, config=None):
    """A locator that fails while its hooks are attached."""
    with model.hooks(fwd_hooks=[(hooks.mlp_post(0), lambda act, hook: act)]):
        assert hooks.active_hook_count(model) == 1
        raise RuntimeError("forced failure")


def test_locate_leaves_no_hooks_after_error(tiny_model, queries, monkeypatch):
    monkeypatch.setitem(registry._SPECS, "failing", (__name__, "_failing_locator", "IGConfig"))
    with pytest.raises(RuntimeError, match="forced failure"):
        locate(tiny_model, queries, method="failing", progress=False)
    assert hooks.active_hook_count(tiny_model) == 0


def test_agreement(tiny_model, queries):
    ig = locate(tiny_model, queries, method="ig", progress=False)
    contrib = locate(tiny_model, queries, method="contribution", progress=False)
    res = agreement({"ig": ig, "ig_copy": ig, "contribution": contrib}, k=10)
    assert res.methods == ("ig", "ig_copy", "contribution")
    assert res.jaccard.shape == res.overlap.shape == res.spearman.shape == (3, 3)
    np.testing.assert_allclose(np.diag(res.jaccard), 1.0)
    assert res.jaccard[0, 1] == pytest.approx(1.0) and res.spearman[0, 1] == pytest.approx(1.0)
    np.testing.assert_allclose(res.jaccard, res.jaccard.T)
    assert 0.0 <= res.jaccard[0, 2] <= res.overlap[0, 2] <= 1.0
    assert -1.0 <= res.spearman[0, 2] <= 1.0
    assert res.per_query["jaccard"].shape == (2, 3, 3)
    # a direct check of one entry
    from scipy.stats import spearmanr

    rho = np.mean([spearmanr(a.scores.flatten().numpy(), b.scores.flatten().numpy()).statistic
                   for a, b in zip(ig, contrib)])
    assert res.spearman[0, 2] == pytest.approx(rho)
    assert "contribution" in res.table("spearman")
    with pytest.raises(ConfigError):
        agreement({"ig": ig, "contribution": contrib[::-1]})
    with pytest.raises(ConfigError):
        agreement({"ig": ig, "contribution": contrib[:1]})


def test_every_config_is_keyword_only():
    """Configs take keywords only (a positional value would silently land in the wrong field
    when a field is added)."""
    import dataclasses
    import importlib
    import pkgutil

    import kn_lens

    found = []
    for mod in pkgutil.walk_packages(kn_lens.__path__, "kn_lens."):
        if mod.name.endswith(("build_countries", "__main__")):
            continue
        m = importlib.import_module(mod.name)
        for name, obj in vars(m).items():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj)
                    and obj.__module__ == m.__name__
                    and (name.endswith("Config") or name == "KNSelection")):
                found.append(name)
                fields = [f for f in dataclasses.fields(obj) if f.init]
                assert fields and all(f.kw_only for f in fields), name
    assert len(found) >= 20, found

"""The per-query score cache (``kn_lens.locate.cache``, on the sweep's result store): stored scores
equal fresh ones exactly, the key covers what determines the scores, a changed locator version
recomputes, and the same items serve any grouping of the queries."""
from __future__ import annotations

import pytest
import torch

from kn_lens.datasets import builtin_dataset, sample_facts
from kn_lens.locate.cache import (cached_scores, mean_seconds, method_config, scores_for_facts,
                                  scores_for_methods)
from kn_lens.sweep import ResultStore, locate_items


@pytest.fixture(scope="module")
def fact(gpt2_tiny):
    return sample_facts(gpt2_tiny, builtin_dataset(), 1, seed=0, known_only=False).facts[0]


def test_stored_scores_equal_fresh(gpt2_tiny, fact, tmp_path):
    from kn_lens.locate import locate

    ds = builtin_dataset()
    fresh = scores_for_facts(gpt2_tiny, ds, [fact], "contribution", store=tmp_path)[fact]
    assert len(fresh) == len(ds.relation_of(fact).templates)
    with ResultStore(tmp_path) as st:  # one item per query
        assert len(st.query(kind="locate", method="contribution")) == len(fresh)
    assert all(s.extras["seconds"] > 0 and not s.extras.get("cached") for s in fresh)
    assert mean_seconds({fact: fresh}) > 0
    direct = locate(gpt2_tiny, [s.query for s in fresh], "contribution", progress=False)
    stored = scores_for_facts(gpt2_tiny, ds, [fact], "contribution", store=tmp_path)[fact]
    assert mean_seconds({fact: stored}) is None  # nothing computed in this run
    for a, b, d in zip(fresh, stored, direct):
        assert b.extras["cached"] and b.extras["seconds"] == a.extras["seconds"]
        assert b.query == a.query == d.query and b.config == a.config and b.model == a.model
        assert torch.equal(a.scores, b.scores) and torch.equal(b.scores, d.scores)
        assert torch.equal(a.per_token, b.per_token) and torch.equal(b.per_token, d.per_token)
    # two locators in one sweep; AtP's own "seconds" extra does not make it count as computed
    both = scores_for_methods(gpt2_tiny, ds, [fact], {"atp": None, "contribution": None},
                              store=tmp_path)
    again = scores_for_facts(gpt2_tiny, ds, [fact], "atp", store=tmp_path)
    assert mean_seconds(both["atp"]) > 0 and mean_seconds(both["contribution"]) is None
    assert mean_seconds(again) is None
    assert all(torch.equal(a.scores, b.scores) for a, b in zip(both["atp"][fact], again[fact]))
    # the same items serve a single query (e.g. the study's first template)
    (one,) = cached_scores(gpt2_tiny, [fresh[0].query], "contribution", store=tmp_path)
    assert one.extras["cached"] and torch.equal(one.scores, fresh[0].scores)
    # no store: a temporary one, the same numbers
    (tmp,) = cached_scores(gpt2_tiny, [fresh[0].query], "contribution")
    assert not tmp.extras.get("cached") and torch.equal(tmp.scores, fresh[0].scores)


def test_key_covers_model_locator_version_config_prompt_answer(gpt2_tiny, llama_tiny, fact,
                                                                monkeypatch):
    from kn_lens.facts import make_query
    from kn_lens.locate import registry

    def key(model, method, cfg, q):
        return locate_items(model, [q], method, cfg)[0].key

    ds = builtin_dataset()
    q0, q1 = (make_query(gpt2_tiny, fact, t) for t in ds.relation_of(fact).templates[:2])
    cfg = method_config("ig")
    base = key(gpt2_tiny, "ig", cfg, q0)
    assert key(gpt2_tiny, "ig", method_config("ig"), q0) == base  # equal configs, one key
    others = {key(gpt2_tiny, "ig", method_config("ig", steps=5), q0),
              key(gpt2_tiny, "ig_eos", method_config("ig_eos"), q0),
              key(gpt2_tiny, "ig", cfg, q1),
              key(gpt2_tiny, "ig", cfg, make_query(gpt2_tiny, fact, q0.template,
                                                   answer="Elsewhere")),
              key(llama_tiny, "ig", cfg, make_query(llama_tiny, fact, q0.template))}
    assert base not in others and len(others) == 5
    monkeypatch.setitem(registry._VERSIONS, "ig", registry.method_version("ig") + 1)
    assert key(gpt2_tiny, "ig", cfg, q0) != base  # the locator's numbers changed


def test_a_changed_locator_version_recomputes(gpt2_tiny, fact, tmp_path, monkeypatch):
    from kn_lens.locate import method_version, registry

    ds = builtin_dataset()
    scores_for_facts(gpt2_tiny, ds, [fact], "contribution", store=tmp_path)
    monkeypatch.setitem(registry._VERSIONS, "contribution", method_version("contribution") + 1)
    again = scores_for_facts(gpt2_tiny, ds, [fact], "contribution", store=tmp_path)[fact]
    assert not any(s.extras.get("cached") for s in again)
    third = scores_for_facts(gpt2_tiny, ds, [fact], "contribution", store=tmp_path)[fact]
    assert all(s.extras.get("cached") for s in third)

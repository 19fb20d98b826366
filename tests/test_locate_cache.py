"""The per-query score cache (``kn_lens.locate.cache``) and the keyed item store under it
(``kn_lens.cache``): cached scores equal fresh ones exactly, the key covers what determines the
scores, a killed run keeps whole items only."""
from __future__ import annotations

import pytest
import torch

from kn_lens.cache import ItemCache, item_key
from kn_lens.datasets import builtin_dataset, sample_facts
from kn_lens.locate.cache import (cached_scores, mean_seconds, method_config, score_key,
                                  scores_for_facts)


@pytest.fixture(scope="module")
def fact(gpt2_tiny):
    return sample_facts(gpt2_tiny, builtin_dataset(), 1, seed=0, known_only=False).facts[0]


def test_cached_scores_equal_fresh(gpt2_tiny, fact, tmp_path):
    ds = builtin_dataset()
    fresh = scores_for_facts(gpt2_tiny, ds, [fact], "contribution", cache_dir=tmp_path)[fact]
    assert len(fresh) == len(ds.relation_of(fact).templates)
    assert len(list(tmp_path.glob("*.pt"))) == len(fresh)  # one item per query
    assert all("seconds" in s.extras and not s.extras.get("cached") for s in fresh)
    assert mean_seconds({fact: fresh}) > 0
    cached = scores_for_facts(gpt2_tiny, ds, [fact], "contribution", cache_dir=tmp_path)[fact]
    assert mean_seconds({fact: cached}) is None  # nothing computed in this run
    for a, b in zip(fresh, cached):
        assert b.extras["cached"] and "seconds" not in b.extras
        assert b.query == a.query and b.config == a.config and b.model == a.model
        assert torch.equal(a.scores, b.scores) and torch.equal(a.per_token, b.per_token)
        assert {k: v for k, v in b.extras.items() if k != "cached"} == \
            {k: v for k, v in a.extras.items() if k != "seconds"}
    # AtP records its own "seconds" in extras: its cached items still count as cached
    atp = scores_for_facts(gpt2_tiny, ds, [fact], "atp", cache_dir=tmp_path)
    again = scores_for_facts(gpt2_tiny, ds, [fact], "atp", cache_dir=tmp_path)
    assert mean_seconds(atp) > 0 and mean_seconds(again) is None
    assert all(torch.equal(a.scores, b.scores) for a, b in zip(atp[fact], again[fact]))
    # the same items serve a single query (e.g. the study's first template)
    store = ItemCache(tmp_path)
    (one,) = cached_scores(gpt2_tiny, [fresh[0].query], "contribution", cache=store)
    assert one.extras["cached"] and store.hits == 1 and store.computed == 0


def test_key_covers_model_locator_version_config_prompt_answer(gpt2_tiny, llama_tiny, fact,
                                                                monkeypatch):
    from kn_lens.facts import make_query
    from kn_lens.locate import registry

    ds = builtin_dataset()
    q0, q1 = (make_query(gpt2_tiny, fact, t) for t in ds.relation_of(fact).templates[:2])
    cfg = method_config("ig")
    base = score_key(gpt2_tiny, "ig", cfg, q0)
    assert score_key(gpt2_tiny, "ig", method_config("ig"), q0) == base  # equal configs, one key
    others = {score_key(gpt2_tiny, "ig", method_config("ig", steps=5), q0),
              score_key(gpt2_tiny, "ig_eos", method_config("ig_eos"), q0),
              score_key(gpt2_tiny, "ig", cfg, q1),
              score_key(gpt2_tiny, "ig", cfg, make_query(gpt2_tiny, fact, q0.template,
                                                         answer="Elsewhere")),
              score_key(llama_tiny, "ig", cfg, make_query(llama_tiny, fact, q0.template))}
    assert base not in others and len(others) == 5
    monkeypatch.setitem(registry._VERSIONS, "ig", registry.method_version("ig") + 1)
    assert score_key(gpt2_tiny, "ig", cfg, q0) != base  # the locator's numbers changed


def test_a_changed_locator_version_recomputes(gpt2_tiny, fact, tmp_path, monkeypatch):
    from kn_lens.locate import method_version, registry

    ds = builtin_dataset()
    scores_for_facts(gpt2_tiny, ds, [fact], "contribution", cache_dir=tmp_path)
    monkeypatch.setitem(registry._VERSIONS, "contribution", method_version("contribution") + 1)
    again = scores_for_facts(gpt2_tiny, ds, [fact], "contribution", cache_dir=tmp_path)[fact]
    assert not any(s.extras.get("cached") for s in again)
    third = scores_for_facts(gpt2_tiny, ds, [fact], "contribution", cache_dir=tmp_path)[fact]
    assert all(s.extras.get("cached") for s in third)


def test_item_cache_is_atomic_and_recovers_from_a_corrupt_item(tmp_path, monkeypatch):
    store = ItemCache(tmp_path)
    key = store.key(kind="x", config={"a": 1, "b": (2, 3)})
    assert key == item_key(kind="x", config={"b": [2, 3], "a": 1})  # canonical JSON
    assert store.get_or(key, lambda: {"v": torch.ones(2)})["v"].sum() == 2
    assert store.get_or(key, lambda: pytest.fail("recomputed"))["v"].sum() == 2
    assert (store.computed, store.hits) == (1, 1)
    store.path(key).write_bytes(b"not a torch file")  # a corrupt item is recomputed
    assert store.get_or(key, lambda: {"v": torch.zeros(2)})["v"].sum() == 0

    def dying(obj, f):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(torch, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        store.save(store.key(kind="y"), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.pt"]  # nothing half-written

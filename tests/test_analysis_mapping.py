"""Query-KN mapping (QL §3.1, eq. 3) on tiny models: neighbour sets, no-op, direct computation."""
import pytest
import torch

from kn_lens import hooks
from kn_lens.analysis.mapping import (MappingConfig, neighbour_sets, queries_and_sets_from_scores,
                                      query_kn_mapping)
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import Fact, Relation, queries_for_fact
from kn_lens.neurons import NeuronScores, NeuronSet
from kn_lens.testing import tiny_gpt2, tiny_llama
from kn_lens.models import model_info

REL = Relation("P36", "capital", ("The capital of {} is", "{}'s capital is", "The capital city of {} is"))
FACT = Fact("France", "P36", "Paris")


def S(*pairs):
    return NeuronSet(pairs)


def test_neighbour_sets_eq3():
    sets = [S((0, 1), (0, 2)), S((0, 1), (1, 1)), S((0, 1), (1, 1), (2, 2)), S((2, 3))]
    nb = neighbour_sets(sets, 0)
    assert nb["self"] == sets[0]
    assert nb["union"] == S((0, 1), (1, 1), (2, 2), (2, 3))
    assert nb["intersection"] == S()  # set 3 shares nothing
    assert nb["refine"] == S((0, 1), (1, 1))  # in >1 of sets 1..3
    nb1 = neighbour_sets(sets[:3], 2)
    assert nb1["intersection"] == S((0, 1)) and nb1["refine"] == S((0, 1))
    with pytest.raises(InvalidFactError):
        neighbour_sets(sets[:1], 0)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _queries(model):
    return queries_for_fact(model, FACT, REL)


def test_factor_one_is_noop(model):
    qs = _queries(model)
    sets = [S((0, 1), (1, 2)), S((1, 2), (2, 3)), S((0, 5), (1, 2))]
    for pos, kinds in (("answer", ("self", "union", "intersection", "refine")), ("all", ("self",))):
        res = query_kn_mapping(model, {FACT: qs}, {FACT: sets},
                               config=MappingConfig(suppress_factor=1.0, enhance_factor=1.0,
                                                    positions=pos, kinds=kinds))
        for r in res.queries:
            for k in kinds:
                assert r.rel_suppress[k] == pytest.approx(0.0, abs=1e-6)
                assert r.rel_enhance[k] == pytest.approx(0.0, abs=1e-6)
        if pos == "answer":
            assert res.get("refine").n_empty == 0  # (1,2) is in both other sets for every query


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_zeroing_a_layer_matches_direct_computation(make):
    m = make()
    qs = queries_for_fact(m, FACT, REL)
    d = m.cfg.d_mlp
    whole = S(*[(1, i) for i in range(d)])
    res = query_kn_mapping(m, {FACT: qs}, {FACT: [whole] * 3},
                           config=MappingConfig(positions="all", kinds=("self",)))
    for q, r in zip(qs, res.queries):
        toks = q.tokens()
        base = torch.log_softmax(m(toks)[0].float(), -1)

        def zero(act, hook):
            return act * 0.0

        with m.hooks(fwd_hooks=[(hooks.mlp_post(1), zero)]):
            lp = torch.log_softmax(m(toks)[0].float(), -1)
        pos, ids = list(q.answer_positions), list(q.answer_ids)
        p_b = base[pos, ids].sum().exp().item()
        p_a = lp[pos, ids].sum().exp().item()
        assert r.p_before == pytest.approx(p_b, rel=1e-4)
        assert r.rel_suppress["self"] == pytest.approx((p_a - p_b) / p_b, rel=1e-3, abs=1e-6)
        assert r.delta_prob("self")["Sup"] == pytest.approx(-(p_a - p_b) / p_b, rel=1e-3, abs=1e-6)
    assert hooks.active_hook_count(m) == 0


def test_last_position_only_changes_from_last_position(model):
    qs = _queries(model)
    # Scaling at the last position cannot change logits at earlier positions: a single-token
    # answer is predicted at the last position, so the result differs from scaling elsewhere only.
    d = model.cfg.d_mlp
    whole = S(*[(0, i) for i in range(d)])
    last = query_kn_mapping(model, {FACT: qs}, {FACT: [whole] * 3},
                            config=MappingConfig(positions="last", kinds=("self",)))
    alls = query_kn_mapping(model, {FACT: qs}, {FACT: [whole] * 3},
                            config=MappingConfig(positions="all", kinds=("self",)))
    assert all(r.rel_suppress["self"] != 0 for r in last.queries)
    assert any(abs(a.rel_suppress["self"] - b.rel_suppress["self"]) > 1e-6
               for a, b in zip(last.queries, alls.queries))


def test_groups_summary_and_scores_helper(model):
    qs = _queries(model)
    scores = []
    g = torch.Generator().manual_seed(0)
    for q in qs:
        t = torch.rand(model.cfg.n_layers, model.cfg.d_mlp, generator=g)
        scores.append(NeuronScores(t, "random", q, None, model_info(model)))
    q2, sets = queries_and_sets_from_scores({FACT: scores})
    assert q2[FACT] == qs and all(len(s) > 0 for s in sets[FACT])
    res = query_kn_mapping(model, q2, sets, groups={FACT: "K_II"})
    assert {s.group for s in res.summary} == {"all", "K_II"}
    s_all, s2 = res.get("self", "all"), res.get("self", "K_II")
    assert s_all.sup == pytest.approx(s2.sup) and s_all.n_queries == 3
    import numpy as np
    assert s_all.sup == pytest.approx(np.mean([-r.rel_suppress["self"] for r in res.queries]))
    assert s_all.avg == pytest.approx((s_all.sup + s_all.enh) / 2)
    assert len(res.table()) == 8 and "Avg" in res.to_markdown()
    assert res.to_dict()["summary"][0]["kind"] == "self"


def test_bad_inputs(model):
    qs = _queries(model)
    with pytest.raises(InvalidFactError):
        query_kn_mapping(model, {FACT: qs}, {FACT: [S()] * 2})
    with pytest.raises(ConfigError):
        MappingConfig(positions="first")


@pytest.mark.real_model
def test_real_model_own_kns_matter_more_than_random(default_model):
    """On SmolLM2, suppressing a query's own KNs (FiNE contribution top-5, any locator works)
    lowers P(answer) more than suppressing as many random neurons, and enhancing them raises it."""
    from kn_lens.locate.contribution import contribution_scores, select_contribution_neurons
    from kn_lens.neurons import random_like

    m = default_model
    rel = Relation("landmark_city", "landmark city",
                   ("{} is located in the city of", "It is well known that {} is located in the city of"))
    fact = Fact("The Eiffel Tower", "landmark_city", "Paris")
    qs = queries_for_fact(m, fact, rel)
    own = [select_contribution_neurons(contribution_scores(m, q)) for q in qs]
    g = torch.Generator().manual_seed(0)
    rnd = [random_like(s, m.cfg.n_layers, m.cfg.d_mlp, generator=g, exclude=s) for s in own]
    cfg = MappingConfig(kinds=("self",))
    a = query_kn_mapping(m, {fact: qs}, {fact: own}, config=cfg).get("self")
    b = query_kn_mapping(m, {fact: qs}, {fact: rnd}, config=cfg).get("self")
    assert a.sup > 0.1 and a.sup > b.sup + 0.05
    assert a.enh > 0


def test_batched_equals_one_by_one_with_scale_neurons(model):
    qs = _queries(model)
    g = torch.Generator().manual_seed(1)
    sets = []
    for _ in qs:
        idx = torch.randperm(model.cfg.n_layers * model.cfg.d_mlp, generator=g)[:12].tolist()
        sets.append(NeuronSet((i // model.cfg.d_mlp, i % model.cfg.d_mlp) for i in idx))
    sets[2] = sets[2] | NeuronSet(list(sets[0])[:4]) | NeuronSet(list(sets[1])[:4])
    for pos in ("answer", "all"):
        a = query_kn_mapping(model, {FACT: qs}, {FACT: sets},
                             config=MappingConfig(positions=pos, batched=True))
        b = query_kn_mapping(model, {FACT: qs}, {FACT: sets},
                             config=MappingConfig(positions=pos, batched=False))
        for ra, rb in zip(a.queries, b.queries):
            assert ra.p_before == pytest.approx(rb.p_before, rel=1e-5)
            assert ra.sizes == rb.sizes
            for k in ra.rel_suppress:
                assert ra.rel_suppress[k] == pytest.approx(rb.rel_suppress[k], rel=1e-4, abs=2e-5)
                assert ra.rel_enhance[k] == pytest.approx(rb.rel_enhance[k], rel=1e-4, abs=2e-5)
    assert hooks.active_hook_count(model) == 0

"""TNF-DA analyses (Fig. 3 IE concentration, Table 1 repetition, relation overlap), hand-computed."""
import math

import pytest
import torch

from kn_lens.analysis.tnf_da import (ie_concentration, mean_ie_concentration, relation_level_sets,
                                     relation_overlap, targeted_neuron_repetition, targeted_neurons)
from kn_lens.errors import ConfigError, InvalidFactError, NumericalError
from kn_lens.facts import Fact, Relation
from kn_lens.neurons import NeuronSet


def S(*pairs):
    return NeuronSet(pairs)


def test_ie_concentration_hand_computed():
    # 200 neurons: 2 (= 1 %) with IE 10, 1 with -5, the rest 0.1 (197 x 0.1 = 19.7)
    ie = torch.full((2, 100), 0.1)
    ie[0, 0] = ie[1, 7] = 10.0
    ie[0, 5] = -5.0
    res = ie_concentration(ie, fractions=(0.01, 0.5, 1.0))
    total = 20 + 5 + 19.7
    assert res.total == pytest.approx(total, rel=1e-5)
    assert res.share_at_1pct == pytest.approx(20 / total, rel=1e-5)  # top 2 of 200
    assert res.shares[0] == pytest.approx(20 / total, rel=1e-5)
    assert res.shares[1] == pytest.approx((25 + 97 * 0.1) / total, rel=1e-5)  # top 100
    assert res.shares[2] == pytest.approx(1.0)
    assert res.frac_negative == pytest.approx(1 / 200)
    pos = ie_concentration(ie, by="positive", fractions=(0.01,))
    assert pos.share_at_1pct == pytest.approx(20 / 39.7, rel=1e-5)
    assert torch.all(res.curve[1:] >= res.curve[:-1])
    m = mean_ie_concentration([ie, ie], fractions=(0.01,))
    assert m["mean_share_at_1pct"] == pytest.approx(20 / total, rel=1e-5) and m["n_facts"] == 2
    with pytest.raises(NumericalError):
        ie_concentration(torch.zeros(2, 3))
    assert targeted_neurons(ie) == S((0, 0), (1, 7))


def _targeted():
    # relation A: 4 descriptions; relation B: 2; relation C: 1 (skipped)
    t = {
        Fact("a1", "A", "x"): S((0, 1), (0, 2), (1, 1)),
        Fact("a2", "A", "x"): S((0, 1), (0, 2), (2, 2)),
        Fact("a3", "A", "x"): S((0, 1), (1, 5), (2, 3)),
        Fact("a4", "A", "x"): S((0, 1), (0, 9), (2, 4)),
        Fact("b1", "B", "y"): S((0, 1), (3, 3)),
        Fact("b2", "B", "y"): S((3, 3), (3, 4)),
        Fact("c1", "C", "z"): S((5, 5)),
    }
    return t


def test_repetition_table1_definitions():
    res = targeted_neuron_repetition(_targeted())
    a = next(r for r in res.relations if r.relation == "A")
    # counts: 01 -> 4, 02 -> 2, others 1; 12 targeted in total, 8 distinct
    assert a.top1 == pytest.approx(100.0)
    assert a.top2 == pytest.approx(50.0)
    assert a.base == pytest.approx(25.0)
    assert a.repetition == pytest.approx(100 * 8 / 12)
    assert a.top_neurons[0][1] == 4
    b = next(r for r in res.relations if r.relation == "B")
    # counts: 33 -> 2, 01 -> 1, 34 -> 1; 4 targeted, 3 distinct
    assert (b.top1, b.top2, b.base) == pytest.approx((100.0, 50.0, 50.0))
    assert b.repetition == pytest.approx(75.0)
    assert res.skipped == ("C",)
    assert res.top1 == pytest.approx(100.0) and res.top2 == pytest.approx(50.0)
    assert res.base == pytest.approx(37.5)
    assert res.repetition == pytest.approx((100 * 8 / 12 + 75) / 2)
    assert res.table()[-1]["relation"] == "mean"
    assert "Repetition" in res.to_markdown()
    with pytest.raises(InvalidFactError):
        targeted_neuron_repetition({Fact("c1", "C", "z"): S((5, 5))})


def test_relation_overlap_same_vs_different_group():
    t = {
        Fact("a1", "A", "x"): S((0, 1), (0, 2)), Fact("a2", "A", "x"): S((0, 1), (0, 2)),
        Fact("b1", "B", "x"): S((0, 1), (0, 3)), Fact("b2", "B", "x"): S((0, 1), (0, 3)),
        Fact("c1", "C", "x"): S((5, 1), (0, 2)), Fact("c2", "C", "x"): S((5, 1), (6, 6)),
    }
    sets = relation_level_sets(t, min_frequency=1.0)
    assert sets["A"] == S((0, 1), (0, 2)) and sets["C"] == S((5, 1))
    assert relation_level_sets(t, min_frequency=0.5)["C"] == S((5, 1), (0, 2), (6, 6))
    rels = [Relation("A", "a", ("{} a",), group="g1"), Relation("B", "b", ("{} b",), group="g1"),
            Relation("C", "c", ("{} c",), group="g2")]
    res = relation_overlap(t, rels, min_frequency=1.0)
    # A-B (same): {01} / {01,02,03} = 1/3; A-C, B-C (different): 0
    assert res.same_group_mean == pytest.approx(1 / 3)
    assert res.different_group_mean == pytest.approx(0.0)
    assert (res.n_same_pairs, res.n_different_pairs) == (1, 2)
    assert res.matrix[0][1] == pytest.approx(1 / 3) and res.matrix[0][0] == 1.0
    ov = relation_overlap(t, {"A": "g1", "B": "g1", "C": "g2"}, min_frequency=1.0, metric="overlap")
    assert ov.same_group_mean == pytest.approx(0.5)
    assert res.table()[0]["pairs"] == "same group"
    assert res.to_dict()["n_same_pairs"] == 1
    with pytest.raises(ConfigError):
        relation_overlap(t, rels, metric="dice")


@pytest.mark.real_model
def test_real_model_indirect_effects_are_concentrated(default_model):
    """TNF-DA's "1 %" observation needs a trained model: on SmolLM2 the top 1 % of FFN neurons
    (by |AtP indirect effect|, whole prompt corrupted) carry several times their uniform share
    of the total |IE| (26 % on average over 12 facts in the quick run; uniform would be 1 %)."""
    from kn_lens.facts import make_query
    from kn_lens.locate import locate
    from kn_lens.locate.mediation import AtPConfig

    q = make_query(default_model, Fact("France", "country_capital", "Paris"), "The capital of {} is")
    s = locate(default_model, [q], "atp", config=AtPConfig(n_noise=1, seed=0))[0]
    c = ie_concentration(s, by="abs", fractions=(0.01, 0.1))
    assert c.share_at_1pct > 0.08
    assert c.shares[1] > 0.3  # top 10 % of neurons: far more than 10 % of the total |IE|

"""CS1/CS2 (QL eq. 1), Otsu, Welch and the K_I/K_II split on hand-computed examples."""
import math

import numpy as np
import pytest
import torch

from kn_lens.analysis.consistency import (ConsistencyConfig, KNSelection, consistency_analysis, cs1,
                                          cs2, kn_sets_from_scores, otsu_threshold, select_kns,
                                          shared_k2_ratio, welch_t_test)
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import Fact
from kn_lens.neurons import NeuronSet


def S(*pairs):
    return NeuronSet(pairs)


def test_cs1_cs2_hand_computed():
    n1 = S((0, 1), (0, 2), (1, 3))
    n2 = S((0, 1), (1, 3), (2, 5))
    n3 = S((0, 1), (2, 6))
    # union = {01, 02, 13, 25, 26} (5); in all three: {01}; in >1: {01, 13}
    assert cs1([n1, n2, n3]) == pytest.approx(1 / 5)
    assert cs2([n1, n2, n3]) == pytest.approx(2 / 5)
    assert cs1([n1, n1]) == 1.0 and cs2([n1, n1]) == 1.0
    assert cs1([n1, S((5, 5))]) == 0.0 and cs2([n1, S((5, 5))]) == 0.0
    assert math.isnan(cs2([S(), S()]))
    # CS2 >= CS1 always (relaxation)
    assert cs2([n1, n2, n3]) >= cs1([n1, n2, n3])


def test_cs_needs_two_queries():
    with pytest.raises(InvalidFactError):
        cs2([S((0, 1))])


def test_otsu_exact_two_clusters():
    v = [0.0, 0.1, 0.1, 0.9, 1.0]
    # best split separates {0, .1, .1} from {.9, 1}: midpoint 0.5
    assert otsu_threshold(v) == pytest.approx(0.5)
    # hand check of the between-class variance at that split vs the alternative after 0.0
    def between(lo, hi):
        w0, w1 = len(lo) / 5, len(hi) / 5
        return w0 * w1 * (np.mean(lo) - np.mean(hi)) ** 2
    assert between([0, .1, .1], [.9, 1]) > between([0], [.1, .1, .9, 1])
    assert otsu_threshold([0.3, 0.3]) == 0.3
    t = otsu_threshold(v, bins=10)
    assert 0.1 <= t <= 0.9


def test_welch_matches_formula():
    a, b = [0.2, 0.3, 0.25, 0.4], [0.01, 0.03, 0.02]
    t, p = welch_t_test(a, b)
    ma, mb = np.mean(a), np.mean(b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    assert t == pytest.approx((ma - mb) / math.sqrt(va + vb))
    assert 0 < p < 0.05
    assert all(math.isnan(x) for x in welch_t_test([1.0], [1.0, 2.0]))


def _facts():
    # relation r1: two consistent facts (CS2 = 1, 0.5) and one inconsistent (0)
    # relation r2: one with CS2 = 1/3 and one with CS2 = 0.05 (1 shared of 20)
    f = {}
    f[Fact("a", "r1", "x")] = [S((0, 1)), S((0, 1))]  # 1.0
    f[Fact("b", "r1", "x")] = [S((0, 1), (0, 2)), S((0, 1), (0, 3)), S((0, 2))]  # {01,02} of 3 -> 2/3
    f[Fact("c", "r1", "x")] = [S((1, 1)), S((1, 2))]  # 0
    f[Fact("d", "r2", "y")] = [S((0, 1), (0, 2)), S((0, 1), (0, 3))]  # 1/3
    big1 = S(*[(2, i) for i in range(10)])
    big2 = S(*[(2, i) for i in range(9, 20)])
    f[Fact("e", "r2", "y")] = [big1, big2]  # 1 shared / 20 = 0.05
    return f


def test_consistency_analysis_static_and_otsu():
    facts = _facts()
    res = consistency_analysis(facts)
    cs = {fc.fact.subject: fc.cs2 for fc in res.facts}
    assert cs == pytest.approx({"a": 1.0, "b": 2 / 3, "c": 0.0, "d": 1 / 3, "e": 0.05})
    st = res.row("overall", "static")
    assert st.threshold == 0.1 and st.n_facts == 5
    assert (st.n_k1, st.n_k2) == (3, 2)
    assert st.ratio_k1 == pytest.approx(0.6) and st.ratio_k2 == pytest.approx(0.4)
    assert st.mean_cs_k1 == pytest.approx((1 + 2 / 3 + 1 / 3) / 3)
    assert st.mean_cs_k2 == pytest.approx(0.025)
    t, p = welch_t_test([1, 2 / 3, 1 / 3], [0.0, 0.05])
    assert st.t == pytest.approx(t) and st.p == pytest.approx(p)
    ot = res.row("overall", "otsu")
    assert ot.threshold == pytest.approx(otsu_threshold([1, 2 / 3, 0, 1 / 3, 0.05]))
    r2 = res.row("r2", "static")
    assert (r2.n_k1, r2.n_k2) == (1, 1) and math.isnan(r2.t)
    assert res.label(Fact("e", "r2", "y")) == "K_II"
    assert set(f.subject for f in res.k1()) == {"a", "b", "d"}
    rows = res.table()
    assert rows[0]["scope"] == "overall" and rows[0]["T"] == "St" and rows[0]["R: I"] == 0.6
    md = res.to_markdown()
    assert md.startswith("| scope |") and "overall" in md
    d = res.to_dict()
    assert len(d["facts"]) == 5 and d["config"]["static_threshold"] == 0.1
    assert {x["fact"]["subject"]: x["label_static"] for x in d["facts"]}["e"] == "K_II"
    import json
    json.dumps(d)  # JSON-serialisable


def test_threshold_on_cs1_option_and_undefined_facts():
    facts = _facts()
    facts[Fact("z", "r2", "y")] = [S(), S()]
    res = consistency_analysis(facts, config=ConsistencyConfig(score="cs1"))
    assert res.n_undefined == 1
    assert res.row().n_facts == 5
    # CS1: a=1, b=0 (nothing in all three), c=0, d=1/3, e=0.05 -> K_I: a, d
    assert set(f.subject for f in res.k1()) == {"a", "d"}


def test_shared_k2_ratio():
    facts = _facts()
    r1 = consistency_analysis(facts)
    r2 = consistency_analysis(facts, config=ConsistencyConfig(static_threshold=0.5))
    # K_II under 0.1: c, e; under 0.5: c, d, e -> both: c, e -> 2/5
    assert shared_k2_ratio([r1, r2]) == pytest.approx(0.4)


def test_select_kns_default_is_dai_02_max():
    s = torch.zeros(3, 4)
    s[0, 1], s[1, 2], s[2, 3], s[2, 0] = 1.0, 0.25, 0.19, -2.0
    assert select_kns(s) == S((0, 1), (1, 2))
    assert select_kns(s, KNSelection(rule="top_k", k=1)) == S((0, 1))
    assert select_kns(s, KNSelection(rule="absolute", tau=0.2)) == S((0, 1), (1, 2))
    assert select_kns(s, KNSelection(freeze_last=2)) == S((0, 1))
    sets = kn_sets_from_scores({Fact("a", "r", "o"): [s, s]})
    assert list(sets.values())[0] == [S((0, 1), (1, 2))] * 2
    with pytest.raises(ConfigError):
        KNSelection(rule="nope")

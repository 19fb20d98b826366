"""Consistency-Aware Score (QL eq. 7) on hand-computed examples."""
import math

import pytest
import torch

from kn_lens.analysis.cas import CASConfig, cas_neurons, cas_neurons_by_fact, consistency_aware_score
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import Fact
from kn_lens.neurons import NeuronSet


def test_cas_hand_computed():
    # 1 layer, 4 neurons, 2 queries
    a = torch.tensor([[1.0, 1.0, 0.0, 0.2]])
    b = torch.tensor([[1.0, 0.0, 0.0, 0.2]])
    res = consistency_aware_score([a, b])
    # neuron 0: mu 1, sigma 0 -> 0.7; neuron 1: mu .5, sigma .5 -> .35 - .15 = .2
    # neuron 2: 0; neuron 3: mu .2 sigma 0 -> .14
    assert res.cas[0].tolist() == pytest.approx([0.7, 0.2, 0.0, 0.14])
    assert res.std[0, 1].item() == pytest.approx(0.5)  # population std (1/k)
    # threshold 0.3 * 0.7 = 0.21: only neuron 0 (0.2 < 0.21)
    assert res.neurons == NeuronSet([(0, 0)])
    assert cas_neurons([a, b], config=CASConfig(ratio=0.19)) == NeuronSet([(0, 0), (0, 1), (0, 3)])
    assert res.n_queries == 2


def test_cas_three_queries_and_betas():
    x = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])]
    res = consistency_aware_score(x, config=CASConfig(beta1=1.0, beta2=1.0))
    mu0, s0 = 1.0, math.sqrt(((3 - 1) ** 2 + 1 + 1) / 3)
    mu1, s1 = 2 / 3, math.sqrt(((0 - 2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3)
    assert res.cas[0].tolist() == pytest.approx([mu0 - s0, mu1 - s1], rel=1e-5)
    # the consistent neuron wins although the other has the larger single score
    assert res.neurons == NeuronSet([(0, 1)])


def test_cas_edge_cases():
    z = torch.zeros(2, 3)
    assert consistency_aware_score([z, z]).neurons == NeuronSet()  # max CAS 0: nothing selected
    with pytest.raises(InvalidFactError):
        consistency_aware_score([torch.zeros(2, 3), torch.zeros(3, 3)])
    with pytest.raises(ConfigError):
        CASConfig(ratio=0)
    s = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert cas_neurons([s, s], config=CASConfig(freeze_last=1)) == NeuronSet([(0, 1)])
    f = Fact("a", "r", "o")
    assert cas_neurons_by_fact({f: [s, s]}) == {f: NeuronSet([(0, 1), (1, 0)])}  # 0.7 > 0.3 * 1.4


def test_compare_kn_selections_tiny_model():
    from kn_lens.analysis.cas import CompareConfig, compare_kn_selections
    from kn_lens.edit import kn as kn_edit
    from kn_lens.evaluate import evaluate_edit
    from kn_lens.facts import Relation, queries_for_fact
    from kn_lens.models import model_info
    from kn_lens.neurons import NeuronScores, threshold_relative, union
    from kn_lens.testing import tiny_gpt2

    m = tiny_gpt2()
    rel = Relation("P36", "capital", ("The capital of {} is", "{}'s capital is"))
    facts = [Fact("France", "P36", "Paris"), Fact("Germany", "P36", "Berlin"),
             Fact("Italy", "P36", "Rome")]
    g = torch.Generator().manual_seed(0)
    scores = {}
    for f in facts:
        scores[f] = [NeuronScores(torch.rand(m.cfg.n_layers, m.cfg.d_mlp, generator=g) ** 8,
                                  "random", q, None, model_info(m))
                     for q in queries_for_fact(m, f, rel)]
    res = compare_kn_selections(m, scores, config=CompareConfig(edit_queries="first", n_locality=2),
                                groups={facts[0]: "K_I", facts[1]: "K_II", facts[2]: "K_II"})
    assert len(res.per_edit) == 3 * 3 * 2  # facts x selections x operations
    assert {r["group"] for r in res.rows} == {"all", "K_I", "K_II"}
    # the N_i erasure of fact 0 equals a direct erase + evaluate with the same queries
    f = facts[0]
    qs = [s.query for s in scores[f]]
    n_i = threshold_relative(scores[f][0], 0.2)
    rec = next(r for r in res.per_edit if r["fact"] == f.key() and r["selection"] == "N_i"
               and r["operation"] == "erasure")
    assert rec["n_neurons"] == len(n_i)
    # locality queries are drawn inside; recompute reliability/generalisation only (in-scope)
    direct = evaluate_edit(m, kn_edit.erase(m, n_i), edited=[qs[0]], generalisation=qs[1:],
                           mode="erasure")
    assert rec["reliability"] == pytest.approx(direct.reliability)
    assert rec["generalisation"] == pytest.approx(direct.generalisation)
    cas_rec = next(r for r in res.per_edit if r["fact"] == f.key() and r["selection"] == "CAS")
    assert cas_rec["n_neurons"] == len(cas_neurons(scores[f]))
    ng = next(r for r in res.per_edit if r["fact"] == f.key() and r["selection"] == "N_g")
    assert ng["n_neurons"] == len(union(threshold_relative(s, 0.2) for s in scores[f]))
    row = next(r for r in res.table() if r["operation"] == "erasure" and r["group"] == "all"
               and r["selection"] == "N_i")
    assert row["n"] == 3 and 0 <= row["Rel"] <= 1
    assert "Rel" in res.to_markdown() and len(res.to_dict()["per_edit"]) == 18
    # regrouping re-summarises the same edits: the original labels give the same rows; one label
    # for every fact gives that group rows equal to "all"
    assert res.regroup({facts[0]: "K_I", facts[1]: "K_II", facts[2]: "K_II"}).table() == res.table()
    one = res.regroup({f.key(): "K_II" for f in facts})
    assert {r["group"] for r in one.rows} == {"all", "K_II"}
    for a in (r for r in one.table() if r["group"] == "all"):
        b = next(r for r in one.table() if r["group"] == "K_II" and r["operation"] == a["operation"]
                 and r["selection"] == a["selection"])
        assert {k: v for k, v in a.items() if k != "group"} == {k: v for k, v in b.items() if k != "group"}
    assert one.per_edit[0]["group"] == "K_II" and len(one.per_edit) == len(res.per_edit)


def test_kn_modification_items_equal_compare_kn_selections_and_resume(tmp_path):
    """QL Table 3 through sweep items (one per fact): the same per-edit records as the in-process
    loop, and a second sweep over the same store computes nothing."""
    from kn_lens.analysis import KNSelection
    from kn_lens.analysis.cas import CompareConfig, compare_kn_selections
    from kn_lens.facts import Relation, queries_for_fact
    from kn_lens.locate import contribution_scores
    from kn_lens.sweep import ReferenceSpec, kn_modification_items, sweep, sweep_results
    from kn_lens.sweep.kinds import prepared_reference
    from kn_lens.testing import tiny_gpt2

    m = tiny_gpt2()
    rel = Relation("P36", "capital", ("The capital of {} is", "{}'s capital is"))
    facts = [Fact("France", "P36", "Paris"), Fact("Germany", "P36", "Berlin"),
             Fact("Italy", "P36", "Rome")]
    scores = {f: [contribution_scores(m, q) for q in queries_for_fact(m, f, rel)] for f in facts}
    new = {facts[0]: "Rome", facts[1]: "Paris", facts[2]: "Berlin"}
    locality = [scores[facts[2]][0].query, scores[facts[0]][1].query]
    cfg = CompareConfig(edit_queries="first")
    ref = ReferenceSpec(n_slices=1, slice_len=8)
    kw = dict(selection=KNSelection(), config=cfg, new_objects=new, locality=locality)
    items = kn_modification_items(m, scores, cas_config=CASConfig(), reference=ref, **kw)
    assert len(items) == 3 and len({it.key for it in items}) == 3
    # the fact's own queries are not its locality set
    assert items[2].payload.locality == (locality[1],)
    recs = sweep_results(items, tmp_path, model=m, progress=False, log=lambda s: None)
    direct = compare_kn_selections(m, scores, reference=prepared_reference(m, ref), **kw)
    via = compare_kn_selections(m, scores, reference=prepared_reference(m, ref),
                                done=dict(zip(scores, recs)), **kw)
    assert via.per_edit == direct.per_edit and via.rows == direct.rows
    assert len(direct.per_edit) == 3 * 3 * 2
    again = sweep(items, tmp_path, model=m, progress=False, log=lambda s: None)
    assert again.computed == 0 and again.stored_before == 3
    # the key follows what determines the records: another update target is another item
    other = kn_modification_items(m, scores, cas_config=CASConfig(), reference=ref,
                                  **{**kw, "new_objects": {**new, facts[0]: "Berlin"}})
    assert other[0].key != items[0].key and other[1].key == items[1].key


def test_kn_modification_items_key_hand_made_scores_by_value():
    """Scores from outside the locator registry are keyed by their values (no method version
    vouches for them); registry scores by locator, config and version only."""
    from kn_lens.analysis import KNSelection
    from kn_lens.analysis.cas import CompareConfig
    from kn_lens.facts import Relation, queries_for_fact
    from kn_lens.locate import contribution_scores
    from kn_lens.models import model_info
    from kn_lens.neurons import NeuronScores
    from kn_lens.sweep import kn_modification_items
    from kn_lens.testing import tiny_gpt2

    m = tiny_gpt2()
    rel = Relation("P36", "capital", ("The capital of {} is", "{}'s capital is"))
    f = Fact("France", "P36", "Paris")
    qs = queries_for_fact(m, f, rel)
    kw = dict(config=CompareConfig(edit_queries="first"), selection=KNSelection(),
              cas_config=CASConfig(), new_objects={f: "Rome"})

    def hand(seed):
        g = torch.Generator().manual_seed(seed)
        return {f: [NeuronScores(torch.rand(m.cfg.n_layers, m.cfg.d_mlp, generator=g), "mine", q,
                                 None, model_info(m)) for q in qs]}

    a, b, a2 = (kn_modification_items(m, hand(s), **kw)[0] for s in (0, 1, 0))
    assert a.key != b.key and a.key == a2.key and a.payload.scores_hash
    reg = kn_modification_items(m, {f: [contribution_scores(m, q) for q in qs]}, **kw)[0]
    assert reg.payload.scores_hash is None and reg.payload.locator_version >= 1

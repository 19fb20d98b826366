"""Behaviour of the QL / FiNE analyses that only a trained model shows (SmolLM2-135M).

One module-scoped set of contribution scores (FiNE's locator, 0.3 s per query) over six capital
facts x three paraphrases feeds the consistency, CAS and layer-distribution checks. The numbers
these tests guard, measured when they were written: CS2 0.57-1.0 per fact (random sets of the same
size: 0.0); erasing 2-12 CAS neurons lowers P(answer) by 30-90 % on every paraphrase (as many
random neurons: within 5 %); mean layer of the selected neurons 22.8 of 0-29 (93 % in the upper
half; FiNE Fig. 4).
"""
import pytest
import torch

from kn_lens import hooks as H
from kn_lens.analysis.cas import CASConfig, cas_neurons
from kn_lens.analysis.consistency import ConsistencyConfig, consistency_analysis, cs2
from kn_lens.analysis.fine import layer_distribution
from kn_lens.edit import erase
from kn_lens.facts import Fact, Relation, answer_probs, queries_for_fact
from kn_lens.neurons import random_like, union

pytestmark = pytest.mark.real_model

CAPITAL = Relation("country_capital", "capital",
                   ("The capital of {} is", "The capital city of {} is the city of",
                    "The national capital of {} is"))  # three of the built-in templates
FACTS = [Fact(s, "country_capital", o) for s, o in
         [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
          ("Spain", "Madrid"), ("Russia", "Moscow")]]


@pytest.fixture(scope="module")
def located(default_model):
    from kn_lens.locate.contribution import contribution_scores, select_contribution_neurons

    out = {}
    for f in FACTS:
        qs = queries_for_fact(default_model, f, CAPITAL)
        scores = [contribution_scores(default_model, q) for q in qs]
        out[f] = (qs, scores, [select_contribution_neurons(s) for s in scores])
    return out


def test_real_kns_are_consistent_across_paraphrases(default_model, located):
    """A fact's KN sets overlap across its paraphrases far beyond chance (QL 2.1)."""
    m = default_model
    g = torch.Generator().manual_seed(0)
    for f, (_, _, sets) in located.items():
        rnd = [random_like(s, m.cfg.n_layers, m.cfg.d_mlp, generator=g) for s in sets]
        print(f.subject, "CS2", round(cs2(sets), 3), "random", round(cs2(rnd), 3))
        assert cs2(sets) > 0.3 > cs2(rnd), f
    res = consistency_analysis({f: sets for f, (_, _, sets) in located.items()},
                               config=ConsistencyConfig(), method="contribution")
    overall = next(r for r in res.rows if r.scope == "overall" and r.threshold_kind == "static")
    assert overall.n_k1 == len(FACTS) and overall.n_k2 == 0  # all well above 0.1 here


def test_real_cas_erasure_is_small_and_works_on_every_paraphrase(default_model, located):
    """Erasing a fact's CAS neurons (QL eq. 7, last 3 layers frozen as in the KN selection) lowers
    P(answer) on every paraphrase, and more than erasing as many random neurons (QL 3.3)."""
    m = default_model
    g = torch.Generator().manual_seed(1)
    for f in FACTS[:3]:
        qs, scores, sets = located[f]
        cas = cas_neurons(scores, config=CASConfig(freeze_last=3))
        n_g = union(sets)
        assert 0 < len(cas) and max(n.layer for n in cas) < m.cfg.n_layers - 3, (f, cas)
        rnd = random_like(cas, m.cfg.n_layers, m.cfg.d_mlp, generator=g, exclude=n_g)
        before = answer_probs(m, qs)
        after = answer_probs(m, qs, fwd_hooks=erase(m, cas).hooks(m))
        after_rnd = answer_probs(m, qs, fwd_hooks=erase(m, rnd).hooks(m))
        print(f.subject, len(cas), len(n_g), before.tolist(), after.tolist(), after_rnd.tolist())
        assert bool((after < before).all()), (f, before, after)
        assert float((1 - after / before).mean()) > 0.2, (f, before, after)
        assert bool((after < after_rnd).all()), (f, after, after_rnd)
    assert H.active_hook_count(m) == 0


def test_real_fine_neurons_sit_in_the_upper_layers(default_model, located):
    """FiNE Fig. 4: the selected neurons concentrate in the upper half of the layers."""
    n = default_model.cfg.n_layers
    d = layer_distribution([s for (_, _, sets) in located.values() for s in sets], n)
    print("mean layer", d.mean_layer(), "upper half", sum(d.shares[n // 2:]))
    assert d.total >= 15
    assert d.mean_layer() > 0.6 * (n - 1)
    assert sum(d.shares[n // 2:]) > 0.75

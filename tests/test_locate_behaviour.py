"""Behaviour only a trained model shows: the neurons each locator ranks highest carry the fact.

For a handful of well-known facts, zeroing the top 0.1 % of neurons picked by a method must lower
P(answer) more than twice as much as zeroing as many random neurons (mean over random draws).
The full table over 50+ facts is printed by ``benchmarks/locate.py``.
"""
import pytest
import torch

from kn_lens import hooks
from kn_lens.facts import Fact, answer_probs, make_query
from kn_lens.locate import IGConfig, locate
from kn_lens.locate.mediation import MediationConfig
from kn_lens.neurons import random_like, top_fraction

FACTS = [
    (Fact("Eiffel Tower", "landmark_city", "Paris"), "The {} is located in the city of"),
    (Fact("Japan", "country_capital", "Tokyo"), "The capital of {} is"),
    (Fact("Germany", "country_capital", "Berlin"), "The capital of {} is"),
]

METHODS = {
    "ig": IGConfig(steps=20),
    "contribution": None,
    # exact IE; search space pruned by the AtP estimate (DNI pruning misses the strong neurons,
    # see test_locate_mediation.py); gamma 5 % and one noise sample keep the test short
    "mediation": MediationConfig(n_noise=1, gamma=5.0, prune="atp"),
}


@pytest.mark.real_model
@pytest.mark.parametrize("method", list(METHODS))
def test_top_neurons_matter_more_than_random(default_model, method):
    m = default_model
    queries = [make_query(m, f, t) for f, t in FACTS]
    p0 = answer_probs(m, queries)
    scores = locate(m, queries, method=method, config=METHODS[method], progress=False)
    gen = torch.Generator().manual_seed(0)
    drops_top, drops_rnd = [], []
    for q, s, base in zip(queries, scores, p0.tolist()):
        top = top_fraction(s, 0.001)
        assert len(top) == round(0.001 * m.cfg.n_layers * m.cfg.d_mlp)
        drops_top.append(base - float(answer_probs(m, [q], fwd_hooks=hooks.scale_neurons(top, 0.0))[0]))
        for _ in range(3):
            r = random_like(top, m.cfg.n_layers, m.cfg.d_mlp, generator=gen, exclude=top)
            drops_rnd.append(base - float(answer_probs(m, [q], fwd_hooks=hooks.scale_neurons(r, 0.0))[0]))
    mean_top = sum(drops_top) / len(drops_top)
    mean_rnd = max(sum(drops_rnd) / len(drops_rnd), 1e-3)
    assert mean_top > 2 * mean_rnd, (method, drops_top, drops_rnd)
    assert mean_top > 0.2, (method, drops_top)
    assert hooks.active_hook_count(m) == 0

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

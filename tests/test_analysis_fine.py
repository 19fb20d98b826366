"""FiNE localisation analyses: layer distribution and W_out @ W_U top tokens."""
import pytest
import torch

from kn_lens.analysis.fine import layer_distribution, neuron_top_tokens, neuron_vocab_logits
from kn_lens.errors import ConfigError
from kn_lens.neurons import Neuron, NeuronSet
from kn_lens.testing import tiny_gpt2, tiny_llama


def S(*pairs):
    return NeuronSet(pairs)


def test_layer_distribution_unique_and_multiplicity():
    sets = [S((0, 1), (2, 3), (2, 4)), S((2, 3), (1, 0)), S((2, 3))]
    d = layer_distribution(sets, 3)
    # unique: {01, 23, 24, 10} -> layer counts 1, 1, 2
    assert d.counts == (1, 1, 2) and d.total == 4
    assert d.shares == pytest.approx((0.25, 0.25, 0.5))
    assert d.mean_layer() == pytest.approx((0 + 1 + 4) / 4)
    m = layer_distribution(sets, 4, unique=False)
    assert m.counts == (1, 1, 4, 0) and sum(m.shares) == pytest.approx(1.0)
    assert d.table()[2] == {"layer": 2, "count": 2, "share": 0.5}
    with pytest.raises(ConfigError):
        layer_distribution(sets, 2)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_top_tokens_equal_direct_computation(make):
    m = make()
    neurons = [Neuron(0, 3), Neuron(2, 5)]
    scores = torch.zeros(m.cfg.n_layers, m.cfg.d_mlp)
    scores[0, 3], scores[2, 5] = 0.5, 2.0
    rows = neuron_top_tokens(m, neurons, k=4, scores=scores)
    assert [r.neuron for r in rows] == [Neuron(2, 5), Neuron(0, 3)]  # sorted by score
    for r in rows:
        direct = m.W_out[r.neuron.layer][r.neuron.index] @ m.W_U
        vals, ids = direct.topk(4)
        assert list(r.token_ids) == ids.tolist()
        assert list(r.logits) == pytest.approx(vals.tolist(), rel=1e-5)
        assert list(r.tokens) == [m.tokenizer.decode([i]) for i in ids.tolist()]
    assert rows[0].row()["neuron"] == "L2.U5" and rows[0].score == 2.0
    assert torch.allclose(neuron_vocab_logits(m, (2, 5)), m.W_out[2][5] @ m.W_U)
    plain = neuron_top_tokens(m, S((1, 1)), k=2)
    assert plain[0].score is None and len(plain[0].tokens) == 2
    with pytest.raises(ConfigError):
        neuron_top_tokens(m, [(9, 0)])

"""QL eq. 2 KN erasure / update as Edits, local vs global sets; one real-model behaviour test."""
import pytest
import torch

from kn_lens import hooks as H
from kn_lens.edit import KNEditConfig, answer_embedding, erase, kn_sets, token_of, update
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import Fact, answer_probs, make_query
from kn_lens.neurons import NeuronScores, NeuronSet, top_k
from kn_lens.models import model_info

KNS = NeuronSet([(0, 3), (1, 5), (1, 9), (2, 0)])


def test_erase_zeroes_rows_and_equals_suppression(tiny_model):
    edit = erase(tiny_model, KNS)
    assert edit.touched_neurons() == KNS and edit.method == "kn_erase"
    with edit.applied(tiny_model):
        for n in KNS:
            assert torch.count_nonzero(tiny_model.blocks[n.layer].mlp.W_out[n.index]) == 0
    # zeroing a neuron's output row == zeroing its activation (b_out untouched)
    toks = torch.randint(0, tiny_model.cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with tiny_model.hooks(fwd_hooks=edit.hooks(tiny_model)):
            via_edit = tiny_model(toks)
        with tiny_model.hooks(fwd_hooks=H.scale_neurons(KNS, 0.0)):
            via_act = tiny_model(toks)
    torch.testing.assert_close(via_edit, via_act, atol=2e-5, rtol=1e-5)


def test_update_delta_is_eq2(tiny_model):
    q = make_query(tiny_model, Fact("France", "capital", "Paris"), "The capital of {} is")
    cfg = KNEditConfig()
    assert (cfg.lambda1, cfg.lambda2, cfg.embedding) == (2.0, 2.0, "input")
    edit = update(tiny_model, KNS, q, "Berlin")
    o, o2 = q.answer_ids[0], token_of(tiny_model, " Berlin")
    assert token_of(tiny_model, "Berlin") == o2
    expect = -2 * tiny_model.W_E[o] + 2 * tiny_model.W_E[o2]
    for d in edit.deltas:
        for row in d.values:
            torch.testing.assert_close(row, expect.detach())
    orig = {n: tiny_model.blocks[n.layer].mlp.W_out[n.index].detach().clone() for n in KNS}
    with edit.applied(tiny_model):
        for n in KNS:  # W <- W - lambda1 E(o) + lambda2 E(o')
            torch.testing.assert_close(tiny_model.blocks[n.layer].mlp.W_out[n.index].detach(),
                                       orig[n] + expect.detach())
    unembed = update(tiny_model, KNS, q, "Berlin", config=KNEditConfig(embedding="unembed"))
    torch.testing.assert_close(unembed.deltas[0].values[0],
                               (-2 * tiny_model.W_U[:, o] + 2 * tiny_model.W_U[:, o2]).detach())
    assert unembed.config["embedding"] == "unembed"
    with pytest.raises(InvalidFactError):
        update(tiny_model, KNS, q, q)
    with pytest.raises(ConfigError):
        KNEditConfig(embedding="output")
    with pytest.raises(ConfigError):
        erase(tiny_model, NeuronSet())
    with pytest.raises(ConfigError):
        erase(tiny_model, NeuronSet([(0, tiny_model.cfg.d_mlp)]))


def test_answer_embedding_shapes(gpt2_tiny):
    assert answer_embedding(gpt2_tiny, 5).shape == (gpt2_tiny.cfg.d_model,)
    assert answer_embedding(gpt2_tiny, 5, "unembed").shape == (gpt2_tiny.cfg.d_model,)


def test_kn_sets_local_and_global(gpt2_tiny):
    info = model_info(gpt2_tiny)
    s1 = torch.zeros(3, 64)
    s1[0, 1], s1[1, 2], s1[2, 3] = 1.0, 0.5, 0.1  # 0.1 < 0.2 x max: not a KN
    s2 = torch.zeros(3, 64)
    s2[0, 1], s2[2, 7] = 0.3, 1.0
    scores = [NeuronScores(s, "test", None, None, info) for s in (s1, s2)]
    local, glob = kn_sets(scores)
    assert local[0] == NeuronSet([(0, 1), (1, 2)])
    assert local[1] == NeuronSet([(0, 1), (2, 7)])
    assert glob == NeuronSet([(0, 1), (1, 2), (2, 7)])
    local2, glob2 = kn_sets([NeuronSet([(0, 0)]), s1], select=lambda s: top_k(s, 1))
    assert local2 == [NeuronSet([(0, 0)]), NeuronSet([(0, 1)])] and len(glob2) == 2
    with pytest.raises(ConfigError):
        kn_sets([])
    # the global edit touches the union
    assert erase(gpt2_tiny, glob).touched_neurons() == glob


def _simple_kns(model, query, k=20):
    """In-test locator: activation x direct logit effect (W_out W_U)[answer] at the last position."""
    store = {}
    hl = [h for layer in range(model.cfg.n_layers) for h in H.cache_hook(H.mlp_post(layer), store)]
    with torch.no_grad(), model.hooks(fwd_hooks=hl):
        model(query.tokens(model.cfg.device))
    acts = torch.stack([store[H.mlp_post(layer)][0, query.last_position]
                        for layer in range(model.cfg.n_layers)])
    w_u = model.W_U.detach()[:, query.answer_ids[0]]
    dla = torch.stack([model.blocks[layer].mlp.W_out.detach() @ w_u
                       for layer in range(model.cfg.n_layers)])
    return top_k((acts * dla).cpu(), k)


@pytest.mark.real_model
def test_real_erasing_kns_lowers_answer_probability(default_model):
    model = default_model
    q = make_query(model, Fact("Eiffel Tower", "located_in", "Paris"),
                   "The {} is located in the city of")
    kns = _simple_kns(model, q, 20)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    edit = erase(model, kns)
    p_before = float(answer_probs(model, [q])[0])
    p_hooks = float(answer_probs(model, [q], fwd_hooks=edit.hooks(model))[0])
    with edit.applied(model):
        p_mat = float(answer_probs(model, [q])[0])
    p_rand = float(answer_probs(model, [q], fwd_hooks=erase(
        model, NeuronSet([(n.layer, (n.index + 97) % model.cfg.d_mlp) for n in kns])).hooks(model))[0])
    print(f"P(Paris): before {p_before:.3f}, erased (hooks) {p_hooks:.4f}, (materialised) "
          f"{p_mat:.4f}, 20 shifted-index neurons erased {p_rand:.3f}")
    assert p_before > 0.5
    assert p_hooks < 0.5 * p_before
    assert abs(p_hooks - p_mat) < 1e-4
    assert p_rand > p_hooks
    # no trace: weights bit-identical, no hooks left
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    assert H.active_hook_count(model) == 0
    assert abs(float(answer_probs(model, [q])[0]) - p_before) < 1e-6


@pytest.mark.real_model
def test_real_kn_update_flips_answer(default_model):
    from kn_lens.evaluate import evaluate_edit, retarget

    model = default_model
    fact = Fact("Eiffel Tower", "located_in", "Paris")
    q = make_query(model, fact, "The {} is located in the city of")
    neighbour = make_query(model, fact, "The {} can be found in the city of")
    other = make_query(model, Fact("Microsoft", "x", "Windows"), "{} is best known for the operating system")
    edit = update(model, _simple_kns(model, q, 20), q, "London")
    r = evaluate_edit(model, edit, edited=[retarget(model, q, "London")],
                      generalisation=[retarget(model, neighbour, "London")], locality=[other],
                      mode="update")
    print(r.summary(), [(o.p_before, o.p_after, o.top1_after) for o in r.edited + r.neighbours])
    assert r.edited[0].top1_before == " Paris" and r.edited[0].top1_after == " London"
    assert r.reliability == 1.0 and r.edited[0].p_after > 0.5 > r.edited[0].p_before
    assert H.active_hook_count(model) == 0

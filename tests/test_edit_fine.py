"""FiNE on tiny random models: it edits only the located neurons' W_out rows, never a frozen
layer, localises as eq. 3 + top-k per token, trains eq. 7's terms, and keeps the editor guarantees
(model untouched, same seed -> same edit, hooks == materialised, exact undo, typed errors)."""
import pytest
import torch

from kn_lens import hooks as H
from kn_lens.edit import edit
from kn_lens.edit.fine import FiNEConfig, editable_layers, located_query, locate_neurons
from kn_lens.edit.requests import rewrite_queries
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.evaluate.scoring import score
from kn_lens.facts import EditRequest, Fact
from kn_lens.locate.contribution import contribution_scores
from kn_lens.neurons import Neuron, NeuronSet, top_k

CFG = FiNEConfig(k=3, freeze_last=1, steps=8, lr=5e-2, stop_prob=None)


def _request(subject="France", old="Paris", new="Rome", prompt="The capital of France is"):
    return EditRequest(Fact(subject, "capital", old), new, (prompt,))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model, e):
    """Parameter entries the materialised edit changes: {name: set of (row, ...) indices}."""
    before = _snapshot(model)
    with e.applied(model):
        after = _snapshot(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # undo exact
    out = {}
    for k, v in before.items():
        diff = (after[k] != v)
        if diff.any():
            out[k] = diff
    return out


def test_fine_edits_only_the_located_rows_and_no_frozen_layer(tiny_model):
    snap = _snapshot(tiny_model)
    reqs = [_request(), _request("Germany", "Berlin", "Madrid", "The capital of Germany is")]
    e = edit(tiny_model, reqs, method="fine", config=CFG, seed=1)
    assert e.method == "fine" and H.active_hook_count(tiny_model) == 0
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())
    neurons = NeuronSet(tuple(n) for n in e.config["details"]["neurons"])
    assert neurons == locate_neurons(tiny_model, reqs, config=CFG)
    frozen = tiny_model.cfg.n_layers - 1
    assert neurons and all(n.layer < frozen for n in neurons)
    changed = _changed(tiny_model, e)
    assert changed and all(k.endswith("mlp.W_out") for k in changed)  # nothing but W_out rows
    for k, diff in changed.items():
        layer = int(k.split(".")[1])
        assert layer != frozen
        rows = set(diff.any(1).nonzero().flatten().tolist())
        assert rows <= {n.index for n in neurons if n.layer == layer}
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, tiny_model.cfg.d_vocab, (2, 7), generator=g)
    with torch.no_grad():
        with tiny_model.hooks(fwd_hooks=e.hooks(tiny_model)):
            hooked = tiny_model(toks)
        with e.applied(tiny_model):
            mat = tiny_model(toks)
    torch.testing.assert_close(hooked, mat, atol=1e-4, rtol=1e-4)
    e2 = edit(tiny_model, reqs, method="fine", config=CFG, seed=1)
    assert all(torch.equal(a.values, b.values) and torch.equal(a.index, b.index)
               for a, b in zip(e.deltas, e2.deltas))


def test_localisation_is_eq3_top_k_per_predicted_token(llama_tiny):
    r = _request()
    cfg = FiNEConfig(k=2, freeze_last=1)
    q = located_query(llama_tiny, r, cfg)
    old = located_query(llama_tiny, r, FiNEConfig(locate_on="old_object"))
    assert q.prompt_ids == old.prompt_ids and q.n_answer == old.n_answer
    # the located tokens are the unedited model's own greedy predictions, teacher-forced
    logits = llama_tiny(torch.tensor([q.input_ids]))[0]
    assert tuple(logits[list(q.answer_positions)].argmax(-1).tolist()) == q.answer_ids
    per_token = contribution_scores(llama_tiny, q).per_token
    allowed = per_token.clone()
    allowed[:, llama_tiny.cfg.n_layers - 1] = float("-inf")
    expected = NeuronSet()
    for t in allowed:
        expected = expected | top_k(t, 2)
    assert locate_neurons(llama_tiny, [r], config=cfg) == expected
    one = locate_neurons(llama_tiny, [r], config=FiNEConfig(k=2, freeze_last=1, layer=0))
    assert one and {n.layer for n in one} == {0}


def test_random_neurons_ablation(tiny_model):
    r = [_request()]
    located = locate_neurons(tiny_model, r, config=CFG)
    rnd = FiNEConfig(**{**CFG.__dict__, "neurons": "random"})
    a = locate_neurons(tiny_model, r, config=rnd, generator=torch.Generator().manual_seed(0))
    b = locate_neurons(tiny_model, r, config=rnd, generator=torch.Generator().manual_seed(0))
    c = locate_neurons(tiny_model, r, config=rnd, generator=torch.Generator().manual_seed(1))
    assert a == b and a != c and len(a) == len(located)
    assert all(n.layer in editable_layers(tiny_model, CFG) for n in a | c)
    e = edit(tiny_model, r, method="fine", config=rnd, seed=0)
    assert NeuronSet(tuple(n) for n in e.config["details"]["neurons"]) == a


def test_training_raises_the_new_object_and_zero_steps_give_zero(tiny_model):
    r = _request()
    (q,) = rewrite_queries(tiny_model, r)
    before = score(tiny_model, [q])[0].logprob
    e = edit(tiny_model, [r], method="fine", config=FiNEConfig(
        k=3, freeze_last=1, steps=30, lr=5e-2, alpha=0.0, beta=0.0, gamma=0.0, stop_prob=None))
    with tiny_model.hooks(fwd_hooks=e.hooks(tiny_model)):
        after = score(tiny_model, [q])[0].logprob
    assert after > before + 1.0, (before, after)
    z = edit(tiny_model, [r], method="fine", config=FiNEConfig(k=3, freeze_last=1, steps=0))
    assert all(float(d.values.abs().max()) == 0.0 for d in z.deltas)


def test_fine_errors_are_typed(tiny_model):
    snap = _snapshot(tiny_model)
    n = tiny_model.cfg.n_layers
    with pytest.raises(ConfigError, match="frozen"):
        edit(tiny_model, [_request()], method="fine", config=FiNEConfig(freeze_last=1, layer=n - 1))
    with pytest.raises(ConfigError, match="freezes all"):
        edit(tiny_model, [_request()], method="fine", config=FiNEConfig(freeze_last=n))
    with pytest.raises(ConfigError, match="outside the layers"):
        edit(tiny_model, [_request()], method="fine", config=CFG,
             neurons=NeuronSet([Neuron(n - 1, 0)]))
    with pytest.raises(ConfigError, match="empty"):
        edit(tiny_model, [_request()], method="fine", config=CFG, neurons=NeuronSet())
    with pytest.raises(InvalidFactError, match="equals the old one"):
        edit(tiny_model, [_request(new="Paris")], method="fine", config=CFG)
    for bad in (dict(k=0), dict(freeze_last=-1), dict(neurons="all"), dict(locate_on="x"),
                dict(alpha=-1.0), dict(lr=0.0), dict(stop_prob=1.5)):
        with pytest.raises(ConfigError):
            FiNEConfig(**bad)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())
    assert H.active_hook_count(tiny_model) == 0

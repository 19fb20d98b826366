"""TNF-DA on tiny random models: targeted neurons = top fraction by IE (mediation or AtP), only
their W_in / W_gate columns and W_out rows change, training uses the prefixed prompts (eq. 8) and
a KL term on same-relation prompts that never use held-out neighbourhood subjects (eq. 11-12),
and the editor guarantees hold."""
import pytest
import torch

from kn_lens import hooks as H
from kn_lens.edit import edit
from kn_lens.edit.tnf_da import TNFDAConfig, augmentation_prompts, targeted_neurons
from kn_lens.errors import ConfigError
from kn_lens.facts import EditRequest, Fact, LabelledPrompt
from kn_lens.locate.mediation import AtPConfig, attribution_patching
from kn_lens.edit.requests import rewrite_queries
from kn_lens.neurons import NeuronSet, top_fraction

POOL = ("Spain", "Italy", "Japan", "Egypt", "Peru", "Chile")
CFG = TNFDAConfig(fraction=0.05, locator="atp", n_noise=1, augment_subjects=POOL, n_augment=3,
                  lr=1e-2, steps=4, delta=1e-6)


def _request(subject="France", old="Paris", new="Rome", prompt="The capital of France is"):
    f = Fact(subject, "capital", old)
    return EditRequest(f, new, (prompt,), neighbourhood=(
        LabelledPrompt("The capital of Italy is", "Rome", Fact("Italy", "capital", "Rome")),),
        prefixes=("Yesterday, the dog stood. ", "The old house was quiet. "))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_targeted_neurons_are_the_top_fraction_by_ie(tiny_model):
    r = _request()
    (q,) = rewrite_queries(tiny_model, r, target="Paris", all_prompts=False)
    expected = top_fraction(attribution_patching(tiny_model, q, config=AtPConfig(n_noise=1)), 0.05)
    assert targeted_neurons(tiny_model, [r], config=CFG) == expected
    med = targeted_neurons(tiny_model, [r], config=TNFDAConfig(fraction=0.05, n_noise=1, prune="none"))
    assert len(med) == len(expected)


def test_tnf_da_changes_only_the_targeted_neurons_parameters(tiny_model):
    snap = _snapshot(tiny_model)
    r = [_request()]
    e = edit(tiny_model, r, method="tnf_da", config=CFG, seed=2)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())
    assert H.active_hook_count(tiny_model) == 0
    d = e.config["details"]
    assert d["n_train"] == 2 and d["n_augment"] == 3  # two prefixed prompts, |S_r| = 3
    neurons = NeuronSet(tuple(n) for n in d["neurons"])
    assert neurons == targeted_neurons(tiny_model, r, config=CFG)
    kinds = {"W_in", "W_gate", "W_out"} if tiny_model.cfg.gated_mlp else {"W_in", "W_out"}
    with e.applied(tiny_model):
        after = _snapshot(tiny_model)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())  # undo exact
    seen = set()
    for k, v in snap.items():
        diff = after[k] != v
        if not diff.any():
            continue
        kind = k.rsplit(".", 1)[1]
        assert kind in kinds, k
        seen.add(kind)
        layer = int(k.split(".")[1])
        units = diff.any(1) if kind == "W_out" else diff.any(0)
        assert set(units.nonzero().flatten().tolist()) <= {n.index for n in neurons if n.layer == layer}
    assert seen == kinds
    e2 = edit(tiny_model, r, method="tnf_da", config=CFG, seed=2)
    assert all(torch.equal(a.values, b.values) for a, b in zip(e.deltas, e2.deltas))
    toks = torch.randint(0, tiny_model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with tiny_model.hooks(fwd_hooks=e.hooks(tiny_model)):
            hooked = tiny_model(toks)
        with e.applied(tiny_model):
            mat = tiny_model(toks)
    torch.testing.assert_close(hooked, mat, atol=1e-4, rtol=1e-4)


def test_augmentation_holds_out_the_neighbourhood_and_ablations():
    r = _request()
    g = torch.Generator().manual_seed(0)
    prompts = augmentation_prompts(r, TNFDAConfig(augment_subjects=POOL + ("France",), n_augment=10), g)
    assert len(prompts) == len(POOL) - 1  # France (the subject) and Italy (a neighbour) held out
    assert all("Italy" not in p and "France" not in p for p in prompts)
    assert all(p.startswith("The capital of ") and p.endswith(" is") for p in prompts)
    assert augmentation_prompts(r, TNFDAConfig(augment="none"), g) == []
    rnd = augmentation_prompts(r, TNFDAConfig(augment="random", n_augment=4), g)
    assert len(rnd) == 4 and len(set(rnd)) == 4
    with pytest.raises(ConfigError, match="built-in dataset"):
        augmentation_prompts(r, TNFDAConfig(), g)  # "capital" is not a built-in relation


def test_tnwp_random_neurons_and_stopping(tiny_model):
    r = [_request()]
    e = edit(tiny_model, r, method="tnf_da", config=TNFDAConfig(**{**CFG.__dict__, "prefixes": False}))
    assert e.config["details"]["n_train"] == 1
    rn = TNFDAConfig(**{**CFG.__dict__, "neurons": "random"})
    a = edit(tiny_model, r, method="tnf_da", config=rn, seed=0).config["details"]["neurons"]
    b = edit(tiny_model, r, method="tnf_da", config=rn, seed=1).config["details"]["neurons"]
    assert a != b and len(a) == len(b) == len(targeted_neurons(tiny_model, r, config=CFG))
    stop = edit(tiny_model, r, method="tnf_da", config=TNFDAConfig(
        **{**CFG.__dict__, "delta": 1e3, "steps": 10})).config["details"]
    assert stop["stopped"] == "stop_nll" and stop["steps"] == 0  # L_gen <= delta at once


def test_bare_prompt_trains_the_bare_prompt_with_the_prefixed_ones(tiny_model):
    """``bare_prompt=True`` (eq. 9, Table 3's text) adds the bare rewrite prompt to eq. 8's
    prefixed rows: the NLL's examples are TNWP's bare row followed by TWP's prefixed rows."""
    from kn_lens.edit.tnf_da import training_problem

    r = [_request()]
    neurons = targeted_neurons(tiny_model, r, config=CFG)
    rows = {}
    for name, changes in (("twp", {}), ("tnwp", {"prefixes": False}), ("bare", {"bare_prompt": True})):
        p = training_problem(tiny_model, r, neurons, config=TNFDAConfig(**{**CFG.__dict__, **changes}),
                             generator=torch.Generator().manual_seed(0))
        rows[name] = [e.ids for e in p.terms[0].examples]
        assert p.n_train == len(rows[name])
    assert rows["bare"] == rows["tnwp"] + rows["twp"] and len(rows["bare"]) == 3
    e = edit(tiny_model, r, method="tnf_da", config=TNFDAConfig(**{**CFG.__dict__, "bare_prompt": True}))
    assert e.config["details"]["n_train"] == 3


def test_tnf_da_errors_are_typed(tiny_model):
    snap = _snapshot(tiny_model)
    no_prefix = EditRequest(Fact("France", "capital", "Paris"), "Rome", ("The capital of France is",))
    with pytest.raises(ConfigError, match="prefixes"):
        edit(tiny_model, [no_prefix], method="tnf_da", config=CFG)
    with pytest.raises(ConfigError, match="empty"):
        edit(tiny_model, [_request()], method="tnf_da", config=CFG, neurons=NeuronSet())
    for bad in (dict(fraction=0.0), dict(locator="ig"), dict(prune="x"), dict(augment="x"),
                dict(delta=0.0), dict(lr=0.0), dict(n_noise=0),
                dict(prefixes=False, bare_prompt=True)):
        with pytest.raises(ConfigError):
            TNFDAConfig(**bad)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())
    assert H.active_hook_count(tiny_model) == 0


def test_a_killed_tnf_da_resumes_without_localising_again(tiny_model, tmp_path, monkeypatch):
    """Inside ``optimise.resumable`` (a sweep item) a localisation longer than the save interval
    (a batch of 100 requests: ~12 min) is kept with the generator's state after it: a run killed
    in training resumes without localising again and returns the uninterrupted run's edit (the
    same random neurons and the same augmentation draws); the file goes once the edit is made."""
    import kn_lens.edit.tnf_da as T
    from kn_lens.edit import optimise as O

    r = [_request()]
    rn = TNFDAConfig(**{**CFG.__dict__, "neurons": "random"})  # the generator picks the neurons
    full = edit(tiny_model, r, method="tnf_da", config=rn, seed=3)
    train = T.optimise

    def killed(*a, **k):
        raise RuntimeError("killed in training")
    with O.resumable(tmp_path, every_s=1e-9):
        monkeypatch.setattr(T, "optimise", killed)
        with pytest.raises(RuntimeError, match="killed in training"):
            edit(tiny_model, r, method="tnf_da", config=rn, seed=3)
        assert (tmp_path / "targeted_neurons.kept.pt").exists()
        monkeypatch.setattr(T, "optimise", train)
        monkeypatch.setattr(T, "targeted_neurons", lambda *a, **k: 1 / 0)
        resumed = edit(tiny_model, r, method="tnf_da", config=rn, seed=3)
    assert resumed.config["details"]["neurons"] == full.config["details"]["neurons"]
    assert all(torch.equal(a.values, b.values) for a, b in zip(resumed.deltas, full.deltas))
    assert not list(tmp_path.iterdir()) and H.active_hook_count(tiny_model) == 0

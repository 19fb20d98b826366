"""KNE on tiny random models: the ensemble is eq. 6-7's quantile of IG attributions over all
layers; only the ensemble's slices change, each layer's delta is alpha / sqrt(n) x the trained
matrix (checked against a hand-written Adam loop on the scaled delta); batch editing unites the
ensembles; the editor guarantees hold (model untouched, same seed, hooks == materialised, undo)."""
import math

import pytest
import torch

from kn_lens import hooks as H
from kn_lens.edit import edit
from kn_lens.edit import optimise as O
from kn_lens.edit.delta import delta_hooks
from kn_lens.edit.kne import KNEConfig, locate_ensemble
from kn_lens.edit.requests import rewrite_queries
from kn_lens.errors import ConfigError
from kn_lens.evaluate.scoring import logits_at
from kn_lens.facts import EditRequest, Fact
from kn_lens.locate.integrated_gradients import IGConfig, integrated_gradients
from kn_lens.neurons import Neuron, NeuronSet, quantile, union

CFG = KNEConfig(quantile=0.95, ig_steps=4, steps=6, lr=5e-2, stop_prob=None)


def _request(subject="France", old="Paris", new="Rome", prompt="The capital of France is"):
    return EditRequest(Fact(subject, "capital", old), new, (prompt,))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ensemble_is_the_ig_quantile_over_all_layers_united_over_requests(tiny_model):
    reqs = [_request(), _request("Germany", "Berlin", "Madrid", "The capital of Germany is")]
    expected = []
    for r in reqs:
        (q,) = rewrite_queries(tiny_model, r, target=r.fact.object, all_prompts=False)
        expected.append(quantile(integrated_gradients(tiny_model, q, config=IGConfig(steps=4)), 0.95))
    got = locate_ensemble(tiny_model, reqs, config=CFG)
    assert got == union(expected) and len(got) > len(expected[0])
    n_all = tiny_model.cfg.n_layers * tiny_model.cfg.d_mlp
    assert len(expected[0]) <= math.ceil(0.05 * n_all) + 1


@pytest.mark.parametrize("module", ["W_out", "W_in"])
def test_kne_changes_only_the_ensemble_scaled_by_alpha_over_sqrt_n(tiny_model, module):
    snap = _snapshot(tiny_model)
    reqs = [_request()]
    cfg = KNEConfig(**{**CFG.__dict__, "module": module, "alpha": 2.0})
    e = edit(tiny_model, reqs, method="kne", config=cfg, seed=0)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())
    assert H.active_hook_count(tiny_model) == 0
    ens = locate_ensemble(tiny_model, reqs, config=cfg)
    assert NeuronSet(tuple(n) for n in e.config["details"]["neurons"]) == ens
    counts = ens.layers()
    for layer, s in e.config["details"]["scales"].items():
        assert s == pytest.approx(2.0 / math.sqrt(counts[int(layer)]))  # JSON keys
    with e.applied(tiny_model):
        after = _snapshot(tiny_model)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())  # undo exact
    for k, v in snap.items():
        diff = after[k] != v
        if not diff.any():
            continue
        assert k.endswith(f"mlp.{module}"), k
        layer = int(k.split(".")[1])
        units = diff.any(1) if module == "W_out" else diff.any(0)
        assert set(units.nonzero().flatten().tolist()) <= {n.index for n in ens if n.layer == layer}
    e2 = edit(tiny_model, reqs, method="kne", config=cfg, seed=0)
    assert all(torch.equal(a.values, b.values) for a, b in zip(e.deltas, e2.deltas))
    toks = torch.randint(0, tiny_model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with tiny_model.hooks(fwd_hooks=e.hooks(tiny_model)):
            hooked = tiny_model(toks)
        with e.applied(tiny_model):
            mat = tiny_model(toks)
    torch.testing.assert_close(hooked, mat, atol=1e-4, rtol=1e-4)


class _Slice:
    def __init__(self, param, dim, index, values):
        self.param, self.dim, self.index, self.values = param, dim, index, values


def test_scaled_target_is_adam_on_the_unscaled_matrix(llama_tiny):
    """Target(scale=s) == Adam(lr) on dW with the model seeing s * dW (eq. 11), step by step."""
    model = llama_tiny
    (q,) = rewrite_queries(model, _request())
    idx, s, lr, steps = (1, 4, 7), 0.3, 5e-2, 5
    target = O.Target.rows(1, idx, "W_out", scale=s)
    got = O.optimise(model, [target], [O.NLL([q])], config=O.OptimConfig(steps=steps, lr=lr)).values[0]
    x = torch.zeros(len(idx), model.cfg.d_model, requires_grad=True)
    opt = torch.optim.Adam([x], lr=lr)
    term = O.NLL([q])
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _ in range(steps):
            opt.zero_grad()
            sl = _Slice("blocks.1.mlp.W_out", 0, torch.tensor(idx), s * x)
            with model.hooks(fwd_hooks=delta_hooks(model, [sl])):
                loss = term.loss(logits_at(model, [q.input_ids], [q.answer_positions]))
            loss.backward()
            opt.step()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
    torch.testing.assert_close(got, s * x.detach(), atol=1e-5, rtol=1e-4)
    assert float(got.abs().max()) > 0


def test_kne_errors_are_typed(tiny_model, gpt2_tiny):
    snap = _snapshot(tiny_model)
    with pytest.raises(ConfigError, match="empty"):
        edit(tiny_model, [_request()], method="kne", config=CFG, neurons=NeuronSet())
    with pytest.raises(ConfigError, match="outside the model"):
        edit(tiny_model, [_request()], method="kne", config=CFG, neurons=NeuronSet([Neuron(99, 0)]))
    with pytest.raises(ConfigError, match="not gated"):
        edit(gpt2_tiny, [_request()], method="kne", config=KNEConfig(module="W_gate"))
    for bad in (dict(quantile=1.0), dict(alpha=0.0), dict(module="q_proj"), dict(attribute_to="x"),
                dict(head_quantile=1.0),
                dict(ig_steps=0), dict(lr=-1.0), dict(stop_prob=0.0)):
        with pytest.raises(ConfigError):
            KNEConfig(**bad)
    with pytest.raises(ConfigError, match="scale"):
        O.Target.rows(0, (1,), scale=0.0)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())
    assert H.active_hook_count(tiny_model) == 0


@pytest.mark.parametrize("module", ["W_Q", "W_K", "W_V", "W_O"])
def test_head_attributions_are_complete_and_kne_edits_only_the_heads(tiny_model, module):
    """Sec. 4.3's attention modules: per-head IG of gates on the module's slices sums to P(answer)
    minus P with the projection zeroed (completeness, Riemann error shrinking with m); the edit
    touches only the ensemble heads' slices, scaled by alpha / sqrt(n), and undoes exactly."""
    from kn_lens.edit.kne import head_attributions, n_heads_of
    from kn_lens.evaluate.scoring import score

    r = _request()
    (q,) = rewrite_queries(tiny_model, r, target=r.fact.object, all_prompts=False)
    hook = {"W_Q": "hook_q", "W_K": "hook_k", "W_V": "hook_v", "W_O": "hook_z"}[module]
    zero = [(f"blocks.{l}.attn.{hook}", lambda act, hook: act * 0)
            for l in range(tiny_model.cfg.n_layers)]  # the tiny models' projections: no bias
    p_full = sum(math.exp(x) for x in score(tiny_model, [q])[0].token_logprobs)
    p_zero = sum(math.exp(x) for x in score(tiny_model, [q], fwd_hooks=zero)[0].token_logprobs)
    errs = []
    for m in (4, 512):
        a = head_attributions(tiny_model, q, module, steps=m)
        assert a.shape == (tiny_model.cfg.n_layers, n_heads_of(tiny_model, module))
        errs.append(abs(float(a.sum()) - (p_full - p_zero)))
    assert errs[1] < errs[0] and errs[1] < 0.03 * abs(p_full - p_zero) + 1e-6
    snap = _snapshot(tiny_model)
    cfg = KNEConfig(**{**CFG.__dict__, "module": module, "head_quantile": 0.5, "alpha": 2.0})
    e = edit(tiny_model, [r], method="kne", config=cfg, seed=0)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())
    heads = NeuronSet(tuple(n) for n in e.config["details"]["neurons"])
    assert heads == locate_ensemble(tiny_model, [r], config=cfg) and len(heads)
    counts = heads.layers()
    for layer, s in e.config["details"]["scales"].items():
        assert s == pytest.approx(2.0 / math.sqrt(counts[int(layer)]))
    with e.applied(tiny_model):
        after = _snapshot(tiny_model)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())  # undo exact
    changed = set()
    for k, v in after.items():
        diff = (v != snap[k])
        if diff.any():
            assert ".attn." in k and k.split(".")[-1].lstrip("_") == module, k
            layer = int(k.split(".")[1])
            changed |= {(layer, int(h)) for h in diff.reshape(diff.shape[0], -1).any(1).nonzero()}
    assert changed and changed <= {(n.layer, n.index) for n in heads}
    with pytest.raises(ConfigError, match="heads outside"):
        edit(tiny_model, [r], method="kne", config=cfg, neurons=NeuronSet([Neuron(0, 99)]))

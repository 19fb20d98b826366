"""The editing engine on tiny random models: low-rank / dense deltas, the shared optimisation
loop, the editor registry (FT-L, ROME, MEMIT, KN erasure / update) and their guarantees."""
from dataclasses import replace

import pytest
import torch

from kn_lens import hooks as H
from kn_lens.edit import (Edit, LowRankDelta, available_editors, compose, dense, edit,
                          editor_version, low_rank, w_out_rows)
from kn_lens.edit import optimise as O
from kn_lens.edit.baselines.ft_l import FTLConfig
from kn_lens.edit.baselines.memit import MEMITConfig
from kn_lens.edit.baselines.rome import ROMEConfig, compute_rome
from kn_lens.edit.baselines.stats import second_moment
from kn_lens.edit.kn import KNEditorConfig
from kn_lens.edit.requests import context_prefixes, essence_queries, rewrite_queries, sites
from kn_lens.errors import ConfigError, DataFileError, InvalidFactError, NumericalError, TokenizationError
from kn_lens.evaluate.scoring import score
from kn_lens.facts import EditRequest, Fact, LabelledPrompt
from kn_lens.models import model_info
from kn_lens.neurons import NeuronSet

STATS = 3000  # second-moment tokens on tiny models (the default is 100,000)


def _reference_available():
    from kn_lens.evaluate import reference_text

    try:
        reference_text()
    except DataFileError:
        return False
    return True


needs_prose = pytest.mark.skipif(not _reference_available(),
                                 reason="reference prose not installed (scripts/setup.sh)")


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    now = model.state_dict()
    return all(torch.equal(v, now[k]) for k, v in snap.items())


def _three_forwards(model, e, shape, seed):
    """Logits of random tokens: unedited, with the edit's hooks, with the edit materialised."""
    toks = torch.randint(0, model.cfg.d_vocab, shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        base = model(toks)
        with model.hooks(fwd_hooks=e.hooks(model)):
            hooked = model(toks)
        with e.applied(model):
            mat = model(toks)
    return base, hooked, mat


def _request(subject="France", old="Paris", new="Rome", prompt="The capital of France is"):
    f = Fact(subject, "capital", old, ("the French Republic",) if subject == "France" else ())
    return EditRequest(
        f, new, (prompt,), paraphrase_prompts=(f"{subject} has the capital",),
        neighbourhood=(LabelledPrompt("The capital of Italy is", "Rome", Fact("Italy", "capital", "Rome")),),
        relation_specificity=(LabelledPrompt(f"The currency of {subject} is the", "euro",
                                             Fact(subject, "currency", "euro")),),
        alias_prompts=(prompt.replace(subject, "the French Republic"),) if subject == "France" else (),
        prefixes=("Yesterday, the dog stood. ", "The old house was quiet. "))


CONFIGS = {
    "ft_l": FTLConfig(steps=3),
    "rome": ROMEConfig(v_steps=3, stats_tokens=STATS),
    "memit": MEMITConfig(v_steps=3, stats_tokens=STATS),
    "kn_erase": KNEditorConfig(locator="contribution"),
    "kn_update": KNEditorConfig(locator="contribution"),
}


# --------------------------------------------------------------------------- deltas


def _lowrank_edit(model, seed=0, kinds=("W_out", "W_in")):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    deltas = []
    for k in kinds:
        rows, cols = (cfg.d_mlp, cfg.d_model) if k == "W_out" else (cfg.d_model, cfg.d_mlp)
        deltas.append(low_rank(1, k, torch.randn(rows, 2, generator=g), torch.randn(cols, 2, generator=g)))
    if cfg.gated_mlp:
        deltas.append(low_rank(2, "W_gate", torch.randn(cfg.d_model, 1, generator=g),
                               torch.randn(cfg.d_mlp, 1, generator=g)))
    deltas.append(dense(0, "W_out", torch.randn(cfg.d_mlp, cfg.d_model, generator=g) * 0.1))
    return Edit(tuple(deltas), "low-rank + dense", "test", model_info(model))


def test_low_rank_and_dense_hooks_equal_materialised_and_undo_exact(tiny_model):
    edit_ = _lowrank_edit(tiny_model)
    snap = _snapshot(tiny_model)
    with edit_.applied(tiny_model):
        assert not _same(tiny_model, snap)
    base, hooked, mat = _three_forwards(tiny_model, edit_, (2, 9), 1)
    assert (hooked - base).abs().max() > 1e-2
    torch.testing.assert_close(hooked, mat, atol=5e-5, rtol=1e-5)
    assert _same(tiny_model, snap) and H.active_hook_count(tiny_model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with edit_.applied(tiny_model):
            raise RuntimeError("boom")
    assert _same(tiny_model, snap)


def test_low_rank_post_norm_model():
    from kn_lens.testing import _build

    model = _build(dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=48, act_fn="gelu",
                        gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary",
                        rotary_dim=8, use_normalization_before_and_after=True), 0, "tiny-post", True)
    e = Edit((low_rank(1, "W_out", torch.randn(48, 1), torch.randn(32, 1)),))
    toks = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with model.hooks(fwd_hooks=e.hooks(model)):
            hooked = model(toks)
        with e.applied(model):
            mat = model(toks)
    torch.testing.assert_close(hooked, mat, atol=5e-5, rtol=1e-5)


def test_low_rank_save_load_compose(tiny_model, tmp_path):
    a = _lowrank_edit(tiny_model, 0)
    b = _lowrank_edit(tiny_model, 1)
    a.save(tmp_path / "a")
    back = Edit.load(tmp_path / "a")
    assert [type(d) for d in back.deltas] == [type(d) for d in a.deltas]
    assert back.n_params == a.n_params and back.n_stored == a.n_stored
    toks = torch.randint(0, tiny_model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with a.applied(tiny_model):
            ya = tiny_model(toks)
        with back.applied(tiny_model):
            yb = tiny_model(toks)
        assert torch.equal(ya, yb)
        c = a + b
        lr = [d for d in c.deltas if isinstance(d, LowRankDelta) and d.kind == "W_out"][0]
        assert lr.rank == 4  # factors concatenated: ranks add
        with c.applied(tiny_model):
            both = tiny_model(toks)
        with a.applied(tiny_model), b.applied(tiny_model):
            nested = tiny_model(toks)
        with tiny_model.hooks(fwd_hooks=c.hooks(tiny_model)):
            hooked = tiny_model(toks)
    torch.testing.assert_close(both, nested, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(both, hooked, atol=5e-5, rtol=1e-5)
    assert c.layers == (0, 1, 2) if tiny_model.cfg.gated_mlp else c.layers == (0, 1)


def test_low_rank_rejects_bad_shapes(gpt2_tiny):
    with pytest.raises(ConfigError, match="MLP"):
        LowRankDelta("blocks.0.attn.W_Q", torch.ones(3, 1), torch.ones(3, 1))
    with pytest.raises(ConfigError):
        Edit((low_rank(0, "W_out", torch.ones(5, 1), torch.ones(gpt2_tiny.cfg.d_model, 1)),)).check(gpt2_tiny)
    with pytest.raises(NumericalError):
        low_rank(0, "W_out", torch.full((3, 1), float("nan")), torch.ones(3, 1))


# --------------------------------------------------------------------------- the loop


def _nll_setup(model):
    req = _request()
    qs = rewrite_queries(model, req, prefixes=context_prefixes(req, None))
    return req, qs


def test_nll_term_is_teacher_forced_per_token(tiny_model):
    req = _request(new="Guido van Rossum")  # a multi-token object
    qs = rewrite_queries(tiny_model, req)
    assert qs[0].n_answer > 1
    term = O.NLL(qs)
    from kn_lens.evaluate.scoring import answer_logits

    with torch.no_grad():
        got = term.per_query(answer_logits(tiny_model, qs))
    (s,) = score(tiny_model, qs)
    assert abs(float(got[0]) - s.mean_nll) < 1e-5  # each token at its own position


def test_zero_steps_give_zero_delta_and_gradients_reach_only_the_mask(tiny_model):
    _, qs = _nll_setup(tiny_model)
    snap = _snapshot(tiny_model)
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    res0 = O.optimise(tiny_model, [O.Target.rows(1, [3, 7])], [O.NLL(qs)],
                      config=O.OptimConfig(steps=0))
    assert torch.count_nonzero(res0.values[0]) == 0 and res0.steps == 0
    res = O.optimise(tiny_model, [O.Target.rows(1, [3, 7])], [O.NLL(qs)],
                     config=O.OptimConfig(steps=4, lr=1e-2))
    assert res.values[0].shape == (2, tiny_model.cfg.d_model) and torch.count_nonzero(res.values[0])
    assert res.history[-1]["nll"] < res.history[0]["nll"]
    assert all(p.grad is None for p in tiny_model.parameters())  # nothing reached the model
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags
    assert _same(tiny_model, snap) and H.active_hook_count(tiny_model) == 0
    # W_in columns of a gated MLP's gate, and attention heads, are maskable too
    kinds = ["W_in", "W_Q", "W_O"] + (["W_gate"] if tiny_model.cfg.gated_mlp else [])
    for kind in kinds:
        r = O.optimise(tiny_model, [O.Target.rows(0, [1], kind)], [O.NLL(qs)],
                       config=O.OptimConfig(steps=2, lr=1e-2))
        assert torch.count_nonzero(r.values[0]) > 0, kind


def test_linf_and_norm_clamps(tiny_model):
    _, qs = _nll_setup(tiny_model)
    r = O.optimise(tiny_model, [O.Target.matrix(1)], [O.NLL(qs)],
                   config=O.OptimConfig(steps=5, lr=1.0, linf=1e-3))
    assert float(r.values[0].abs().max()) <= 1e-3 + 1e-9
    sites_ = sites(tiny_model, qs)
    r = O.optimise(tiny_model, [O.Target.activation(1, norm_ref=[2.0])], [O.NLL(qs, sites=sites_)],
                   config=O.OptimConfig(steps=5, lr=5.0, max_norm=0.5))
    assert float(r.values[0].norm()) <= 1.0 + 1e-5


def test_frozen_prefix_fast_path_is_exact(tiny_model):
    _check_frozen_prefix(tiny_model)


@pytest.mark.parametrize("arch", ["gemma3", "neox"])
def test_frozen_prefix_fast_path_other_blocks(arch):
    """Gemma-3-style blocks (q/k norms, sliding windows, soft-caps; rotary keys taken after the
    q/k norm) and GPT-NeoX-style parallel blocks take the frozen-prefix path, exactly."""
    from kn_lens import testing

    _check_frozen_prefix({"gemma3": testing.tiny_gemma3, "neox": testing.tiny_neox}[arch]())


def _check_frozen_prefix(tiny_model):
    req, qs = _nll_setup(tiny_model)
    s = sites(tiny_model, qs)
    eq = essence_queries(tiny_model, req)
    es = sites(tiny_model, eq)

    def terms():
        return [O.NLL(qs, sites=s), O.KL([O.Example(tuple(q.prompt_ids), (p,), 0, p)
                                          for q, p in zip(eq, es)], weight=0.3)]
    for site in ("mlp_out", "resid_post"):
        cfg = O.OptimConfig(steps=4, lr=0.3, norm_decay=0.5, max_norm=4.0)
        t = O.Target.activation(1, site, norm_ref=[3.0])
        fast = O.optimise(tiny_model, [t], terms(), config=cfg, fast_prefix=True)
        slow = O.optimise(tiny_model, [t], terms(), config=cfg, fast_prefix=False)
        assert fast.extras["frozen_prefix"] and not slow.extras["frozen_prefix"]
        torch.testing.assert_close(fast.values[0], slow.values[0], atol=1e-4, rtol=1e-4)
        for a, b in zip(fast.history, slow.history):
            assert abs(a["loss"] - b["loss"]) < 1e-4


def test_weight_deltas_share_rows_of_prefix_examples(tiny_model, monkeypatch):
    """FiNE's NLL, KL and repetition rows are prefixes of one another: with weight deltas they
    are read from one forward row each request, and the training is the same as with a row per
    example (the causal model's logits at a position see only the tokens up to it)."""
    _, qs = _nll_setup(tiny_model)

    def terms():
        return [O.NLL(qs), O.KL(O.kl_examples(qs, positions="prompt")),
                O.RepetitionPenalty(qs, weight=0.5)]
    cfg = O.OptimConfig(steps=4, lr=0.05)
    targets = [O.Target.rows(1, [2, 5]), O.Target.rows(0, [1], "W_in")]
    widths = []
    hook = ("hook_embed", lambda act, hook: widths.append(act.shape[0]))
    with tiny_model.hooks(fwd_hooks=[hook]):
        shared = O.optimise(tiny_model, targets, terms(), config=cfg)
    n_examples = sum(len(t.examples) for t in terms())
    assert max(widths) == len({q.prompt for q in qs}) < n_examples

    class Unshared(O._SharedRows):  # one row per example, the previous behaviour
        def __init__(self, examples):
            self.ids = [e.ids for e in examples]
            self.positions = [list(e.positions) for e in examples]
            self.owner = list(range(len(examples)))
            self.index = [torch.arange(len(e.positions)) for e in examples]
    monkeypatch.setattr(O, "_SharedRows", Unshared)
    plain = O.optimise(tiny_model, targets, terms(), config=cfg)
    for a, b in zip(shared.values, plain.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(shared.history, plain.history):
        assert abs(a["loss"] - b["loss"]) < 1e-5


class _Boom(O.LossTerm):
    name = "boom"

    def __init__(self, inner, at, value=None):
        self.inner, self.at, self.value, self.calls = inner, at, value, 0
        self.examples = inner.examples

    def loss(self, logits):
        self.calls += 1
        if self.calls > self.at:
            if self.value is None:
                raise RuntimeError("injected failure")
            return self.inner.loss(logits) * self.value
        return self.inner.loss(logits)


def test_exception_mid_loop_leaves_no_hooks_and_no_change(tiny_model):
    _, qs = _nll_setup(tiny_model)
    snap = _snapshot(tiny_model)
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    with pytest.raises(RuntimeError, match="injected"):
        O.optimise(tiny_model, [O.Target.rows(1, [2])], [_Boom(O.NLL(qs), at=2)],
                   config=O.OptimConfig(steps=5))
    assert H.active_hook_count(tiny_model) == 0 and _same(tiny_model, snap)
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags
    with pytest.raises(NumericalError, match="loss"):
        O.optimise(tiny_model, [O.Target.rows(1, [2])], [_Boom(O.NLL(qs), at=1, value=float("nan"))],
                   config=O.OptimConfig(steps=5))
    assert H.active_hook_count(tiny_model) == 0 and _same(tiny_model, snap)


def test_repetition_penalty_and_kl_terms(tiny_model):
    _, qs = _nll_setup(tiny_model)
    kl = O.KL(O.kl_examples(qs, positions="prompt"))
    rep = O.RepetitionPenalty(qs[:1])
    res = O.optimise(tiny_model, [O.Target.rows(2, [0, 1])], [O.NLL(qs), kl, rep],
                     config=O.OptimConfig(steps=1))
    first = res.history[0]
    assert abs(first["kl"]) < 1e-6  # zero delta: the edited model is the reference
    assert first["repetition"] > 0


def test_optimise_bad_config():
    with pytest.raises(ConfigError):
        O.OptimConfig(steps=-1)
    with pytest.raises(ConfigError):
        O.OptimConfig(stop_prob=1.5)
    with pytest.raises(ConfigError):
        O.Target("weight", "not.a.param")
    with pytest.raises(ConfigError):
        O.KL([], weight=1.0)


# --------------------------------------------------------------------------- editors


def test_registry_lists_editors_with_versions():
    names = available_editors()
    assert {"ft_l", "rome", "memit", "kn_erase", "kn_update"} <= set(names)
    assert all(editor_version(n) >= 1 for n in names)
    with pytest.raises(ConfigError, match="unknown editing method"):
        editor_version("nope")


@needs_prose
@pytest.mark.parametrize("method", ["ft_l", "rome", "memit", "kn_erase", "kn_update"])
def test_every_editor_returns_an_edit_and_leaves_the_model(tiny_model, method):
    snap = _snapshot(tiny_model)
    reqs = [_request(), _request("Germany", "Berlin", "Madrid", "The capital of Germany is")]
    e = edit(tiny_model, reqs, method=method, config=CONFIGS[method], seed=3)
    assert isinstance(e, Edit) and e.method == method and len(e.deltas) > 0
    assert e.config["editor"] == method and e.config["seed"] == 3
    assert _same(tiny_model, snap) and H.active_hook_count(tiny_model) == 0
    e2 = edit(tiny_model, reqs, method=method, config=CONFIGS[method], seed=3)
    for a, b in zip(e.deltas, e2.deltas):  # same seed -> identical deltas
        if isinstance(a, LowRankDelta):
            assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
        else:
            assert torch.equal(a.values, b.values) and torch.equal(a.index, b.index)
    _, hooked, mat = _three_forwards(tiny_model, e, (1, 6), 4)
    torch.testing.assert_close(hooked, mat, atol=1e-4, rtol=1e-4)
    assert _same(tiny_model, snap)


@needs_prose
def test_rome_maps_k_star_to_v_star(tiny_model):
    req = _request()
    C = second_moment(tiny_model, 1, n_tokens=STATS)
    comp = compute_rome(tiny_model, req, config=ROMEConfig(v_steps=5, stats_tokens=STATS),
                        layer=1, C=C)
    assert float(comp.delta.norm()) > 0
    e = Edit((comp.low_rank(),), model=model_info(tiny_model))
    with e.applied(tiny_model):
        mlp = tiny_model.blocks[1].mlp
        out = comp.k_star @ mlp.W_out.detach() + mlp.b_out.detach()
    rel = float((out - comp.v_star).norm() / comp.v_star.norm())
    assert rel < 1e-4
    zero = compute_rome(tiny_model, req, config=ROMEConfig(v_steps=0, stats_tokens=STATS),
                        layer=1, C=C)
    assert torch.count_nonzero(zero.delta) == 0 and torch.count_nonzero(zero.low_rank().dense()) == 0


@needs_prose
def test_zero_steps_editors(tiny_model):
    e = edit(tiny_model, [_request()], method="ft_l", config=FTLConfig(steps=0))
    assert all(torch.count_nonzero(d.values) == 0 for d in e.deltas)
    e = edit(tiny_model, [_request()], method="memit",
             config=MEMITConfig(v_steps=0, stats_tokens=STATS, layers=(1, 2)))
    # z = h: nothing to write, so every layer's update is zero
    assert all(float(d.dense().abs().max()) < 1e-4 for d in e.deltas)


@needs_prose
def test_editor_errors_are_typed_and_leave_the_model(tiny_model, tmp_path, llama_tiny, gpt2_tiny):
    snap = _snapshot(tiny_model)
    bad_subject = EditRequest(Fact("Spain", "capital", "Madrid"), "Rome", ("The capital of France is",))
    with pytest.raises(InvalidFactError, match="does not occur"):
        edit(tiny_model, [bad_subject], method="rome")
    with pytest.raises(InvalidFactError):
        EditRequest(Fact("France", "capital", "Paris"), "", ("The capital of France is",))
    with pytest.raises(InvalidFactError, match="equals the old"):
        EditRequest(Fact("France", "capital", "Paris"), "Paris", ("The capital of France is",))
    with pytest.raises(ConfigError, match="unknown editing method"):
        edit(tiny_model, [_request()], method="nonsense")
    with pytest.raises(ConfigError, match="outside the model"):
        edit(tiny_model, [_request()], method="rome", config=ROMEConfig(layer=99, stats_tokens=STATS))
    with pytest.raises(ConfigError, match="outside the model"):
        edit(tiny_model, [_request()], method="ft_l", config=FTLConfig(layer=-1))
    with pytest.raises(ConfigError, match="takes a"):
        edit(tiny_model, [_request()], method="rome", config=FTLConfig())
    with pytest.raises(ConfigError, match="no edit requests"):
        edit(tiny_model, [], method="rome")
    assert _same(tiny_model, snap) and H.active_hook_count(tiny_model) == 0
    # a saved edit for another model is refused
    e = Edit((w_out_rows(0, [1], torch.ones(1, gpt2_tiny.cfg.d_model)),), model=model_info(gpt2_tiny))
    e.save(tmp_path / "e")
    with pytest.raises(ConfigError, match="another model"):
        Edit.load(tmp_path / "e").check(llama_tiny)


def test_untokenisable_object_is_a_typed_error(tiny_model, monkeypatch):
    import kn_lens.edit.requests as R

    real = R.encode_answer

    def fake(tok, text):
        if "\ufffd" in text:
            raise TokenizationError(f"answer {text!r} does not survive tokenisation")
        return real(tok, text)
    monkeypatch.setattr(R, "encode_answer", fake)
    with pytest.raises(TokenizationError, match="request 0"):
        R.check_requests(tiny_model, [_request(new="Ro\ufffdme")])


@needs_prose
def test_kn_editors_take_neuron_sets(tiny_model):
    kns = NeuronSet([(1, 2), (2, 5)])
    e = edit(tiny_model, [_request()], method="kn_erase", neurons=kns)
    assert e.touched_neurons() == kns
    e = edit(tiny_model, [_request()], method="kn_update", neurons=kns)
    assert e.touched_neurons() == kns
    with pytest.raises(ConfigError):
        edit(tiny_model, [_request()], method="rome", neurons=kns)


@needs_prose
def test_sequential_composition_equals_applying_in_order(tiny_model):
    r1, r2 = _request(), _request("Germany", "Berlin", "Madrid", "The capital of Germany is")
    cfg = ROMEConfig(v_steps=3, stats_tokens=STATS)
    e1 = edit(tiny_model, [r1], method="rome", config=cfg)
    with e1.applied(tiny_model):
        e2 = edit(tiny_model, [r2], method="rome", config=cfg)
    both = compose([e1, e2])
    batch = edit(tiny_model, [r1, r2], method="rome", config=cfg)  # ROME batches sequentially
    toks = torch.randint(0, tiny_model.cfg.d_vocab, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with both.applied(tiny_model):
            a = tiny_model(toks)
        with batch.applied(tiny_model):
            b = tiny_model(toks)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_prose
@pytest.mark.parametrize("method", ["ft_l", "rome", "memit"])
def test_baselines_on_post_norm_blocks(method):
    """Gemma-style blocks (a norm after the MLP): every baseline returns an Edit that leaves the
    model unchanged, hooks == materialised, and ROME's edited layer still maps k* to v* (v* is the
    MLP's raw output, before the post-MLP norm)."""
    from kn_lens.testing import tiny_gemma

    model = tiny_gemma()
    snap = _snapshot(model)
    cfg = {"ft_l": FTLConfig(steps=3, layer=1), "rome": ROMEConfig(v_steps=3, stats_tokens=STATS, layer=1),
           "memit": MEMITConfig(v_steps=3, stats_tokens=STATS, layers=(0, 1))}[method]
    reqs = [_request(), _request("Germany", "Berlin", "Madrid", "The capital of Germany is")]
    e = edit(model, reqs, method=method, config=cfg, seed=1)
    assert _same(model, snap) and H.active_hook_count(model) == 0
    assert any(float(d.dense().norm() if isinstance(d, LowRankDelta) else d.values.norm()) > 0
               for d in e.deltas)
    plain, hooked, mat = _three_forwards(model, e, (2, 7), 2)
    torch.testing.assert_close(hooked, mat, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, hooked)
    assert _same(model, snap)
    if method == "rome":
        comp = compute_rome(model, reqs[0], config=cfg, layer=1, C=second_moment(model, 1, n_tokens=STATS))
        with Edit((comp.low_rank(),), model=model_info(model)).applied(model):
            mlp = model.blocks[1].mlp
            out = comp.k_star @ mlp.W_out.detach()
        assert float((out - comp.v_star).norm() / comp.v_star.norm()) < 1e-4


@needs_prose
def test_second_moments_match_a_direct_computation_and_cache(tiny_model, tmp_path, monkeypatch):
    from kn_lens.edit.baselines import stats

    monkeypatch.setattr(stats, "_cache_file", lambda model, key: tmp_path / f"{key}.pt")
    monkeypatch.setattr(stats, "_MEMORY", {})
    rows = stats.stats_windows(tiny_model, 500, 32)
    bos = int(bool(tiny_model.cfg.default_prepend_bos))
    store = {}
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=[(H.mlp_post(1), lambda a, hook: store.__setitem__("k", a))]):
        tiny_model(rows)
    k = store["k"][:, bos:].reshape(-1, tiny_model.cfg.d_mlp).double()
    direct = (k.T @ k / k.shape[0]).float()
    fresh = stats.second_moments(tiny_model, [1], n_tokens=500, window=32, cache=False)[1]
    torch.testing.assert_close(fresh, direct, atol=1e-5, rtol=1e-5)
    assert torch.equal(fresh, fresh.T) and float(torch.linalg.eigvalsh(fresh.double()).min()) > -1e-6
    assert not list(tmp_path.rglob("*.pt"))  # cache=False stores nothing
    cached = stats.second_moments(tiny_model, [0, 1], n_tokens=500, window=32)
    assert len(list(tmp_path.rglob("*.pt"))) == 2 and torch.equal(cached[1], fresh)
    stats._MEMORY.clear()  # from disk now
    again = stats.second_moments(tiny_model, [1], n_tokens=500, window=32)[1]
    assert torch.equal(again, fresh)
    with pytest.raises(ConfigError):
        stats.second_moments(tiny_model, [tiny_model.cfg.n_layers])


@needs_prose
def test_memit_update_reaches_its_target_residual_pre_and_post_norm(llama_tiny):
    """One layer, bare prompt only, lambda ~ 0: the edited layer moves the residual to Z exactly on
    pre-norm blocks; with a norm after the MLP (Gemma) it reaches the nearest residual a
    normalised MLP output can produce (and without the pull-back through the norm it would not)."""
    from kn_lens.edit.baselines import _keys
    from kn_lens.edit.baselines import memit as M
    from kn_lens.testing import tiny_gemma

    cfg = MEMITConfig(v_steps=5, stats_tokens=STATS, layers=(1,), n_prefixes=0, mom2_update_weight=1e-8)
    req = _request()
    for model in (llama_tiny, tiny_gemma()):
        Z, H0, _ = M.compute_z(model, [req], config=cfg, layer=1)
        rq, rs, _, _ = M._request_queries(model, req, 0)
        e = edit(model, [req], method="memit", config=cfg)
        with e.applied(model):
            h = _keys.at_sites(model, rq[:1], rs[:1], [H.resid_post(1)])[H.resid_post(1)]
        err = float((Z - h).norm() / (Z - H0).norm())
        if not model.cfg.use_normalization_before_and_after:
            assert err < 1e-4
            continue
        k = _keys.keys(model, rq[:1], rs[:1], 1)
        m = _keys.mlp_output(model, k, 1)
        w = model.blocks[1].ln2_post.w.detach()

        def post(x):
            return x / (x.pow(2).mean(-1, keepdim=True) + model.blocks[1].ln2_post.eps).sqrt() * w

        best = (Z - H0) - (post(m + M.raw_output_change(model, 1, m, Z - H0)) - post(m))
        assert abs(err - float(best.norm() / (Z - H0).norm())) < 1e-4
        naive = (Z - H0) - (post(m + (Z - H0)) - post(m))  # R added to the raw output as is
        assert float(best.norm()) < float(naive.norm())


def test_length_buckets_are_optimal_and_exact(tiny_model, monkeypatch):
    """Rows of very different lengths (TNF-DA: prefixed rewrites and short augmentation prompts)
    run in length buckets: the grouping minimises padded tokens + overhead (checked against
    every split of the sorted rows), and training is the same as one padded batch."""
    import itertools

    for lengths in ([31, 34, 22, 23, 33, 11, 10, 10, 12, 14], [5, 5, 5], [3, 40, 41, 2], [7]):
        got = O._buckets(lengths, overhead=8)
        assert sorted(i for b in got for i in b) == list(range(len(lengths)))
        cost = sum(len(b) * max(lengths[i] for i in b) + 8 for b in got)
        srt = sorted(lengths, reverse=True)
        best = min(sum(len(srt[a:b]) * srt[a] + 8 for a, b in zip((0,) + c, c + (len(srt),)))
                   for k in range(len(srt)) for c in itertools.combinations(range(1, len(srt)), k))
        assert cost == best, lengths
    assert O._buckets([]) == []
    _, qs = _nll_setup(tiny_model)
    long_q = [q for q in qs]
    short = O.kl_examples(qs)
    padded = [O.Example(tuple(range(1, 40)), (38,))]  # one long row: the rest would be padding
    terms = lambda: [O.NLL(long_q), O.KL(short + padded)]  # noqa: E731
    cfg = O.OptimConfig(steps=3, lr=0.05)
    targets = [O.Target.rows(1, [2, 5]), O.Target.rows(0, [1], "W_in")]
    widths = []
    hook = ("hook_embed", lambda act, hook: widths.append(tuple(act.shape[:2])))
    with tiny_model.hooks(fwd_hooks=[hook]):
        bucketed = O.optimise(tiny_model, targets, terms(), config=cfg)
    assert len({w for w in widths}) > 1  # more than one batch shape
    monkeypatch.setattr(O, "_BUCKET_OVERHEAD", 10 ** 9)  # one padded batch
    widths.clear()
    with tiny_model.hooks(fwd_hooks=[hook]):
        one = O.optimise(tiny_model, targets, terms(), config=cfg)
    assert len(set(widths)) == 1
    for a, b in zip(bucketed.values, one.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(bucketed.history, one.history):
        assert abs(a["loss"] - b["loss"]) < 1e-5


def test_rows_over_the_graph_budget_train_in_chunks_with_the_same_gradient(tiny_model):
    """Rows above ``max_graph_tokens`` (a TNF-DA batch of 100 requests held ~70 GB of graph)
    run each step in chunks. With the editors' terms (each a mean over its examples) every
    chunk's forward is scored and back-propagated at once: one forward per row and step, as
    unchunked. A term that is not such a mean takes two passes: a no-grad pass for the loss and
    its gradient on the logits, then each chunk's forward + backward. Either way the training is
    the one-graph training (every term, including the KL on the prompt positions and the
    repetition penalty, and the L2 on the deltas), each forward holds at most the budget, and
    the model is left as it was."""
    _, qs = _nll_setup(tiny_model)

    class Squared(O.LossTerm):  # not a mean over examples: the square of the NLL term's mean
        name = "squared"

        def __init__(self):
            self.inner = O.NLL(qs)
            self.examples = self.inner.examples

        def loss(self, logits):
            return self.inner.loss(logits) ** 2

    def terms(extra=()):
        return [O.NLL(qs), O.KL(O.kl_examples(qs, positions="prompt")),
                O.RepetitionPenalty(qs, weight=0.5), *extra]
    targets = [O.Target.rows(1, [2, 5]), O.Target.rows(0, [1], "W_in")]
    snap = _snapshot(tiny_model)
    blocks = tiny_model.cfg.n_layers  # targets from block 0: every block runs
    budget = 12 * blocks  # at most 12 padded tokens per forward
    for extra, passes in (((), 1), ((Squared(),), 2)):
        cfg = O.OptimConfig(steps=4, lr=0.05, l2=0.1)
        one = O.optimise(tiny_model, targets, terms(extra), config=cfg)
        assert one.extras["chunks"] == 0
        shapes, seq = [], []  # (rows, width) of each forward with a graph; g / n in order

        def record(act, hook):
            seq.append("g" if torch.is_grad_enabled() else "n")
            if torch.is_grad_enabled():
                shapes.append(tuple(act.shape[:2]))
        with tiny_model.hooks(fwd_hooks=[("hook_embed", record)]):
            chunked = O.optimise(tiny_model, targets, terms(extra), config=replace(
                cfg, max_graph_tokens=budget))
        n = chunked.extras["chunks"]
        assert n > 1 and len(shapes) == n * 4 and chunked.extras["passes"] == passes
        # the KL's reference logits (no graph), then per step each chunk's forward with a
        # graph, preceded by a no-grad forward of every chunk only in two passes
        ref = len("".join(seq).split("g")[0]) - (n if passes == 2 else 0)
        assert "".join(seq) == "n" * ref + ("n" * n * (passes - 1) + "g" * n) * 4
        assert all(n_ * w <= 12 or n_ == 1 for n_, w in shapes)  # a longer row runs alone
        assert chunked.steps == one.steps and chunked.stopped == one.stopped
        for a, b in zip(chunked.values, one.values):
            assert a.abs().max() > 0
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        for a, b in zip(chunked.history, one.history):
            assert a.keys() == b.keys()
            for k in a:
                # float32 sums in another order: a loss near 60 has an ulp of 3.8e-6, so a few
                # ulps of summation-order difference exceed abs 1e-5 (seen: 1.1e-5 on a fresh
                # machine); rel 1e-6 is ~16 ulps, abs 1e-5 still bounds the small terms
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-5), k
        assert _same(tiny_model, snap) and H.active_hook_count(tiny_model) == 0
    with pytest.raises(ConfigError, match="max_graph_tokens"):
        O.OptimConfig(max_graph_tokens=0)


def test_a_killed_optimisation_resumes_from_its_saved_state(tiny_model, tmp_path):
    """Inside ``resumable`` a run saves its state (here after every step); the same call after
    a kill continues from the last save, makes only the missing steps and returns what an
    uninterrupted run returns; the state file goes once the run completes. A call with other
    inputs does not pick it up."""
    _, qs = _nll_setup(tiny_model)
    targets = [O.Target.rows(1, [2, 5]), O.Target.rows(0, [1], "W_in")]
    cfg = O.OptimConfig(steps=6, lr=0.05)
    full = O.optimise(tiny_model, targets, [_Boom(O.NLL(qs), at=10 ** 9)], config=cfg)
    snap = _snapshot(tiny_model)
    with O.resumable(tmp_path, every_s=1e-9):
        with pytest.raises(RuntimeError, match="injected failure"):  # killed in step 4
            O.optimise(tiny_model, targets, [_Boom(O.NLL(qs), at=4)], config=cfg)
        [state_file] = tmp_path.glob("*.pt")
        assert torch.load(state_file, weights_only=False)["step"] == 4
        other = _Boom(O.NLL(qs), at=10 ** 9)  # another lr: a different run, from step 0
        O.optimise(tiny_model, targets, [other], config=O.OptimConfig(steps=2, lr=0.01))
        assert other.calls == 2 and list(tmp_path.glob("*.pt")) == [state_file]
        boom = _Boom(O.NLL(qs), at=10 ** 9)
        resumed = O.optimise(tiny_model, targets, [boom], config=cfg)
    assert boom.calls == 2  # steps 4 and 5 only
    assert resumed.steps == full.steps == 6 and resumed.stopped == full.stopped
    for a, b in zip(resumed.values, full.values):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert [h["step"] for h in resumed.history] == list(range(6))
    for a, b in zip(resumed.history, full.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert not list(tmp_path.glob("*.pt")) and _same(tiny_model, snap)
    with pytest.raises(ConfigError, match="every_s"):
        with O.resumable(tmp_path, every_s=0):
            pass


def test_a_long_benchmark_edit_killed_while_judged_is_not_made_again(tiny_model, tmp_path,
                                                                    monkeypatch):
    """A sweep's benchmark item (edit + judgement) runs inside ``resumable``: an edit that took
    longer than the save interval is kept in the item's folder until its judgement is done, so
    a kill during the judgement costs the judgement only. The resumed item returns the rows an
    uninterrupted item returns (and the first edit's seconds), and leaves the folder empty."""
    import kn_lens.edit as E
    import kn_lens.evaluate.harness as HS
    from kn_lens.edit.benchmark import benchmark_item, run_benchmark_edit
    from kn_lens.evaluate.probes import ProbeSet

    cfg = HS.HarnessConfig(protocols=("counterfact", "tokens"), n_bootstrap=0)
    req = _request()
    ps = ProbeSet.from_request(tiny_model, req, n_prefix_probes=1, seed=0)
    before = HS.measure(tiny_model, [ps], config=cfg)
    item = benchmark_item(tiny_model, [req], [ps], before, method="ft_l",
                          config=FTLConfig(steps=3), harness=cfg)
    full = run_benchmark_edit(tiny_model, item)  # outside a sweep: nothing kept
    assert not list(tmp_path.iterdir())
    judge = HS.judge

    def killed(*a, **k):
        raise RuntimeError("killed while judging")
    folder = tmp_path / item.key
    with O.resumable(folder, every_s=1e-9):
        monkeypatch.setattr(HS, "judge", killed)
        with pytest.raises(RuntimeError, match="killed while judging"):
            run_benchmark_edit(tiny_model, item)
        assert (folder / "finished_edit.kept.pt").exists()
        took = torch.load(folder / "finished_edit.kept.pt", weights_only=False)[1]
        monkeypatch.setattr(HS, "judge", judge)
        made = []
        monkeypatch.setattr(E, "edit", lambda *a, **k: made.append(1) or 1 / 0)
        resumed = run_benchmark_edit(tiny_model, item)
    assert not made and not list(folder.iterdir())
    assert [r["row"] for r in resumed] == [r["row"] for r in full]
    assert resumed[0]["n_params"] == full[0]["n_params"] > 0 and resumed[0]["seconds"] == took
    assert H.active_hook_count(tiny_model) == 0


def test_a_resumed_item_counts_the_seconds_its_killed_runs_spent(tiny_model, tmp_path):
    """Each save inside ``resumable`` records the seconds spent on the item so far; the next
    run of a killed item starts from them (``earlier_seconds``), a benchmark item adds them to
    its edit's seconds (a batch edit resumed after a kill reports what it cost in all, not its
    last part), and the record goes once the item completes."""
    import json
    import time

    import kn_lens.evaluate.harness as HS
    from kn_lens.edit.benchmark import benchmark_item, run_benchmark_edit
    from kn_lens.evaluate.probes import ProbeSet

    _, qs = _nll_setup(tiny_model)
    targets = [O.Target.rows(1, [2, 5])]
    cfg = O.OptimConfig(steps=6, lr=0.05)
    assert O.earlier_seconds() == 0.0
    with pytest.raises(RuntimeError, match="injected failure"):  # a killed run
        with O.resumable(tmp_path, every_s=1e-9):
            assert O.earlier_seconds() == 0.0
            time.sleep(0.05)
            O.optimise(tiny_model, targets, [_Boom(O.NLL(qs), at=4)], config=cfg)
    spent = json.loads((tmp_path / "seconds.json").read_text())
    assert spent >= 0.05
    with O.resumable(tmp_path, every_s=1e-9):  # its next run
        assert O.earlier_seconds() == spent
        boom = _Boom(O.NLL(qs), at=10 ** 9)
        O.optimise(tiny_model, targets, [boom], config=cfg)
        assert boom.calls == 2 and json.loads((tmp_path / "seconds.json").read_text()) > spent
    assert not list(tmp_path.iterdir()) and O.earlier_seconds() == 0.0

    hcfg = HS.HarnessConfig(protocols=("counterfact", "tokens"), n_bootstrap=0)
    req = _request()
    ps = ProbeSet.from_request(tiny_model, req, n_prefix_probes=1, seed=0)
    item = benchmark_item(tiny_model, [req], [ps], HS.measure(tiny_model, [ps], config=hcfg),
                          method="ft_l", config=FTLConfig(steps=3), harness=hcfg)
    alone = run_benchmark_edit(tiny_model, item)[0]["seconds"]
    folder = tmp_path / item.key
    folder.mkdir()
    (folder / "seconds.json").write_text("1000.0")  # as a killed run of 1,000 s leaves it
    with O.resumable(folder):
        resumed = run_benchmark_edit(tiny_model, item)
    assert 1000.0 < resumed[0]["seconds"] < 1000.0 + 20 * alone + 5
    assert not list(folder.iterdir()) and H.active_hook_count(tiny_model) == 0

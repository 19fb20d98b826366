"""QL A.5 metrics, dPPL and the reference text."""
import math
from pathlib import Path

import pytest
import torch

from kn_lens import hooks as H
from kn_lens.edit import Edit, erase, update, w_out_rows
from kn_lens.errors import ConfigError, DataFileError
from kn_lens.evaluate import (evaluate_edit, perplexity, reference_slices, reference_text,
                              relative_ppl_change, retarget)
from kn_lens.evaluate import reference as ref_mod
from kn_lens.facts import Fact, make_query, predict
from kn_lens.neurons import NeuronSet


def _queries(model):
    f = Fact("France", "capital", "Paris")
    edited = [make_query(model, f, "The capital of {} is")]
    neighbours = [make_query(model, f, "The capital city of {} is"),
                  make_query(model, f, "{}'s capital is")]
    others = [make_query(model, Fact(s, "capital", o), "The capital of {} is")
              for s, o in [("Germany", "Berlin"), ("Japan", "Tokyo"), ("Italy", "Rome")]]
    return edited, neighbours, others


def _stream(model, n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n,), generator=g)


def _snap(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_noop_edit_scores(tiny_model):
    """An empty edit: locality 1, dPPL 0, erasure reliability = 1 - accuracy before."""
    edited, nb, oos = _queries(tiny_model)
    ref = reference_slices(tiny_model, 3, 16, 0, tokens=_stream(tiny_model))
    r = evaluate_edit(tiny_model, Edit(()), edited=edited, generalisation=nb, locality=oos,
                      reference=ref)
    assert r.locality == 1.0 and r.dppl == 0.0
    assert r.reliability == pytest.approx(1 - r.edited[0].accuracy_before)
    assert all(o.p_before == o.p_after for o in r.edited + r.neighbours + r.out_of_scope)
    assert r.average == pytest.approx((r.reliability + r.generalisation + r.locality) / 3)


def test_metric_definitions_against_predict(gpt2_tiny):
    """Erasure metrics recomputed by hand from predict() under the edit."""
    model = gpt2_tiny
    edited, nb, oos = _queries(model)
    g = torch.Generator().manual_seed(3)
    edit = Edit(tuple(w_out_rows(layer, list(range(0, 64, 3)), 3 * torch.randn(22, model.cfg.d_model, generator=g))
                      for layer in range(model.cfg.n_layers)), "big random edit")
    before = predict(model, oos)
    with edit.applied(model):
        after_e, after_n, after_o = predict(model, edited), predict(model, nb), predict(model, oos)
    r = evaluate_edit(model, edit, edited=edited, generalisation=nb, locality=oos)

    def first_token_acc(preds):  # single-token answers would make this A.5's indicator exactly
        return [float(p.answer_first_rank == 0) for p in preds]

    for o, p, q in zip(r.edited + r.neighbours, after_e + after_n, edited + nb):
        assert o.p_after == pytest.approx(p.answer_prob, rel=1e-4, abs=1e-7)
        assert o.top1_after == p.top_tokens[0]
        if q.n_answer == 1:
            assert o.accuracy_after == first_token_acc([p])[0]
    checked = 0
    for o, b, a, q in zip(r.out_of_scope, before, after_o, oos):
        if q.n_answer == 1:  # unchanged = 1{argmax after == argmax before}
            assert o.unchanged == float(b.top_tokens[0] == a.top_tokens[0])
            checked += 1
    assert checked >= 1
    assert r.locality < 1.0 or r.reliability > 0.0  # the edit did something measurable
    assert r.reliability == pytest.approx(1 - sum(o.accuracy_after for o in r.edited) / len(r.edited))
    assert r.locality == pytest.approx(sum(o.unchanged for o in r.out_of_scope) / len(oos))
    assert r.applied_via == "hooks"


@pytest.mark.parametrize("how", ["hooks", "materialise"])
def test_evaluate_leaves_no_trace(tiny_model, how):
    edited, nb, oos = _queries(tiny_model)
    snap = _snap(tiny_model)
    edit = erase(tiny_model, NeuronSet([(1, 1), (2, 2)]))
    ref = reference_slices(tiny_model, 2, 16, 0, tokens=_stream(tiny_model))
    r = evaluate_edit(tiny_model, edit, edited=edited, generalisation=nb, locality=oos,
                      reference=ref, how=how)
    assert r.applied_via == how and r.dppl is not None and math.isfinite(r.dppl)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())
    assert H.active_hook_count(tiny_model) == 0


def test_hooks_and_materialise_agree(gpt2_tiny):
    edited, nb, oos = _queries(gpt2_tiny)
    edit = update(gpt2_tiny, NeuronSet([(0, 1), (1, 4), (2, 8)]), edited[0], "Berlin")
    tgt = [retarget(gpt2_tiny, q, "Berlin") for q in edited]
    ref = reference_slices(gpt2_tiny, 2, 16, 0, tokens=_stream(gpt2_tiny))
    a = evaluate_edit(gpt2_tiny, edit, edited=tgt, locality=oos, mode="update", reference=ref, how="hooks")
    b = evaluate_edit(gpt2_tiny, edit, edited=tgt, locality=oos, mode="update", reference=ref,
                      how="materialise")
    assert math.isnan(a.generalisation) and a.mode == "update"
    assert a.reliability == b.reliability and a.locality == b.locality
    assert a.dppl == pytest.approx(b.dppl, abs=1e-4)
    for x, y in zip(a.edited, b.edited):
        assert x.p_after == pytest.approx(y.p_after, rel=1e-3, abs=1e-7)


def test_error_inside_evaluation_restores(gpt2_tiny, monkeypatch):
    import kn_lens.evaluate.metrics as metrics

    edited, _, _ = _queries(gpt2_tiny)
    snap = _snap(gpt2_tiny)
    edit = erase(gpt2_tiny, NeuronSet([(0, 0)]))
    real = metrics.perplexity

    def failing_after_edit(model, slices, fwd_hooks=None, **kw):
        if fwd_hooks or not all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items()):
            raise RuntimeError("boom while the edit is active")
        return real(model, slices, fwd_hooks=fwd_hooks, **kw)

    monkeypatch.setattr(metrics, "perplexity", failing_after_edit)
    ref = reference_slices(gpt2_tiny, 2, 16, 0, tokens=_stream(gpt2_tiny))
    for how in ("hooks", "materialise"):
        with pytest.raises(RuntimeError, match="boom"):
            evaluate_edit(gpt2_tiny, edit, edited=edited, reference=ref, how=how)
        assert all(torch.equal(v, gpt2_tiny.state_dict()[k]) for k, v in snap.items())
        assert H.active_hook_count(gpt2_tiny) == 0
    with pytest.raises(ConfigError):
        evaluate_edit(gpt2_tiny, edit, edited=[])
    with pytest.raises(ConfigError):
        evaluate_edit(gpt2_tiny, edit, edited=edited, mode="erase")


def test_retarget(gpt2_tiny):
    q = _queries(gpt2_tiny)[0][0]
    t = retarget(gpt2_tiny, q, "Berlin")
    assert t.prompt_ids == q.prompt_ids and t.answer == " Berlin" and t.fact.object == "Berlin"


def test_perplexity_and_slices(tiny_model):
    stream = _stream(tiny_model)
    s = reference_slices(tiny_model, 4, 16, 7, tokens=stream)
    assert s.shape == (4, 16)
    assert torch.equal(s, reference_slices(tiny_model, 4, 16, 7, tokens=stream))
    assert not torch.equal(s, reference_slices(tiny_model, 4, 16, 8, tokens=stream))
    if tiny_model.cfg.default_prepend_bos:
        assert (s[:, 0] == tiny_model.tokenizer.bos_token_id).all()
    ppl = perplexity(tiny_model, s)
    # equals exp of the mean cross-entropy computed directly
    with torch.no_grad():
        logits = tiny_model(s)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), s[:, 1:].flatten())
    assert ppl == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert relative_ppl_change(10.0, 12.0) == pytest.approx(0.2)
    with pytest.raises(DataFileError):
        reference_slices(tiny_model, 1000, 16, tokens=stream)
    with pytest.raises(ConfigError):
        reference_slices(tiny_model, 0, 16, tokens=stream)


def test_missing_reference_package_message(monkeypatch, tmp_path):
    if Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb").exists():
        pytest.skip("janeaustenr is installed system-wide")
    monkeypatch.setenv("KN_LENS_CACHE", str(tmp_path))
    monkeypatch.delenv(ref_mod.ENV, raising=False)
    with pytest.raises(DataFileError, match="apt-get download r-cran-janeaustenr=1.0.0-1"):
        ref_mod.package_dir()


def _have_reference() -> bool:
    try:
        ref_mod.package_dir()
        return True
    except DataFileError:
        return False


@pytest.mark.skipif(not _have_reference(), reason=ref_mod.INSTALL_HINT)
def test_reference_text_is_long_prose():
    text = reference_text()
    words = text.split()
    assert len(words) > 150_000
    assert text.startswith("By Jane Austen\n\nIt is a truth universally acknowledged")
    assert "Chapter 1" not in text[:200]
    for b in ref_mod.BOOKS:
        assert len(ref_mod.novel_lines(b)) > 5000


@pytest.mark.parametrize("how", ["hooks", "materialise"])
def test_prepared_reference_gives_the_same_dppl(gpt2_tiny, how):
    """A PreparedReference (cached PPL before + residuals, running only the edited blocks) gives
    the numbers of plain slices, for edits starting at a late layer, at layer 0, and on attention."""
    from kn_lens.edit import head_slices
    from kn_lens.evaluate import PreparedReference, prepare_reference

    model = gpt2_tiny
    edited, nb, oos = _queries(model)
    ref = reference_slices(model, 5, 16, 0, tokens=_stream(model))
    prep = prepare_reference(model, ref)
    assert isinstance(prep, PreparedReference) and prep.n_tokens == 5 * 15
    assert prep.ppl == pytest.approx(perplexity(model, ref), rel=1e-6)
    g = torch.Generator().manual_seed(1)
    L = model.cfg.n_layers
    edits = [erase(model, NeuronSet([(L - 1, 3), (L - 1, 7)])),
             Edit((w_out_rows(0, [1, 2], 2 * torch.randn(2, model.cfg.d_model, generator=g)),)),
             Edit((head_slices(1, "W_O", [0], torch.randn(1, model.cfg.d_head, model.cfg.d_model,
                                                            generator=g)),))]
    snap = _snap(model)
    for edit in edits:
        a = evaluate_edit(model, edit, edited=edited, locality=oos, reference=ref, how=how)
        b = evaluate_edit(model, edit, edited=edited, locality=oos, reference=prep, how=how)
        assert a.dppl != 0.0
        assert b.dppl == pytest.approx(a.dppl, rel=1e-4, abs=1e-6)
        assert b.ppl_before == prep.ppl and b.extras["reference_tokens_scored"] == 75
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())
    assert H.active_hook_count(model) == 0
    with pytest.raises(ConfigError, match="PreparedReference"):
        perplexity(model, ref, start_at_layer=1)

"""The one scorer, the probe sets and the three-protocol harness (tiny random models)."""
import json
import math

import pytest
import torch

from kn_lens import hooks as H
from kn_lens.edit import Edit, w_out_rows
from kn_lens.errors import ConfigError
from kn_lens.evaluate import generation as G
from kn_lens.evaluate.harness import (METRICS, HarnessConfig, RequestState, aggregate,
                                      edit_and_evaluate, evaluate, measure, request_metrics,
                                      sequential)
from kn_lens.evaluate.probes import ProbeSet
from kn_lens.evaluate.scoring import AnswerScore, score
from kn_lens.facts import EditRequest, Fact, LabelledPrompt, make_query
from kn_lens.models import model_info

CFG = HarnessConfig(max_new_tokens=6, n_bootstrap=20)


def _request(new="Rome"):
    f = Fact("France", "capital", "Paris", ("the French Republic",))
    return EditRequest(
        f, new, ("The capital of France is",), paraphrase_prompts=("France has the capital",
                                                                  "The capital city of France is"),
        neighbourhood=(LabelledPrompt("The capital of Italy is", "Rome", Fact("Italy", "capital", "Rome")),
                       LabelledPrompt("The capital of Spain is", "Madrid", Fact("Spain", "capital", "Madrid"))),
        relation_specificity=(LabelledPrompt("The currency of France is the", "euro",
                                             Fact("France", "currency", "euro")),),
        alias_prompts=("The capital of the French Republic is",),
        prefixes=("Yesterday, the dog stood. ", "The old house was quiet. "), case_id=7)


def test_scorer_matches_full_forward(tiny_model):
    f = Fact("France", "capital", "Guido van Rossum")
    qs = [make_query(tiny_model, f, "The capital of {} is"),
          make_query(tiny_model, Fact("Japan", "capital", "Tokyo"), "Everyone knows that the capital of {} is")]
    got = score(tiny_model, qs, top_k=3)
    for q, s in zip(qs, got):
        with torch.no_grad():
            logits = tiny_model(q.tokens())[0]
        lp = torch.log_softmax(logits.float(), -1)
        for j, (pos, a) in enumerate(zip(q.answer_positions, q.answer_ids)):
            assert abs(float(lp[pos, a]) - s.token_logprobs[j]) < 1e-4
            assert s.argmax[j] == int(lp[pos].argmax())
            assert s.ranks[j] == int((lp[pos] > lp[pos, a]).sum())
        assert s.top_ids[0] == s.argmax[0] and len(s.top_probs) == 3
        assert math.isclose(s.mean_nll, -sum(s.token_logprobs) / q.n_answer)
        assert s.exact == all(x == y for x, y in zip(s.argmax, q.answer_ids))


def test_scorer_shares_rows_of_identical_inputs(tiny_model):
    """True and new one-token objects of one prompt read the same forward row: one row is run,
    and every query gets exactly what scoring it alone gives."""
    one = []  # objects that are one token after the prompt
    for t in range(5, 5000):
        word = tiny_model.tokenizer.decode([t]).strip()
        if word.isalpha() and word not in one:
            q = make_query(tiny_model, Fact("France", "capital", word), "The capital of {} is")
            if q.n_answer == 1:
                one.append(word)
        if len(one) == 2:
            break
    qs = [make_query(tiny_model, Fact("France", "capital", w), "The capital of {} is")
          for w in one] + [make_query(tiny_model, Fact("Japan", "capital", "Tokyo"),
                                      "The capital of {} is")]
    assert qs[0].input_ids == qs[1].input_ids and qs[0].answer_ids != qs[1].answer_ids
    rows = []
    hook = ("hook_embed", lambda act, hook: rows.append(act.shape[0]))
    with tiny_model.hooks(fwd_hooks=[hook]):
        got = score(tiny_model, qs, share_rows=True)
        plain = score(tiny_model, qs)  # the default: a row per query (per-row hooks stay exact)
    assert rows == [2, 3]  # three queries, two distinct inputs
    for q, s, p in zip(qs, got, plain):
        assert p.token_logprobs == s.token_logprobs or all(
            abs(x - y) < 1e-5 for x, y in zip(p.token_logprobs, s.token_logprobs))
        (alone,) = score(tiny_model, [q])
        assert s.answer_ids == tuple(q.answer_ids)
        assert all(abs(x - y) < 1e-5 for x, y in zip(s.token_logprobs, alone.token_logprobs))
        assert s.argmax == alone.argmax and s.ranks == alone.ranks
    assert got[0].token_logprobs != got[1].token_logprobs


def test_fluency_and_mentions():
    assert G.n_gram_entropy("a b a b a b") < G.n_gram_entropy("a b c d e f")
    # all-distinct bigrams and trigrams of 6 words: log2(5) x 2/3 and log2(4) x 4/3, averaged
    expect = (math.log2(5) * 2 / 3 + math.log2(4) * 4 / 3) / 2
    assert abs(G.n_gram_entropy("a b c d e f") - expect) < 1e-9
    assert abs(G.fluency(["a b c d e f"]) - 100 * expect) < 1e-6
    assert G.mentions("It is in Paris, France.", "Paris")
    assert G.mentions("\nparis is", "Paris")
    assert not G.mentions("a Parisian cafe", "Paris")
    assert G.mentions("in New York City", "New York")


def test_probes_cover_every_kind_and_hold_out_prefixes(tiny_model):
    ps = ProbeSet.from_request(tiny_model, _request(), n_prefix_probes=2)
    counts = {k: len(ps.of(k)) for k in ("rewrite", "paraphrase", "prefix", "alias",
                                         "neighbourhood", "relation")}
    assert counts == {"rewrite": 1, "paraphrase": 2, "prefix": 2, "alias": 1, "neighbourhood": 2,
                      "relation": 1}
    for p in ps.of("prefix"):
        assert not any(p.prompt.startswith(pre) for pre in _request().prefixes)
    nb = ps.of("neighbourhood")[1]
    assert nb.true.answer == " Madrid" and nb.new.answer == " Rome"
    assert ps.of("alias")[0].new.fact.subject == "the French Republic"
    with pytest.raises(ConfigError):
        ps.of("bogus")


def _state(nll_new, nll_true, exact_new=False):
    a = AnswerScore((1,), (-nll_new,), (1 if exact_new else 2,), (0,))
    b = AnswerScore((3,), (-nll_true,), (3,), (0,))
    return a, b


def test_counterfact_metrics_by_hand(tiny_model):
    ps = ProbeSet.from_request(tiny_model, _request(), n_prefix_probes=0)
    # per probe kind: rewrite wins, paraphrases 1 of 2, neighbourhood keeps 1 of 2
    plan = {"rewrite": [(0.5, 2.0)], "paraphrase": [(0.5, 2.0), (3.0, 1.0)],
            "neighbourhood": [(0.5, 2.0), (3.0, 1.0)], "alias": [(1.0, 2.0)], "relation": [(1.0, 1.0)]}
    it = {k: iter(v) for k, v in plan.items()}
    true, new = [], []
    for p in ps.probes:
        n_, t_ = next(it[p.kind])
        a, b = _state(n_, t_)
        true.append(b)
        new.append(a if p.new is not None else None)
    st = RequestState(tuple(true), tuple(new), ())
    m = request_metrics(ps, st, st, config=HarnessConfig(protocols=("counterfact", "tokens")))
    cf = m["counterfact"]
    assert cf["ES"] == 1.0 and cf["PS"] == 0.5
    assert cf["NS"] == 0.5  # neighbourhood success: P(true) > P(new)
    assert abs(cf["EM"] - (math.exp(-0.5) - math.exp(-2.0))) < 1e-12
    assert abs(cf["NM"] - ((math.exp(-2.0) - math.exp(-0.5)) + (math.exp(-1.0) - math.exp(-3.0))) / 2) < 1e-12
    assert m["tokens"]["locality"] == 1.0  # judged against itself
    agg = aggregate([m], HarnessConfig(protocols=("counterfact", "tokens")))
    assert abs(agg["counterfact"]["Score"].mean - 3 / (1 / 1 + 1 / 0.5 + 1 / 0.5)) < 1e-12


def test_empty_edit_changes_nothing(tiny_model):
    e = Edit((), "nothing", "none", model_info(tiny_model))
    rep = evaluate(tiny_model, e, [_request()], config=CFG)
    for proto in METRICS:
        for m, agg in rep.after[proto].items():
            if m == "dppl":
                continue
            b = rep.before[proto][m]
            assert (math.isnan(agg.mean) and math.isnan(b.mean)) or abs(agg.mean - b.mean) < 1e-9, m
    assert rep.after["tokens"]["locality"].mean == 1.0
    row = rep.rows[0]
    assert row.case_id == 7 and row.generations[0]["before"] == row.generations[0]["after"]
    json.dumps(rep.to_dict())
    assert "| counterfact | ES |" in rep.table() and "| generation | fluency |" in rep.table()


def test_an_edit_that_writes_the_new_object_is_seen_on_every_protocol(tiny_model):
    """A W_out delta on every neuron of the last layer pushing the unembedding direction of the
    new object's first token: all three protocols must see it."""
    req = _request(new="Tokyo")
    ps = ProbeSet.from_request(tiny_model, req, n_prefix_probes=1)
    tok = ps.of("rewrite")[0].new.answer_ids
    direction = sum(tiny_model.W_U[:, t] for t in tok).detach()
    cfg = tiny_model.cfg
    post_mean = None
    e = Edit((w_out_rows(cfg.n_layers - 1, list(range(cfg.d_mlp)),
                         torch.ones(cfg.d_mlp, 1) * direction[None] * 50.0),),
             model=model_info(tiny_model))
    del post_mean
    rep = evaluate(tiny_model, e, [req], config=HarnessConfig(max_new_tokens=4, n_bootstrap=0))
    assert rep.after["counterfact"]["ES"].mean >= rep.before["counterfact"]["ES"].mean
    assert rep.after["counterfact"]["EM"].mean > rep.before["counterfact"]["EM"].mean
    assert rep.after["tokens"]["locality"].mean < 1.0  # such a blunt edit is not local


@pytest.mark.parametrize("batch", [1, 2])
def test_edit_and_evaluate_modes(tiny_model, batch):
    from kn_lens.edit.baselines.ft_l import FTLConfig

    reqs = [_request(), _request("Tokyo")]
    cfg = HarnessConfig(protocols=("counterfact", "tokens"), n_bootstrap=10)
    rep = edit_and_evaluate(tiny_model, reqs, method="ft_l", editor_config=FTLConfig(steps=2),
                            batch_size=batch, config=cfg)
    assert rep.n_edits == (2 if batch == 1 else 1) and len(rep.rows) == 2
    assert rep.mode == ("single" if batch == 1 else "batch(2)")
    assert 0 < rep.share_changed < 1 and rep.seconds_per_edit > 0
    assert H.active_hook_count(tiny_model) == 0


def test_sequential_mode_remeasures_earlier_edits(tiny_model):
    from kn_lens.edit.baselines.ft_l import FTLConfig

    reqs = [_request(), _request("Tokyo"), _request("Madrid")]
    snap = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    seq = sequential(tiny_model, reqs, method="ft_l", editor_config=FTLConfig(steps=2),
                     checkpoints=[1, 3], config=HarnessConfig(protocols=("counterfact",), n_bootstrap=5))
    assert seq.checkpoints == (1, 3)
    assert [len(r.rows) for r in seq.reports] == [1, 3]
    assert seq.reports[1].extras["n_edits_applied"] == 3
    assert len(seq.curve("counterfact", "ES")) == 2
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in snap.items())


def test_measure_before_is_reusable(tiny_model):
    ps = [ProbeSet.from_request(tiny_model, _request(), n_prefix_probes=1)]
    before = measure(tiny_model, ps, config=CFG)
    e = Edit((), model=model_info(tiny_model))
    a = evaluate(tiny_model, e, ps, config=CFG, before=before)
    b = evaluate(tiny_model, e, ps, config=CFG)
    assert json.dumps(a.rows[0].after, sort_keys=True) == json.dumps(b.rows[0].after, sort_keys=True)
    with pytest.raises(ConfigError):
        evaluate(tiny_model, e, ps, config=CFG, before=before * 2)


def test_harness_config_validation():
    with pytest.raises(ConfigError):
        HarnessConfig(protocols=("counterfact", "ql"))
    with pytest.raises(ConfigError):
        HarnessConfig(apply="sometimes")


def test_batched_greedy_equals_one_prompt_at_a_time(tiny_model):
    from kn_lens.facts import encode_prompt

    prompts = ["The capital of France is", "Kenya is located in",
               "Yesterday, the old house stood near the river. The iPhone is produced by"]
    ids = [encode_prompt(tiny_model, p) for p in prompts]
    e = Edit((w_out_rows(1, [0, 3], torch.randn(2, tiny_model.cfg.d_model,
                                                generator=torch.Generator().manual_seed(0))),),
             model=model_info(tiny_model))
    for fwd in ([], e.hooks(tiny_model)):
        one = [G.greedy(tiny_model, i, 12, fwd_hooks=fwd) for i in ids]
        assert G.greedy_batch(tiny_model, ids, 12, fwd_hooks=fwd) == one
    assert H.active_hook_count(tiny_model) == 0

import pytest
import torch

from kn_lens import errors
from kn_lens.facts import (EditRequest, Fact, Relation, answer_logprobs, encode_answer,
                           make_query, pad_batch, predict, queries_for_fact, query_from_prompt,
                           validate_template)


def test_template_validation():
    assert validate_template("The capital of {} is") == "The capital of {} is"
    for bad in ["The capital of France is", "{} and {} are", "The {x} of {}", "", "Capital of {} "]:
        with pytest.raises(errors.InvalidTemplateError):
            validate_template(bad)
    with pytest.raises(errors.InvalidTemplateError, match="exactly one"):
        Relation("capital", "capital", ("The capital of France is",))


def test_empty_subject_object_rejected():
    for s, o in [("", "Paris"), ("France", ""), ("  ", "Paris"), ("France", " Paris")]:
        with pytest.raises(errors.InvalidFactError):
            Fact(s, "capital", o)


def test_query_tokenisation(tiny_model):
    f = Fact("France", "capital", "Paris")
    q = make_query(tiny_model, f, "The capital of {} is")
    assert q.prompt == "The capital of France is" and q.answer == " Paris"
    tok = tiny_model.tokenizer
    assert tok.decode(q.answer_ids) == " Paris"
    # BOS policy follows the model.
    assert (q.prompt_ids[0] == tok.bos_token_id) == bool(tiny_model.cfg.default_prepend_bos)
    assert q.answer_positions == (q.n_prompt - 1,)
    assert q.input_ids == q.prompt_ids


def test_multi_token_answer_teacher_forced(tiny_model):
    f = Fact("Zork", "capital", "Qwertyville Xq")
    q = make_query(tiny_model, f, "The capital of {} is")
    assert q.n_answer > 1
    assert q.input_ids == q.prompt_ids + q.answer_ids[:-1]
    # log P(answer) = sum of per-token log-probs, each at its own teacher-forced position.
    logits = tiny_model(q.tokens())
    logp = torch.log_softmax(logits[0], -1)
    manual = sum(logp[p, t] for p, t in zip(q.answer_positions, q.answer_ids))
    assert torch.allclose(answer_logprobs(tiny_model, [q])[0], manual, atol=1e-5)


def test_batched_scoring_equals_single(tiny_model):
    qs = [make_query(tiny_model, Fact(s, "capital", o), "The capital of {} is")
          for s, o in [("France", "Paris"), ("United Kingdom", "London"), ("X", "Berlin Mitte")]]
    batched = answer_logprobs(tiny_model, qs, batch_size=3)
    single = torch.stack([answer_logprobs(tiny_model, [q])[0] for q in qs])
    assert torch.allclose(batched, single, atol=1e-5)
    toks, lengths = pad_batch(qs)
    assert toks.shape == (3, max(lengths))


def test_predict_rank(tiny_model):
    q = make_query(tiny_model, Fact("France", "capital", "Paris"), "The capital of {} is")
    (p,) = predict(tiny_model, [q], k=3)
    logits = tiny_model(q.tokens())[0, -1]
    assert p.answer_first_rank == int((logits > logits[q.answer_ids[0]]).sum())
    assert len(p.top_tokens) == 3


def test_unencodable_answer_rejected():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "Paris": 1, "is": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    assert encode_answer(tok, " Paris") == (1,)
    with pytest.raises(errors.TokenizationError, match="cannot encode"):
        encode_answer(tok, " Zürich")


def test_queries_for_fact_and_free_query(tiny_model):
    rel = Relation("capital", "capital", ("The capital of {} is", "{} has its capital in"))
    qs = queries_for_fact(tiny_model, Fact("France", "capital", "Paris"), rel)
    assert [q.template_index for q in qs] == [0, 1]
    with pytest.raises(errors.InvalidFactError):
        queries_for_fact(tiny_model, Fact("France", "language", "French"), rel)
    q = query_from_prompt(tiny_model, "The Eiffel Tower is in", "Paris")
    assert q.answer == " Paris"
    with pytest.raises(errors.InvalidFactError):
        query_from_prompt(tiny_model, "The Eiffel Tower is in", "")


def test_edit_request_validation():
    f = Fact("France", "capital", "Paris")
    r = EditRequest(f, "Rome", ("The capital of France is",))
    assert r.target_fact.object == "Rome"
    with pytest.raises(errors.InvalidFactError):
        EditRequest(f, "Paris", ("The capital of France is",))
    with pytest.raises(errors.InvalidFactError):
        EditRequest(f, "", ("The capital of France is",))


def test_answer_position_logits_match_a_full_forward(tiny_model):
    """Unembedding only the answer positions gives the full forward's logits there (LayerNorm and
    RMSNorm models, padded batch with multi-token answers)."""
    from kn_lens.facts import answer_position_logits, make_query, pad_batch

    model = tiny_model
    qs = [make_query(model, Fact("France", "capital", "Paris"), "The capital of {} is"),
          make_query(model, Fact("Japan", "capital", "Tokyo Metropolis"), "{}'s capital city is")]
    toks, _ = pad_batch(qs)
    full = model(toks)
    got = answer_position_logits(model, qs)
    for i, (q, lg) in enumerate(zip(qs, got)):
        assert lg.shape == (q.n_answer, model.cfg.d_vocab)
        torch.testing.assert_close(lg, full[i, list(q.answer_positions)], rtol=1e-4, atol=1e-5)

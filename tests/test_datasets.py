"""Built-in dataset, known-fact filter, edit-set builder and loaders (kn_lens.datasets)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kn_lens.datasets import (
    KNOWEDIT_UNKNOWN, Dataset, KnownFacts, KnownFactsConfig, build_edit_requests, builtin_dataset,
    known_facts, load_counterfact, load_dataset, load_knowedit, load_pararel,
    pararel_pattern_to_template, random_prefixes,
)
from kn_lens.errors import ConfigError, DataFileError, InvalidFactError, InvalidTemplateError
from kn_lens.facts import EditRequest, Fact, Relation, answer_logprobs, predict, queries_for_fact

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # torch's default thread pool oversubscribes a busy 2-core machine (20x slower on tiny models)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return builtin_dataset()


# --------------------------------------------------------------------------- built-in data


def test_builtin_sizes_and_validity(ds):
    assert len(ds.relations) >= 12
    assert all(len(r.templates) >= 5 for r in ds.relations.values())
    assert len(ds) >= 800
    # every relation has facts, and at least two objects (so counterfactuals exist)
    for rid in ds.relations:
        assert len(ds.facts_of(rid)) >= 20, rid
        assert len(ds.objects_of(rid)) >= 2, rid
    # one answer per (subject, relation)
    keys = [(f.relation, f.subject) for f in ds.facts]
    assert len(keys) == len(set(keys))
    # the object follows the prompt: no template ends with a space or contains the answer slot
    for r in ds.relations.values():
        for t in r.templates:
            assert t.count("{}") == 1 and not t.endswith(" ")


def test_builtin_groups_have_similar_relations(ds):
    groups = ds.groups()
    assert set(groups["maker"]) >= {"software_developer", "game_developer", "product_manufacturer"}
    assert set(groups["language"]) >= {"country_official_language", "person_native_language"}
    assert sum(len(v) >= 2 for v in groups.values()) >= 4


def test_builtin_known_true_facts(ds):
    assert ds.fact("France", "country_capital").object == "Paris"
    assert ds.fact("Paris", "capital_of").object == "France"
    assert ds.fact("Kazakhstan", "country_capital").object == "Astana"  # countryinfo is outdated
    assert ds.fact("Windows", "software_developer").object == "Microsoft"
    assert ds.fact("gold", "element_symbol").object == "Au"
    # contested / multi-answer cases are dropped
    subjects = {f.subject for f in ds.facts_of("country_capital")}
    assert "Bolivia" not in subjects and "South Africa" not in subjects
    assert {"France", "Japan"} <= {f.subject for f in ds.by_subject("France") + ds.by_subject("Japan")}
    assert len(ds.by_subject("France")) >= 3


def test_builtin_is_cached(ds):
    assert builtin_dataset() is ds


def test_dataset_filter_and_subset(ds):
    small = ds.filter(relations=["country_capital", "work_author"], limit_per_relation=3)
    assert set(small.relations) == {"country_capital", "work_author"}
    assert len(small) == 6
    with pytest.raises(InvalidFactError):
        ds.filter(relations=["no_such_relation"])
    with pytest.raises(InvalidFactError):
        ds.facts_of("no_such_relation")


# --------------------------------------------------------------------------- bad input


def test_bad_template_and_fact_errors(tmp_path):
    with pytest.raises(InvalidTemplateError):
        Relation("r", "r", ("The capital of France is",))
    with pytest.raises(InvalidTemplateError):
        Relation("r", "r", ("The capital of {} is ",))
    with pytest.raises(InvalidFactError):
        Fact("", "r", "Paris")
    with pytest.raises(InvalidFactError):
        Fact("France", "r", "  ")
    rel = Relation("r", "r", ("The capital of {} is",))
    with pytest.raises(InvalidFactError, match="does not define"):
        Dataset({"r": rel}, (Fact("France", "other", "Paris"),))
    with pytest.raises(InvalidFactError, match="one answer"):
        Dataset({"r": rel}, (Fact("France", "r", "Paris"), Fact("France", "r", "Lyon")))
    # a relations file with a bad template fails through the dataclass
    (tmp_path / "rel.json").write_text(json.dumps([{"id": "r", "templates": ["no placeholder"]}]))
    (tmp_path / "facts.json").write_text(json.dumps([{"subject": "a", "relation": "r", "object": "b"}]))
    with pytest.raises(InvalidTemplateError):
        load_dataset(tmp_path / "rel.json", tmp_path / "facts.json")
    with pytest.raises(DataFileError, match="does not exist"):
        load_dataset(tmp_path / "missing.json", tmp_path / "facts.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataFileError, match="not valid JSON"):
        load_dataset(tmp_path / "broken.json", tmp_path / "facts.json")


# --------------------------------------------------------------------------- loaders


def test_pararel_pattern_conversion():
    assert pararel_pattern_to_template("The capital of [X] is [Y] .") == "The capital of {} is"
    assert pararel_pattern_to_template("[X],  a type of [Y].") == "{}, a type of"
    assert pararel_pattern_to_template("[Y] is the capital of [X].") is None
    assert pararel_pattern_to_template("[X] and [X] are [Y].") is None


def test_load_pararel():
    d = load_pararel(DATA / "pararel")
    assert set(d.relations) == {"P36", "P103"}  # P1000 has no usable pattern
    assert d.relation("P36").templates[0] == "The capital of {} is"
    assert len(d.relation("P36").templates) == 4 and len(d.relation("P103").templates) == 2
    assert d.info["patterns_dropped"] == 3 and d.info["patterns_kept"] == 6
    assert d.info["relations_without_templates"] == ["P1000"]
    assert d.info["duplicate_facts_dropped"] == 1  # Japan listed twice
    assert d.fact("France", "P36").object == "Paris"
    assert load_pararel(DATA / "pararel", relations=["P36"]).relations.keys() == {"P36"}


def test_load_pararel_errors(tmp_path):
    with pytest.raises(DataFileError, match="not a folder"):
        load_pararel(tmp_path / "nope")
    with pytest.raises(DataFileError, match="trex_lms_vocab"):
        load_pararel(tmp_path)


def test_load_counterfact():
    reqs = load_counterfact(DATA / "counterfact_small.json")
    assert len(reqs) == 2
    r = reqs[0]
    assert isinstance(r, EditRequest) and r.case_id == 0
    assert r.fact == Fact("Danielle Darrieux", "P103", "French")
    assert r.new_object == "English"
    assert r.prompts == ("The mother tongue of Danielle Darrieux is",)
    assert len(r.paraphrase_prompts) == 2
    assert [n.answer for n in r.neighbourhood] == ["French"] * 3
    assert load_counterfact(DATA / "counterfact_small.json", limit=1)[0].case_id == 0


def test_load_counterfact_errors(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        load_counterfact(tmp_path / "counterfact.json")
    with pytest.raises(DataFileError, match="requested_rewrite"):
        load_counterfact(DATA / "counterfact_bad.json")
    with pytest.raises(DataFileError, match="expected a JSON list|top level"):
        load_counterfact(DATA / "knowedit_bad.json")


def test_load_knowedit():
    reqs = load_knowedit(DATA / "knowedit_small.json")
    assert len(reqs) == 3
    cf, zsre, recent = reqs
    assert cf.fact.object == "mayor of Vienna" and cf.new_object == "Archbishop of León, Mexico"
    assert cf.paraphrase_prompts == ("Frederic Piesch held the position of",)
    assert cf.alias_prompts == ("The name of the position held by Frederic of Pieschen is",)
    assert [p.answer for p in cf.relation_specificity] == ["male", "mayor of Vienna"]
    assert zsre.fact.object == "Aspidoceratidae"  # list ground truth -> first answer
    assert zsre.paraphrase_prompts == ("What family are Epaspidoceras?",)
    assert [p.answer for p in zsre.relation_specificity] == ["genus", "genus"]
    assert recent.fact.object == KNOWEDIT_UNKNOWN  # insertion: no ground truth
    assert recent.relation_specificity[0].answer == "Albert Arons"
    assert len(load_knowedit(DATA / "knowedit_small.json", skip_without_ground_truth=True)) == 2


def test_load_knowedit_errors(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        load_knowedit(tmp_path / "ZsRE-test-all.json")
    with pytest.raises(DataFileError, match="top level"):
        load_knowedit(DATA / "knowedit_bad.json")
    with pytest.raises(DataFileError, match="subject/prompt/target_new"):
        load_knowedit(DATA / "counterfact_small.json")


# --------------------------------------------------------------------------- edit builder


def test_edit_requests_invariants(ds):
    facts = ds.facts_of("country_capital")[:15] + ds.facts_of("work_author")[:10]
    reqs = build_edit_requests(ds, facts, seed=0)
    assert len(reqs) == len(facts)
    for r, f in zip(reqs, facts):
        rel = ds.relation_of(f)
        assert r.fact == f and r.new_object != f.object
        assert r.new_object in ds.objects_of(f.relation)
        assert r.prompts == (rel.render(f.subject, 0),)
        assert len(r.paraphrase_prompts) == len(rel.templates) - 1
        assert all(f.subject in p for p in r.paraphrase_prompts)
        assert len(r.prefixes) == 5 and all(p.endswith(". ") for p in r.prefixes)
        assert len(r.neighbourhood) <= 10
        for n in r.neighbourhood:
            assert n.fact.relation == f.relation and n.fact.subject != f.subject
            if r.case_id not in reqs.neighbour_fallback:
                assert n.answer == f.object == n.fact.object
        for s in r.relation_specificity:
            assert s.fact.subject == f.subject and s.fact.relation != f.relation
            assert s.answer == s.fact.object
    # capitals are unique: every capital request falls back and is flagged
    assert set(range(15)) <= reqs.neighbour_fallback
    # authors with several works have same-object neighbours
    shakespeare = [r for r in reqs if r.fact.object == "William Shakespeare"]
    assert shakespeare and all(len(r.neighbourhood) >= 1 for r in shakespeare)
    assert all(r.case_id not in reqs.neighbour_fallback for r in shakespeare)


def test_edit_requests_deterministic_and_order_free(ds):
    facts = list(ds.facts_of("city_country")[:12])
    a = build_edit_requests(ds, facts, seed=3)
    b = build_edit_requests(ds, facts, seed=3)
    c = build_edit_requests(ds, facts, seed=4)
    rev = build_edit_requests(ds, facts[::-1], seed=3)
    strip = lambda r: (r.new_object, r.neighbourhood, r.relation_specificity, r.prefixes)  # noqa: E731
    assert [strip(x) for x in a] == [strip(x) for x in b]
    assert [strip(x) for x in a] != [strip(x) for x in c]
    assert [strip(x) for x in a] == [strip(x) for x in rev][::-1]


def test_edit_requests_aliases_and_options(ds):
    france = ds.fact("France", "country_capital")
    (r,) = build_edit_requests(ds, [france], seed=0, n_neighbours=2, n_paraphrases=2, n_prefixes=0,
                               rewrite_template=1, new_objects=["Lyon"])
    assert r.new_object == "Lyon" and len(r.paraphrase_prompts) == 2 and r.prefixes == ()
    assert r.prompts == (ds.relation("country_capital").render("France", 1),)
    assert any("French Republic" in p for p in r.alias_prompts)
    assert {s.fact.relation for s in r.relation_specificity} >= {"country_continent"}
    with pytest.raises(ConfigError):
        build_edit_requests(ds, [france], seed=0, rewrite_template=99)
    with pytest.raises(InvalidFactError):
        build_edit_requests(ds, [france], seed=0, new_objects=["Paris"])  # same as the old object


def test_random_prefixes_seeded():
    assert random_prefixes(4, 1) == random_prefixes(4, 1)
    assert random_prefixes(4, 1) != random_prefixes(4, 2)
    assert all(p[0].isupper() and p.endswith(". ") for p in random_prefixes(8, 0))


# --------------------------------------------------------------------------- known facts (tiny)


@pytest.mark.parametrize("builder", ["tiny_gpt2", "tiny_llama"])
def test_known_facts_matches_predict(ds, builder):
    from kn_lens import testing

    model = getattr(testing, builder)()
    facts = ds.facts_of("country_capital")[:4] + ds.facts_of("work_author")[:3]
    res = known_facts(model, facts, ds, batch_size=5)
    assert len(res) == len(facts) and res.skipped == ()
    queries = [q for f in res.facts for q in queries_for_fact(model, f, ds.relation_of(f))]
    preds = predict(model, queries, batch_size=3)
    assert [x for row in res.ranks for x in row] == [p.answer_first_rank for p in preds]
    lp = answer_logprobs(model, queries, batch_size=4)
    ours = torch.tensor([x for row in res.log_probs for x in row])
    assert torch.allclose(ours, lp, atol=1e-4)
    # batch size never changes the result
    res1 = known_facts(model, facts, ds, batch_size=1)
    assert res1.ranks == res.ranks


def test_known_facts_decision_rule(ds):
    from kn_lens.testing import tiny_gpt2

    model = tiny_gpt2()
    facts = ds.facts_of("country_continent")[:6]
    strict = known_facts(model, facts, ds, max_rank=0, min_share=1.0)
    loose = known_facts(model, facts, ds, max_rank=10**6, min_share=0.2)
    assert all(loose.known)  # every rank is below the vocabulary size
    for i in range(len(facts)):
        share = strict.pass_share(i)
        assert strict.known[i] == (share >= 1.0)
        assert 0 <= strict.best_template(i) < len(strict.ranks[i])
    rows = strict.per_relation()
    assert rows[0].relation == "country_continent" and rows[0].n_facts == 6
    assert len(rows[0].top1_per_template) == len(ds.relation("country_continent").templates)
    md = strict.to_markdown()
    assert md.startswith("| relation |") and "country_continent" in md and "**all**" in md
    assert strict.model.name == "tiny-gpt2" and strict.config == KnownFactsConfig(max_rank=0, min_share=1.0, batch_size=32)


def test_known_facts_roundtrip_and_errors(ds, tmp_path):
    from kn_lens.testing import tiny_llama

    model = tiny_llama()
    res = known_facts(model, ds.facts_of("element_symbol")[:3], ds)
    path = res.save(tmp_path / "kf.json", extra={"note": "test"})
    back = KnownFacts.load(path)
    assert back.facts == res.facts and back.ranks == res.ranks and back.known == res.known
    assert all(math.isclose(a, b, abs_tol=1e-4) for ra, rb in zip(back.log_probs, res.log_probs)
               for a, b in zip(ra, rb))
    assert json.loads(path.read_text())["note"] == "test"
    with pytest.raises(DataFileError):
        KnownFacts.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError):
        known_facts(model, ds.facts[:1], ds, min_share=0.0)
    with pytest.raises(ConfigError):
        known_facts(model, ds.facts[:1], ds, max_rank=-1)
    with pytest.raises(InvalidFactError):
        known_facts(model, [], ds)
    with pytest.raises(InvalidFactError):
        known_facts(model, [Fact("x", "nope", "y")], ds)


# --------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_famous_facts_known_by_default_model(ds):
    from kn_lens.models import load_model

    model = load_model()
    facts = [ds.fact("France", "country_capital"), ds.fact("Japan", "country_capital"),
             ds.fact("Windows", "software_developer"), ds.fact("the iPhone", "product_manufacturer"),
             ds.fact("the Eiffel Tower", "landmark_city")]
    res = known_facts(model, facts, ds, batch_size=16)
    assert res.n_known >= 4, res.to_markdown()
    # and the batched scores equal a one-query-at-a-time forward pass
    qs = queries_for_fact(model, facts[0], ds.relation_of(facts[0]))
    single = torch.stack([answer_logprobs(model, [q])[0] for q in qs])
    assert torch.allclose(single, torch.tensor(res.log_probs[0]), atol=1e-3)

"""One fact sampler (``kn_lens.datasets.sample_facts``) and one new-object picker
(``kn_lens.datasets.draw_new_object`` / ``new_objects``) for every script.

Units run on a tiny random model. The ``real_model`` tests check that the committed results
are reproduced exactly by the unified helpers for the same command lines: the QL sample (and
QL modification's new objects and locality facts), the balanced samples of the FiNE / ROME /
TNF-DA analyses and the editing benchmark's requests (and its rows archives' keys). They need only
the prepared models' tokenizers (no weights are loaded), with the committed known-facts files.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import random
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import pytest

from kn_lens import experiment
from kn_lens.datasets import (KnownFacts, KnownFactsConfig, build_edit_requests, builtin_dataset,
                              draw_new_object, new_objects, sample_facts)
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import Fact
from kn_lens.models import model_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


@pytest.fixture(scope="module")
def ds():
    return builtin_dataset()


# --------------------------------------------------------------------------- units (tiny model)


def test_shuffle_is_seeded_and_nested(gpt2_tiny, ds):
    a = sample_facts(gpt2_tiny, ds, 5, seed=3, known_only=False)
    b = sample_facts(gpt2_tiny, ds, 8, seed=3, known_only=False)
    c = sample_facts(gpt2_tiny, ds, 5, seed=4, known_only=False)
    assert a.facts == b.facts[:5] and a.facts != c.facts  # QL draws locality facts from b[5:]
    assert a.templates == (0,) * 5 and a.known == "off" and a.strategy == "shuffle"
    pool = list(ds.facts)
    random.Random(3).shuffle(pool)
    assert list(a.facts) == pool[:5]


def test_filters(gpt2_tiny, ds):
    from kn_lens.facts import encode_answer

    s = sample_facts(gpt2_tiny, ds, 40, seed=0, known_only=False, min_templates=6,
                     max_answer_tokens=1)
    assert all(len(ds.relation_of(f).templates) >= 6 for f in s.facts)
    assert all(len(encode_answer(gpt2_tiny.tokenizer, " " + f.object)) == 1 for f in s.facts)
    with pytest.raises(ConfigError, match="strategy"):
        sample_facts(gpt2_tiny, ds, 3, seed=0, strategy="random")
    with pytest.raises(ConfigError):
        sample_facts(gpt2_tiny, ds, 0, seed=0)
    with pytest.raises(InvalidFactError, match="template"):
        sample_facts(gpt2_tiny, ds, 3, seed=0, known_only=False, min_templates=99)
    with pytest.warns(UserWarning, match="only"):
        few = sample_facts(gpt2_tiny, ds.filter(relations=["country_capital"]), 10_000, seed=0,
                           known_only=False)
    assert len(few) == len(ds.facts_of("country_capital"))


def test_balanced_is_round_robin_over_relations(gpt2_tiny, ds):
    s = sample_facts(gpt2_tiny, ds, 40, seed=1, strategy="balanced", known_only=False)
    counts = Counter(f.relation for f in s.facts)
    assert len(counts) == len(ds.relations) and max(counts.values()) - min(counts.values()) <= 1
    # the largest relations first, ties by id; each relation's facts shuffled with one generator
    order = sorted(ds.relations, key=lambda r: (-len(ds.facts_of(r)), r))
    assert [f.relation for f in s.facts[:len(order)]] == order
    four = sample_facts(gpt2_tiny, ds, 12, seed=1, strategy="balanced", known_only=False,
                        n_relations=4)
    assert set(Counter(f.relation for f in four.facts)) == set(order[:4])
    assert list(four.pairs()) == [(f, 0) for f in four.facts]
    # up to k per relation (the study's): n=None with per_relation
    small = ds.filter(relations=["painting_artist", "element_symbol"], limit_per_relation=30)
    capped = sample_facts(gpt2_tiny, small, None, seed=0, strategy="balanced", per_relation=27,
                          known_only=False)
    assert Counter(f.relation for f in capped.facts) == {"painting_artist": 26,
                                                         "element_symbol": 27}
    with pytest.raises(ConfigError, match="per_relation"):
        sample_facts(gpt2_tiny, ds, None, seed=0, strategy="shuffle", per_relation=3)


def _record(model, ds, facts, known, best):
    """A KnownFacts record of ``model`` where ``known`` facts are known, ``best`` their best
    template (by log P)."""
    lps = []
    for f in facts:
        k = len(ds.relation_of(f).templates)
        lp = [-5.0] * k
        lp[best.get(f, 0) % k] = -1.0
        lps.append(tuple(lp))
    return KnownFacts(facts=tuple(facts), templates={r: ds.relations[r].templates for r in ds.relations},
                      ranks=tuple((0,) * len(lp) for lp in lps), log_probs=tuple(lps),
                      known=tuple(f in known for f in facts), config=KnownFactsConfig(),
                      model=model_info(model))


def test_saved_known_verdicts_and_best_templates(gpt2_tiny, ds):
    known = set(ds.facts[::7])
    best = {f: i % 3 for i, f in enumerate(ds.facts)}
    rec = _record(gpt2_tiny, ds, ds.facts, known, best)
    for strategy in ("shuffle", "balanced"):
        s = sample_facts(gpt2_tiny, ds, 30, seed=0, strategy=strategy, known=rec)
        assert s.known == "saved" and len(s) == 30 and set(s.facts) <= known
        assert all(t == best[f] % len(ds.relation_of(f).templates) for f, t in s.pairs())
    # a record of another model, or one that does not cover the candidates, is not used: they
    # are scored here (and a random model knows nothing)
    other = dataclasses.replace(rec, model=dataclasses.replace(rec.model, name="other"))
    partial = _record(gpt2_tiny, ds, ds.facts[:10], known, best)  # no element_symbol fact
    small = ds.filter(relations=["element_symbol"])
    for bad in (other, partial):
        with pytest.warns(UserWarning, match="does not cover"), pytest.raises(InvalidFactError):
            sample_facts(gpt2_tiny, small, 3, seed=0, known=bad)
    assert sample_facts(gpt2_tiny, small, 3, seed=0, known=rec).known == "saved"


def test_one_new_object_picker(gpt2_tiny, ds):
    from kn_lens.edit.kn import token_of

    facts = list(sample_facts(gpt2_tiny, ds, 12, seed=0, known_only=False).facts)
    picked = new_objects(facts, seed=5, model=gpt2_tiny, dataset=ds)
    assert list(picked) == facts
    for f, o in picked.items():
        assert o != f.object and token_of(gpt2_tiny, o) != token_of(gpt2_tiny, f.object)
    assert new_objects(facts, seed=5, model=gpt2_tiny, dataset=ds) == picked  # seeded
    # QL modification's former picker: one Random(seed) across facts, the relation's objects
    # first, then every object, first token different
    rng, every = random.Random(5), sorted({f.object for f in ds.facts})
    for f in facts:
        own = token_of(gpt2_tiny, f.object)
        for pool in (ds.objects_of(f.relation), every):
            cands = [o for o in pool if o != f.object and token_of(gpt2_tiny, o) != own]
            if cands:
                assert picked[f] == rng.choice(cands)
                break
    # without a dataset (CAS's default): pools from the facts given
    few = [Fact("a", "r", "x"), Fact("b", "r", "y"), Fact("c", "s", "x")]
    assert new_objects(few, seed=0) == {few[0]: "y", few[1]: "x", few[2]: "y"}
    with pytest.raises(InvalidFactError, match="no counterfactual"):
        draw_new_object(few[0], [["x"]], random.Random(0))


def test_edit_requests_with_a_template_per_fact(ds):
    facts = [ds.facts_of("country_capital")[0], ds.facts_of("country_continent")[3]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = build_edit_requests(ds, facts, seed=2, rewrite_template=[1, 2])
        one = [build_edit_requests(ds, [f], seed=2, rewrite_template=t)[0]
               for f, t in zip(facts, (1, 2))]
    assert [r.prompts for r in both] == [r.prompts for r in one]
    assert [r.new_object for r in both] == [r.new_object for r in one]
    assert [r.case_id for r in both] == [0, 1]
    with pytest.raises(ConfigError, match="entries"):
        build_edit_requests(ds, facts, seed=2, rewrite_template=[1])


# --------------------------------------------------------------------------- committed results


@functools.cache
def _tokenizer_model(name: str):
    """What the samplers and pickers read from a model: its tokenizer (the prepared folder's),
    BOS policy and identity (the committed known-facts file's) -- no weights."""
    from transformers import AutoTokenizer

    from kn_lens.models import ModelInfo, prepared_path, prepare_model

    prepare_model(name, verbose=False)  # real_model tests: prepared on first use

    info = ModelInfo(**json.loads((RESULTS / f"known_facts_{name}.json").read_text())
                     ["results"]["model"])
    return types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(prepared_path(name)),
                                 kn_info=info,
                                 cfg=types.SimpleNamespace(default_prepend_bos=info.prepend_bos))


def _args(name: str, max_answer_tokens: int = 1) -> argparse.Namespace:
    return argparse.Namespace(results_dir=RESULTS, model=name, seed=0, no_known_filter=False,
                              max_answer_tokens=max_answer_tokens, quick=False)


def _facts(doc: dict, key: str = "facts") -> list[tuple[str, str, str]]:
    return [(f["subject"], f["relation"], f["object"]) for f in doc["results"][key]]


def _doc(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


MODELS = ("smollm2-135m", "gemma-3-270m")


@pytest.mark.real_model
@pytest.mark.parametrize("name", MODELS)
def test_committed_ql_samples_are_reproduced(name, ds):
    model = _tokenizer_model(name)
    docs = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob(f"*_{name}.json")
            if p.stem.startswith(("locate_facts", "ql_"))}
    assert f"locate_facts_{name}" in docs
    samples: dict = {}

    def ql(n: int, max_answer_tokens: int) -> list[Fact]:
        if (n, max_answer_tokens) not in samples:
            args = _args(name, max_answer_tokens)
            samples[n, max_answer_tokens] = experiment.ql_facts(args, model, ds, n)
        return samples[n, max_answer_tokens]

    for stem, doc in docs.items():  # every QL script analyses the same sample
        cfg = doc["config"]
        n = cfg.get("n_facts") or cfg["n_facts_requested"]
        got = [(f.subject, f.relation, f.object) for f in ql(n, cfg.get("max_answer_tokens", 1))]
        assert got == _facts(doc), stem
    mod = docs.get(f"ql_modification_{name}")
    if mod is not None:  # its update targets and out-of-scope facts
        facts = ql(len(mod["results"]["facts"]), mod["config"]["max_answer_tokens"])
        picked = new_objects(facts, seed=mod["seed"], model=model, dataset=ds)
        assert {f.key(): o for f, o in picked.items()} == mod["results"]["new_objects"]
        n_loc = mod["config"]["n_locality"]
        more = ql(len(facts) + n_loc, mod["config"]["max_answer_tokens"])
        loc = [(f.subject, f.relation, f.object) for f in more if f not in set(facts)]
        assert loc[:n_loc] == _facts(mod, "locality_facts")


@pytest.mark.real_model
@pytest.mark.parametrize("name", MODELS)
def test_committed_balanced_samples_are_reproduced(name, ds):
    model = _tokenizer_model(name)
    for stem in ("fine_neurons", "rome_layers", "tnfda_neurons"):
        path = RESULTS / f"{stem}_{name}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        r = doc["results"]
        n = doc["config"]["n_facts_requested"]
        got = experiment.sample(_args(name), model, ds, n, strategy="balanced").pairs()
        got = [((f.subject, f.relation, f.object), t) for f, t in got]
        skipped = {(s["prompt"], s["answer"]) for s in r.get("skipped", [])}
        assert len(r["facts"]) + len(skipped) == len(got), stem
        want = [((f["subject"], f["relation"], f["object"]), f["template"]) for f in r["facts"]]
        assert [g for g in got if g in want] == want, stem  # in order; skipped ones left out


@pytest.mark.real_model
@pytest.mark.parametrize("name", MODELS)
def test_committed_edit_benchmark_requests_are_reproduced(name, ds):
    from kn_lens.edit.benchmark import BenchmarkRun

    model = _tokenizer_model(name)
    doc = _doc(f"edit_benchmark_{name}")
    n = doc["config"]["n_requests"]
    run = BenchmarkRun(results_dir=RESULTS, model=name, quick=False, n_requests=n, seed=doc["seed"],
                       max_new_tokens=doc["config"]["harness"]["max_new_tokens"],
                       no_known_filter=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reqs = run.requests(model, ds)
    got = [{"case_id": r.case_id, "subject": r.fact.subject, "relation": r.fact.relation,
            "old": r.fact.object, "new": r.new_object, "prompt": r.prompts[0]} for r in reqs]
    assert got == doc["results"]["requests"]
    with gzip.open(run.archive_path, "rt") as f:  # the committed rows resume this run
        rows = [json.loads(x) for x in f]
    assert {x["key"] for x in rows} == {run.key}
    by_id = {r.case_id: r for r in reqs}
    assert all((x["row"]["subject"], x["row"]["new"]) ==
               (by_id[x["row"]["case_id"]].fact.subject, by_id[x["row"]["case_id"]].new_object)
               for x in rows)
    curves = RESULTS / f"edit_curves_{name}.rows.jsonl.gz"
    if curves.exists():  # the curves' requests are the benchmark's first ones, same key
        sys.path.insert(0, str(ROOT / "experiments"))
        try:
            import edit_curves
        finally:
            sys.path.remove(str(ROOT / "experiments"))
        with gzip.open(curves, "rt") as f:
            items = [json.loads(x) for x in f]
        cargs = argparse.Namespace(n_requests=100, seed=0, quick=False, no_known_filter=False,
                                   model=name)
        assert {x["key"] for x in items} == {edit_curves._key(cargs)}
        # sequential checkpoints hold the re-judged rows 1..n, batch items one row each
        judged = [r for x in items for r in (x["rows"] if "rows" in x else [x["row"]])]
        assert judged and all((r["subject"], r["new"]) == (by_id[r["case_id"]].fact.subject,
                                                          by_id[r["case_id"]].new_object)
                              for r in judged)

"""A user's relations file: a good one loads into a Dataset; a malformed one reports every problem
at once, each with its location, and nothing is written."""
from __future__ import annotations

import json

import pytest

from kn_lens.datasets import builtin_dataset, check_relations_file, load_relations_file
from kn_lens.errors import DataFileError

GOOD = {"relations": [
    {"id": "river_country", "name": "river in country", "group": "geography",
     "templates": ["The {} flows through", "The river {} runs through the country of"],
     "facts": [["Danube", "Austria"], ["Loire", "France", ["la Loire"]],
               {"subject": "Thames", "object": "England"}]},
    {"id": "dish_country", "name": "dish from", "templates": ["{} is a dish from"],
     "facts": [["Paella", "Spain"], ["Sushi", "Japan"]]}]}


def _write(tmp_path, doc, name="rel.json"):
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def test_good_file_loads(tmp_path):
    ds = load_relations_file(_write(tmp_path, GOOD))
    assert set(ds.relations) == {"river_country", "dish_country"} and len(ds) == 5
    assert ds.relations["river_country"].group == "geography"
    loire = ds.fact("Loire", "river_country")
    assert loire.object == "France" and loire.aliases == ("la Loire",)
    assert ds.relations["dish_country"].render("Paella") == "Paella is a dish from"
    # a bare list of relations, and the built-in two-file format (a folder)
    assert len(load_relations_file(_write(tmp_path, GOOD["relations"], "bare.json"))) == 5
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "relations.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "facts"} for r in GOOD["relations"]]))
    (folder / "facts.json").write_text(json.dumps(
        [{"subject": "Danube", "relation": "river_country", "object": "Austria"},
         {"subject": "Paella", "relation": "dish_country", "object": "Spain"}]))
    assert len(load_relations_file(folder)) == 2


def test_every_problem_is_listed_with_its_location(tmp_path):
    bad = {"relations": [
        {"id": "river_country", "name": "river", "templates": ["The river flows through", "{} in"],
         "facts": [["Danube", "Austria"], ["Loire", ""], ["Danube", "Germany"], ["Rhine"]],
         "colour": "blue"},
        {"id": "country_capital", "name": "clash", "templates": ["{} has {}"], "facts": [["a", "b"]]},
        {"name": "no id", "templates": ["{} x"], "facts": [["a", "b"]]},
    ], "version": 2}
    path = _write(tmp_path, bad)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataFileError) as info:
        load_relations_file(path)
    problems = [str(p) for p in info.value.problems]
    text = str(info.value)

    def has(where, what):
        return any(where in p and what in p for p in problems), (where, what, problems)

    assert has("relation 'river_country' (#0), template 0", "exactly one '{}'")  # missing {}
    assert has("relation 'river_country' (#0), fact 1", "empty object")
    assert has("relation 'river_country' (#0), fact 2", "'Danube' again")  # duplicate subject
    assert has("relation 'river_country' (#0), fact 3", "[subject, object]")
    assert has("relation 'river_country' (#0)", "unknown key(s) ['colour']")
    assert has("relation 'country_capital' (#1)", "built-in")
    assert has("relation 'country_capital' (#1), template 0", "exactly one")
    assert has("relation #2", "missing key(s) ['id']")
    assert has(str(path), "unknown top-level key(s) ['version']")
    assert len(problems) >= 9 and all(p in text for p in problems)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_bad_json_names_line_and_column(tmp_path):
    path = _write(tmp_path, '{"relations": [\n  {"id": "x",, }\n]}')
    problems, parsed = check_relations_file(path)
    assert len(problems) == 1 and parsed == []
    assert "line 2 column" in str(problems[0]) and "bad JSON" in str(problems[0])
    with pytest.raises(DataFileError, match="line 2"):
        load_relations_file(path)
    with pytest.raises(DataFileError, match="no such file"):
        load_relations_file(tmp_path / "missing.json")


def test_builtin_ids_are_reserved_but_configurable(tmp_path):
    doc = {"relations": [{"id": "country_capital", "name": "c", "templates": ["The capital of {} is"],
                          "facts": [["France", "Paris"]]}]}
    path = _write(tmp_path, doc)
    assert "country_capital" in builtin_dataset().relations
    with pytest.raises(DataFileError, match="built-in"):
        load_relations_file(path)
    assert len(load_relations_file(path, builtin_ids=set())) == 1

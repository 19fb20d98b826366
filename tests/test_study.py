"""``kn_lens.study`` / ``kn-lens study`` on a tiny model: the whole run, resuming after a kill,
and a malformed relations file (every problem listed, nothing written, no model work)."""
from __future__ import annotations

import json

import pytest
import torch

from kn_lens import hooks, testing
from kn_lens.study import StudyConfig, study

REL = {"relations": [
    {"id": "river_country", "name": "river flows through", "group": "geography",
     "templates": ["The {} flows through the country of", "The river {} is in the country of",
                   "The {} river runs through"],
     "facts": [["Danube", "Austria"], ["Loire", "France"], ["Thames", "England"],
               ["Seine", "France"]]},
    {"id": "dish_country", "name": "dish from",
     "templates": ["{} is a dish from", "The dish {} comes from"],
     "facts": [["Paella", "Spain"], ["Sushi", "Japan"], ["Pizza", "Italy"]]}]}
CFG = StudyConfig(known_only=False, builtin_facts=1, n_views=1)  # random models know nothing


@pytest.fixture(scope="module")
def model():
    return testing.tiny_llama(seed=0, n_ctx=64)


def _file(tmp_path, doc=REL):
    p = tmp_path / "relations.json"
    p.write_text(json.dumps(doc))
    return p


def test_study_writes_the_report(tmp_path, model):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    res = study(model, _file(tmp_path), out=tmp_path / "out", config=CFG, progress=False)
    out = tmp_path / "out"
    for f in ("report.md", "results.json", "figures/known.png", "figures/causal_ig.png",
              "figures/causal_contribution.png", "views.html"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    r = json.loads((out / "results.json").read_text())
    assert set(r["relations"]) == {"river_country", "dish_country"}
    assert r["relations"]["river_country"]["n_studied"] == 4
    assert set(r["consistency"]) == {"contribution", "ig"}
    for m in ("contribution", "ig"):
        by = r["causal"][m]["by_relation"]
        assert by["river_country"]["n"] + by["dish_country"]["n"] == 7
        assert 0 <= by["river_country"]["pass"] <= by["river_country"]["n"]
    near = r["sharing"]["river_country"]["nearest"]
    assert near and near[0]["jaccard"] >= near[-1]["jaccard"]
    # 7 facts x their templates x 2 locators + 1 built-in fact per built-in relation
    n_queries = 4 * 3 + 3 * 2
    assert res.computed >= 2 * n_queries and res.cached >= 0
    report = (out / "report.md").read_text()
    for heading in ("## 1. Known facts", "## 4. Causal check", "## 5. Neurons shared"):
        assert heading in report
    assert "figures/known.png" in report and "views.html" in report
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert hooks.active_hook_count(model) == 0


def test_killed_study_resumes_without_recomputing(tmp_path, model, monkeypatch):
    import importlib

    L = importlib.import_module("kn_lens.locate")  # the package (kn_lens.locate is also a function)

    path = _file(tmp_path)
    real = L.locate
    calls = {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)
    monkeypatch.setattr(L, "locate", dying)
    with pytest.raises(KeyboardInterrupt):
        study(model, path, out=tmp_path / "out", config=CFG, progress=False)
    from kn_lens.sweep import ResultStore

    with ResultStore(tmp_path / "out" / ".cache", create=False) as st:
        assert len(st) == 5 and not st.claims()  # the killed sweep's claims were released
    assert not list((tmp_path / "out" / ".cache").rglob("*.tmp"))
    assert not (tmp_path / "out" / "report.md").exists()  # nothing half-written
    monkeypatch.setattr(L, "locate", real)
    first = study(model, path, out=tmp_path / "out", config=CFG, progress=False)
    assert first.cached >= 5  # the 5 items of the killed run were not recomputed
    again = study(model, path, out=tmp_path / "out", config=CFG, progress=False)
    assert again.computed == 0 and again.cached == first.computed + first.cached
    assert again.results["consistency"] == first.results["consistency"]


def test_cli_malformed_file_lists_every_problem_and_writes_nothing(tmp_path, capsys,
                                                                  monkeypatch):
    from kn_lens import cli, models

    bad = {"relations": [{"id": "r", "name": "r", "templates": ["no placeholder"],
                          "facts": [["a", ""], ["a", "b"]], "extra": 1}]}
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rc = cli.main(["study", str(_file(tmp_path, bad)), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "3 problem(s)" in err
    for what in ("template 0", "fact 0: empty object", "unknown key(s) ['extra']"):
        assert what in err
    assert not (tmp_path / "out").exists()
    rc = cli.main(["study", str(tmp_path / "nope.json"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "no such file" in capsys.readouterr().err


def test_study_with_nothing_known_and_a_one_template_relation(tmp_path, model):
    """A random model knows no fact: every step still reports (nothing to locate); a relation
    with one template has no consistency but the other steps."""
    doc = {"relations": [dict(REL["relations"][1], templates=["{} is a dish from"])]}
    res = study(model, _file(tmp_path, doc), out=tmp_path / "none", progress=False,
                config=StudyConfig(builtin_facts=0, n_views=1))
    assert res.results["relations"]["dish_country"]["n_studied"] == 0
    assert (tmp_path / "none" / "report.md").exists()
    res = study(model, _file(tmp_path, doc), out=tmp_path / "one", progress=False,
                config=StudyConfig(known_only=False, builtin_facts=0, n_views=0,
                                   locators=("contribution",)))
    assert res.results["consistency_skipped_relations"] == ["dish_country"]
    assert "error" in res.results["consistency"]["contribution"]
    assert res.results["causal"]["contribution"]["by_relation"]["dish_country"]["n"] == 3


def test_bad_study_config():
    from kn_lens.errors import ConfigError

    with pytest.raises(ConfigError, match="locator"):
        StudyConfig(locators=("nope",))
    with pytest.raises(ConfigError, match="editor"):
        StudyConfig(edit="nope")

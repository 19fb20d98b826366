"""End-to-end quick runs of the Query Localization experiment scripts on a random tiny model.

A random model knows no facts, so the scripts run with ``--all-facts``; the numbers are meaningless,
the tests check the plumbing: result JSON fields, figures, reuse of the stored scores, --plot-only.
(The score cache itself: tests/test_locate_cache.py; the fact sample: tests/test_sampling.py.)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXP))

import locate_facts  # noqa: E402
import ql_consistency  # noqa: E402
import ql_mapping  # noqa: E402
import ql_modification  # noqa: E402

BASE = ["--model", "tiny-gpt2", "--all-facts", "--n-facts", "2", "--quick"]


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ql")


def _run(module, argv, monkeypatch, results_dir) -> dict:
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *BASE, *argv,
                                      "--results-dir", str(results_dir)])
    module.main()
    name = module.NAME
    path = results_dir / "quick" / f"{name}_tiny-gpt2.json"
    assert path.exists()
    return json.loads(path.read_text())


def _figures(results_dir, prefix):
    return sorted((results_dir / "quick" / "figures").glob(f"{prefix}*_tiny-gpt2.png"))


def test_locate_facts_caches_scores(monkeypatch, results_dir, capsys):
    doc = _run(locate_facts, ["--methods", "contribution", "atp"], monkeypatch, results_dir)
    r = doc["results"]
    assert doc["mode"] == "quick" and doc["model"]["name"] == "tiny-gpt2"
    assert len(r["facts"]) == 2 and r["n_queries"] == 12  # 6 templates per relation
    assert set(r["kn_layer_counts"]) == {"contribution", "atp"}
    n_layers = doc["model"]["n_layers"]
    assert all(len(c) == n_layers for c in r["kn_layer_counts"].values())
    assert r["seconds_per_query"]["contribution"] > 0
    from kn_lens.sweep import ResultStore

    with ResultStore(results_dir / "sweeps", create=False) as st:
        assert len(st.query(kind="locate")) == 24  # 2 facts x 6 templates x 2 methods
    assert _figures(results_dir, "locate_facts")
    # second run: everything from the cache (no timing), same KN set sizes
    doc2 = _run(locate_facts, ["--methods", "contribution", "atp"], monkeypatch, results_dir)
    assert doc2["results"]["seconds_per_query"] == {"contribution": None, "atp": None}
    assert doc2["results"]["mean_kn_set_size"] == pytest.approx(r["mean_kn_set_size"])
    assert "| contribution | cached |" in capsys.readouterr().out


def test_ql_consistency(monkeypatch, results_dir, capsys):
    doc = _run(ql_consistency, ["--methods", "contribution", "atp"], monkeypatch, results_dir)
    r = doc["results"]
    assert set(r["methods"]) == {"contribution", "atp"}
    for m, res in r["methods"].items():
        assert len(res["facts"]) == 2
        kinds = {(row["scope"], row["threshold_kind"]) for row in res["rows"]}
        assert ("overall", "static") in kinds and ("overall", "otsu") in kinds
        for row in res["rows"]:
            assert row["n_k1"] + row["n_k2"] == row["n_facts"]
        for f in res["facts"]:
            if f["cs2"] is not None:
                assert 0 <= f["cs1"] <= f["cs2"] <= 1
                assert f["label_static"] == ("K_I" if f["cs2"] > 0.1 else "K_II")
    assert set(r["shared_k2"]) == {"static", "otsu"}
    out = capsys.readouterr().out
    assert "| method | T |" in out and "∩: II" in out
    assert len(_figures(results_dir, "ql_consistency")) == 2


def test_ql_mapping(monkeypatch, results_dir, capsys):
    doc = _run(ql_mapping, ["--method", "contribution"], monkeypatch, results_dir)
    r = doc["results"]
    assert r["method"] == "contribution" and r["n_k1"] + r["n_k2"] <= 2
    summ = {(s["group"], s["kind"]): s for s in r["mapping"]["summary"]}
    for kind in ("self", "union", "intersection", "refine"):
        assert summ[("all", kind)]["n_queries"] == 12
    assert len(r["mapping"]["queries"]) == 12
    assert all(q["p_before"] > 0 for q in r["mapping"]["queries"])
    assert _figures(results_dir, "ql_mapping")
    # --plot-only redraws from the saved file without recomputing
    monkeypatch.setattr(sys, "argv", ["ql_mapping.py", *BASE, "--method", "contribution",
                                      "--results-dir", str(results_dir), "--plot-only"])
    ql_mapping.main()
    assert "| group | set |" in capsys.readouterr().out


def test_ql_modification(monkeypatch, results_dir):
    doc = _run(ql_modification, ["--method", "contribution", "--n-locality", "3",
                                 "--ppl-slices", "1"], monkeypatch, results_dir)
    r = doc["results"]
    assert len(r["locality_facts"]) == 3
    assert not {(f["subject"], f["relation"]) for f in r["locality_facts"]} & {
        (f["subject"], f["relation"]) for f in r["facts"]}
    t3 = {(row["operation"], row["selection"]) for row in r["table3"]}
    assert t3 == {(op, s) for op in ("erasure", "update") for s in ("N_i", "N_g", "CAS")}
    for row in r["table3"]:
        assert row["n"] + row["skipped"] == 2  # quick mode edits q_1 of each fact
        if row["n"]:
            for m in ("Rel", "Gen", "Loc", "Avg"):
                assert 0 <= row[m] <= 1
            assert row["dPPL"] is not None
    assert all(row["group"] in ("K_I", "K_II") for row in r["table2"])
    assert len(_figures(results_dir, "ql_modification")) == 2
    for k in ("static", "otsu"):
        b = r["by_threshold"][k]
        assert b["n_k1"] + b["n_k2"] == len(b["labels"]) == 2
        assert {row["group"] for row in b["rows"]} <= {"all", "K_I", "K_II"}
    assert r["by_threshold"]["static"]["n_k1"] == r["n_k1"]

"""End-to-end quick run of the editing benchmark on a random tiny model: every editor, all three
protocols, the resumable row files, the result JSON and the figures; and the CLI's edit parser."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXP))

import edit_benchmark  # noqa: E402

from kn_lens.edit import benchmark as bench  # noqa: E402


def _prose():
    from kn_lens.errors import DataFileError
    from kn_lens.evaluate import reference_text

    try:
        reference_text()
    except DataFileError:
        return False
    return True


@pytest.mark.skipif(not _prose(), reason="reference prose not installed (scripts/setup.sh)")
def test_edit_benchmark_quick(tmp_path, monkeypatch, capsys):
    argv = ["edit_benchmark.py", "--model", "tiny-llama", "--no-known-filter", "--quick",
            "--memit-batch", "2", "--results-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    edit_benchmark.main()
    doc = json.loads((tmp_path / "quick" / "edit_benchmark_tiny-llama.json").read_text())
    methods = doc["results"]["methods"]
    assert set(methods) == {"ft_l", "rome", "memit", "kn_update", "kn_erase", "fine", "kne",
                            "tnf_da", "memit@2"}
    for name, m in methods.items():
        assert set(m["after"]) == {"counterfact", "tokens", "generation"}, name
        assert m["per_request"]["case_id"] == [0, 1] and m["n_edits"] + m["n_refused"] >= 1
        assert len(m["per_request"]["counterfact"]["ES"]) == 2
        assert "Score" in m["after"]["counterfact"]
    assert methods["memit@2"]["batch"] == 2 and methods["memit"]["batch"] == 1
    for name in ("fine", "kne", "tnf_da"):
        assert methods[name]["n_refused"] == 0 and methods[name]["n_edits"] == 2, name
    out = capsys.readouterr().out
    assert "counterfact protocol" in out and "| ES |" in out
    figs = tmp_path / "quick" / "figures"
    assert (figs / "edit_benchmark_tradeoff_tiny-llama.png").exists()
    # resumable: a second run finds every row and recomputes nothing
    edit_benchmark.main()
    out = capsys.readouterr().out
    assert "rome: 2 done, 0 to go" in out
    # archived rows seed a fresh cache (another machine); --partial aggregates unfinished methods
    monkeypatch.setattr(sys, "argv", argv + ["--methods", "ft_l", "--archive-rows"])
    edit_benchmark.main()
    archive = tmp_path / "quick" / "edit_benchmark_tiny-llama.rows.jsonl.gz"
    assert archive.exists()
    import shutil

    shutil.rmtree(tmp_path / "cache")
    run = bench.BenchmarkRun.from_args(edit_benchmark_args(argv))
    cache = run.cache_dir()
    run.restore()
    assert len(run.rows("rome")) == 2
    rows = (cache / "ft_l.jsonl").read_text().splitlines()
    (cache / "ft_l.jsonl").write_text(rows[0] + "\n" + rows[1][:40])  # one row, one cut off
    (tmp_path / "quick" / "edit_benchmark_tiny-llama.rows.jsonl.gz").unlink()
    monkeypatch.setattr(sys, "argv", argv + ["--methods", "rome", "--partial"])
    edit_benchmark.main()
    methods = json.loads((tmp_path / "quick" / "edit_benchmark_tiny-llama.json").read_text())[
        "results"]["methods"]
    assert methods["ft_l"]["complete"] is False and methods["ft_l"]["n_requests_done"] == 1
    assert methods["rome"]["complete"] is True
    out = capsys.readouterr().out
    assert "ft_l (1/2)" in out
    # the pre-edit measurement came from its archive (no generation on a fresh cache), exactly
    assert "pre-edit measurement: from edit_benchmark_tiny-llama.before.jsonl.gz" in out
    import pickle

    from kn_lens.evaluate.harness import RequestState

    states = pickle.loads((cache / "before.pkl").read_bytes())
    assert [RequestState.from_dict(json.loads(json.dumps(s.to_dict()))) for s in states] == states
    model = bench.load_benchmark_model("tiny-llama")
    from kn_lens.datasets import builtin_dataset
    from kn_lens.evaluate.probes import probe_sets

    reqs = run.requests(model, builtin_dataset())
    pss = probe_sets(model, reqs, n_prefix_probes=3, seed=0)
    assert states[0].matches(pss[0]) and not states[0].matches(pss[1])


def edit_benchmark_args(argv):
    import argparse

    return argparse.Namespace(results_dir=Path(argv[argv.index("--results-dir") + 1]),
                              model="tiny-llama", quick=True, n_requests=2, seed=0,
                              max_new_tokens=8, no_known_filter=True,
                              device=None, dtype=None)


def test_cli_edit_parser():
    from kn_lens.cli import build_parser

    a = build_parser().parse_args(["edit", "The Eiffel Tower is located in", "Rome", "--subject",
                                   "Eiffel Tower"])
    assert a.method == "rome" and a.new_object == "Rome" and a.load is None
    a = build_parser().parse_args(["edit", "The Eiffel Tower is located in", "--load", "dir"])
    assert a.new_object is None and a.load == "dir"


def test_benchmark_ablation_variants(tmp_path, monkeypatch):
    """Each variant is its editor with the paper's ablation applied; a bad name fails before any
    model work; a variant runs through the same loop (rows under its own label)."""
    from kn_lens.errors import ConfigError

    configs = bench.editor_configs(quick=True)
    for label, (editor, changes) in bench.VARIANTS.items():
        name, cfg = bench.resolve(label, configs)
        assert name == editor and type(cfg) is type(configs[editor])
        assert all(getattr(cfg, k) == v for k, v in changes.items()), label
        assert any(getattr(configs[editor], k) != v for k, v in changes.items()), label
    assert bench.resolve("rome", configs) == ("rome", configs["rome"])
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        bench.resolve("nope", configs)
    argv = ["edit_benchmark.py", "--model", "tiny-llama", "--no-known-filter", "--quick",
            "--results-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + ["--methods", "fine,nope"])
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        edit_benchmark.main()
    assert not (tmp_path / "quick").exists() or not list((tmp_path / "quick").rglob("*.jsonl"))
    monkeypatch.setattr(sys, "argv", argv + ["--methods", "fine_random"])
    edit_benchmark.main()
    doc = json.loads((tmp_path / "quick" / "edit_benchmark_tiny-llama.json").read_text())
    m = doc["results"]["methods"]["fine_random"]
    assert m["n_edits"] == 2 and m["n_refused"] == 0


def test_benchmark_kne_reuses_relation_ensembles(tmp_path, monkeypatch):
    """KNE Sec. 4.4 (``kne_reuse``): per relation, the ensemble located on its first requests is
    the neuron set of every edit of that relation, cached for a resumed run."""
    import math

    from kn_lens.edit.kne import locate_ensemble

    argv = ["edit_benchmark.py", "--model", "tiny-llama", "--no-known-filter", "--quick",
            "--n-requests", "4", "--results-dir", str(tmp_path), "--methods", "kne_reuse"]
    monkeypatch.setattr(sys, "argv", argv)
    edit_benchmark.main()
    args = edit_benchmark_args(argv)
    args.n_requests = 4
    run = bench.BenchmarkRun.from_args(args)
    saved = json.loads((run.cache_dir() / "kne_reuse.ensembles.json").read_text())
    model = bench.load_benchmark_model("tiny-llama")
    from kn_lens.datasets import builtin_dataset

    requests = run.requests(model, builtin_dataset())
    cfg = bench.editor_configs(quick=True)["kne"]
    by_rel = {}
    for r in requests:
        by_rel.setdefault(r.fact.relation, []).append(r)
    for rel, rs in by_rel.items():
        expect = locate_ensemble(model, rs[:max(1, math.ceil(len(rs) / 4))], config=cfg)
        assert sorted(map(tuple, saved[rel])) == sorted(map(tuple, expect.to_list())), rel
    rows = run.rows("kne_reuse")
    assert len(rows) == 4 and not any(r["refused"] for r in rows.values())
    for r in requests:  # each edit trains exactly its relation's ensemble's W_out rows
        n = len(saved[r.fact.relation]) * model.cfg.d_model
        assert rows[r.case_id]["n_params"] == n, r.fact.relation


@pytest.mark.skipif(not _prose(), reason="reference prose not installed (scripts/setup.sh)")
def test_benchmark_limit_and_same_request_tables(tmp_path, monkeypatch, capsys):
    """``--limit N`` computes the first N requests only (a later run fills in the rest); the
    papers' tables then compare a partial method with the others on the requests they share."""
    argv = ["edit_benchmark.py", "--model", "tiny-llama", "--no-known-filter", "--quick",
            "--n-requests", "3", "--results-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + ["--methods", "ft_l"])
    edit_benchmark.main()
    monkeypatch.setattr(sys, "argv", argv + ["--methods", "fine_random", "--limit", "1",
                                             "--partial"])
    edit_benchmark.main()
    out = capsys.readouterr().out
    assert "fine_random: 0 done, 1 to go (--limit 1)" in out
    doc = json.loads((tmp_path / "quick" / "edit_benchmark_tiny-llama.json").read_text())
    methods = doc["results"]["methods"]
    assert methods["fine_random"]["n_requests_done"] == 1 and methods["ft_l"]["complete"]
    assert methods["fine_random"]["per_request"]["case_id"] == [0]
    assert "The same table on the 1 requests every method above has rows for" in out
    # the subset row of FT-L is its request 0 alone, not its mean over all 3
    ft_l = methods["ft_l"]["per_request"]
    assert ft_l["case_id"] == [0, 1, 2]
    sub = edit_benchmark._subset_aggs(ft_l, {0})
    r0 = ft_l["tokens"]["rewrite_acc"][0]
    assert sub["tokens"]["rewrite_acc"]["mean"] == pytest.approx(r0, abs=1e-4)
    # the unedited model's per-request metrics are stored once, for every request with a row
    before = doc["results"]["before_per_request"]
    assert before["case_id"] == [0, 1, 2]
    for m in ("ES", "NS", "EM"):
        assert sum(before["counterfact"][m]) / 3 == pytest.approx(
            methods["ft_l"]["before"]["counterfact"][m]["mean"], abs=1e-4), m
    # --compare: chosen methods side by side on the requests they share, from the saved file
    monkeypatch.setattr(sys, "argv", argv + ["--plot-only", "--compare", "ft_l,fine_random"])
    edit_benchmark.main()
    out = capsys.readouterr().out
    table = out.split("ft_l, fine_random on the 1 requests they all have rows for")[1]
    ft_l_row = next(line for line in table.splitlines() if line.startswith("| ft_l |"))
    assert ft_l_row.split(" | ")[5] == f"{r0 * 100:.1f}"  # rewrite acc. x 100 of request 0
    assert "| fine_random |" in table
    monkeypatch.setattr(sys, "argv", argv + ["--plot-only", "--compare", "ft_l,rome"])
    with pytest.raises(SystemExit, match="no rows for rome"):
        edit_benchmark.main()
    monkeypatch.setattr(sys, "argv", argv + ["--plot-only", "--compare", ","])
    with pytest.raises(SystemExit):
        edit_benchmark.main()
    assert "--compare wants a comma list" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", argv + ["--methods", "fine_random", "--limit", "0"])
    with pytest.raises(SystemExit):
        edit_benchmark.main()


def test_per_request_columns_round_trip():
    """The results file keeps per-request metrics as columns; selecting requests from them gives
    back each request's (rounded) values, a missing metric (None) as NaN."""
    rows = [{"case_id": 3, "after": {"counterfact": {"ES": 1.0, "NS": 0.123456},
                                     "generation": {"dppl": None}}},
            {"case_id": 7, "after": {"counterfact": {"ES": 0.0, "NS": 0.5},
                                     "generation": {"dppl": 0.25}}}]
    cols = edit_benchmark._columns(rows, "after")
    assert cols == {"case_id": [3, 7], "counterfact": {"ES": [1.0, 0.0], "NS": [0.1235, 0.5]},
                    "generation": {"dppl": [None, 0.25]}}
    [r7] = edit_benchmark._select(cols, {7})
    assert r7 == {"counterfact": {"ES": 0.0, "NS": 0.5}, "generation": {"dppl": 0.25}}
    [r3] = edit_benchmark._select(cols, {3})
    assert r3["generation"]["dppl"] != r3["generation"]["dppl"]  # NaN
    assert edit_benchmark._select(cols, {5}) == []


def test_kne_module_study_compares_modules_on_shared_requests(tmp_path):
    """KNE's Fig. 2 analogue: one bar per edited module and metric, on the requests every module
    run has (x 100), fluency relative to the unedited model's; drawn as a figure."""
    from kn_lens.evaluate.harness import METRICS

    def metrics(**kw):  # every protocol's metrics (0 unless given)
        return {p: {m: kw.get(m, 0.0) for m in METRICS[p]} for p in METRICS}

    def cols(ids, acc, flu):
        rows = [{"case_id": i, "after": metrics(rewrite_acc=acc[i], portability=0.5,
                                                locality_relation=1.0, locality=0.25,
                                                fluency=flu)} for i in ids]
        return edit_benchmark._columns(rows, "after")

    methods = {"kne": {"per_request": cols([0, 1, 2], {0: 1.0, 1: 1.0, 2: 0.0}, 400.0)},
               "kne_w_q": {"per_request": cols([0, 1], {0: 0.0, 1: 1.0}, 300.0)},
               "ft_l": {"per_request": cols([0, 1, 2], {0: 1.0, 1: 1.0, 2: 1.0}, 1.0)}}
    before = edit_benchmark._columns(
        [{"case_id": i, "before": metrics(fluency=500.0)} for i in range(3)], "before")
    n, data = edit_benchmark._module_study(methods, before)
    assert n == 2  # request 2 has no W_Q row: left out for W_out too
    assert data["Edit Succ."] == {"W_out": 100.0, "W_Q": 50.0}
    assert data["Portability"] == {"W_out": 50.0, "W_Q": 50.0}
    assert data["Fluency\n(% of unedited)"] == {"W_out": 80.0, "W_Q": 60.0}
    assert edit_benchmark._module_study({"kne": methods["kne"]}, before) is None
    from kn_lens.viz import plot_grouped_bars
    png = plot_grouped_bars(data, tmp_path / "m.png", size=(9.0, 4.0), decimals=0)
    assert png.stat().st_size > 1000

"""The experiment scripts' heavy steps run through sweeps (``kn_lens.sweep``): a script run on a
local process pool writes the same results file as in-process, a rerun computes nothing (it reads
the result store), and the editing benchmark's rows survive a process killed between storing an
edit and writing its rows (the rerun takes them from the store, recomputing nothing)."""
from __future__ import annotations

import json
import sys

import pytest

from test_experiments_edit import _prose
from test_experiments_neurons import _keep_threads, _script  # noqa: F401 (autouse fixture)

TIMINGS = {"seconds", "seconds_per_fact", "versions", "command"}


def _without(doc, keys=TIMINGS):
    if isinstance(doc, dict):
        return {k: _without(v, keys) for k, v in doc.items() if k not in keys}
    if isinstance(doc, list):
        return [_without(v, keys) for v in doc]
    return doc


def test_pool_gives_the_inprocess_results_and_a_rerun_computes_nothing(tmp_path, capsys):
    from kn_lens.sweep import ResultStore

    fine = _script("fine_neurons")
    base = ["--quick", "--model", "tiny-llama", "--no-known-filter", "--n-facts", "4",
            "--freeze-last", "1", "--threads", "1"]
    fine.main(base + ["--results-dir", str(tmp_path / "a")])
    fine.main(base + ["--results-dir", str(tmp_path / "b"), "--backend", "pool", "--workers", "2"])
    out = capsys.readouterr().out
    assert "4 to compute (pool x2)" in out
    docs = [json.loads((tmp_path / d / "quick" / "fine_neurons_tiny-llama.json").read_text())
            for d in "ab"]
    assert _without(docs[0]) == _without(docs[1])  # the same numbers, neurons and tokens
    with ResultStore(tmp_path / "b" / "sweeps", create=False) as st:
        workers = {r.worker for r in st.query(kind="locate")}
        assert len(st) == 4 and all("pool" in w for w in workers)
    # a second run reads every item from the store: no worker is started, nothing is computed
    fine.main(base + ["--results-dir", str(tmp_path / "b"), "--backend", "pool", "--workers", "2"])
    out = capsys.readouterr().out
    assert "4 already stored, 0 to compute" in out and "0 computed" in out
    again = json.loads((tmp_path / "b" / "quick" / "fine_neurons_tiny-llama.json").read_text())
    assert _without(again) == _without(docs[1])


def test_shard_computes_its_items_and_stops(tmp_path, capsys):
    fine = _script("fine_neurons")
    base = ["--quick", "--model", "tiny-llama", "--no-known-filter", "--n-facts", "4",
            "--freeze-last", "1", "--results-dir", str(tmp_path)]
    fine.main(base + ["--shard", "0/2"])
    out = capsys.readouterr().out
    assert "shard 0/2:" in out and "without --shard" in out
    assert not (tmp_path / "quick" / "fine_neurons_tiny-llama.json").exists()
    fine.main(base + ["--shard", "1/2"])
    fine.main(base)  # every item stored by the two shards: the analysis runs, computing nothing
    out = capsys.readouterr().out
    assert "4 already stored, 0 to compute" in out
    assert (tmp_path / "quick" / "fine_neurons_tiny-llama.json").exists()


@pytest.mark.skipif(not _prose(), reason="reference prose not installed (scripts/setup.sh)")
def test_benchmark_rows_of_a_killed_run_come_from_the_store(tmp_path, monkeypatch, capsys):
    from kn_lens import experiment

    bench = _script("edit_benchmark")
    argv = ["edit_benchmark.py", "--model", "tiny-llama", "--no-known-filter", "--quick",
            "--methods", "ft_l", "--results-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    real = experiment.append_jsonl

    def killed(path, items):  # the process dies once the first edit is stored, before its rows
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(experiment, "append_jsonl", killed)
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    monkeypatch.setattr(experiment, "append_jsonl", real)
    capsys.readouterr()
    bench.main()  # resumed: the stored edit's rows are written, only the other edit computed
    out = capsys.readouterr().out
    assert "ft_l: 0 done, 2 to go" in out and "1 already stored, 1 to compute" in out
    rows = experiment.read_jsonl(next((tmp_path / "cache").glob("edit_benchmark_*")) /
                                 "ft_l.jsonl", lambda d: d["row"]["case_id"])
    assert sorted(rows) == [0, 1]
    bench.main()  # complete: nothing to do
    assert "ft_l: 2 done, 0 to go" in capsys.readouterr().out

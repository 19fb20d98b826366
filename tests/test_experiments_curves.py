"""Sequential and batch editing curves (``experiments/edit_curves.py``) end to end on a random
tiny model: checkpoints re-judge every earlier request under the composed edit, the run resumes
from its saved state (also from the rows archive alone, by replaying the edits), and batch size 1
reuses the editing benchmark's rows of the same requests."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXP))

import edit_benchmark  # noqa: E402
import edit_curves  # noqa: E402

from test_experiments_edit import _prose  # noqa: E402


def _run(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["edit_curves.py", "--model", "tiny-llama",
                                      "--no-known-filter", "--quick", *argv])
    edit_curves.main()


@pytest.mark.skipif(not _prose(), reason="reference prose not installed (scripts/setup.sh)")
def test_sequential_curves_resume(tmp_path, monkeypatch, capsys):
    args = ["--results-dir", str(tmp_path), "--methods", "rome,fine", "--checkpoints", "1,2",
            "--archive-rows"]
    _run(monkeypatch, args)
    doc = json.loads((tmp_path / "quick" / "edit_curves_tiny-llama.json").read_text())
    seq = doc["results"]["sequential"]
    assert set(seq) == {"rome", "fine"}
    for m, cps in seq.items():
        assert list(cps) == ["1", "2", "4"], m  # the last request is always a checkpoint
        assert cps["1"]["after"]["counterfact"]["ES"]["n"] == 1
        assert cps["4"]["after"]["counterfact"]["ES"]["n"] == 4  # requests 1..n re-judged
        assert set(cps["4"]["after"]) == {"counterfact", "tokens"}
        assert cps["4"]["dppl"] is not None
        # the composed edit grows (FiNE: more rows; ROME: one rank-one term per edit)
        assert cps["4"]["composite_params"] >= cps["1"]["composite_params"] > 0
    assert (tmp_path / "figures").exists() is False  # quick runs draw under results/quick
    assert (tmp_path / "quick" / "figures" / "edit_curves_sequential_tiny-llama.png").exists()
    first = seq["rome"]["4"]["after"]["counterfact"]["ES"]["mean"]
    capsys.readouterr()
    _run(monkeypatch, args)  # resumed: nothing recomputed
    assert "sequential rome: every checkpoint done" in capsys.readouterr().out
    # another machine: only the archive survives, without the last checkpoint: the edits are
    # replayed (deterministic), the archived checkpoints kept, the missing one judged
    import gzip

    archive = tmp_path / "quick" / "edit_curves_tiny-llama.rows.jsonl.gz"
    with gzip.open(archive, "rt") as f:
        kept = [x for x in f.read().splitlines() if json.loads(x).get("n") != 4]
    with gzip.open(archive, "wt") as f:
        f.write("\n".join(kept) + "\n")
    shutil.rmtree(tmp_path / "cache")
    _run(monkeypatch, args)
    out = capsys.readouterr().out
    assert "replaying edits" in out and "n=4" in out and "n=2" not in out
    doc = json.loads((tmp_path / "quick" / "edit_curves_tiny-llama.json").read_text())
    assert doc["results"]["sequential"]["rome"]["4"]["after"]["counterfact"]["ES"]["mean"] == first
    # --archive-only: no model work; rows of other run settings in the archive are kept
    import gzip

    archive = tmp_path / "quick" / "edit_curves_tiny-llama.rows.jsonl.gz"
    with gzip.open(archive, "rt") as f:
        lines = f.read().splitlines()
    other = json.dumps({"key": "other-run", "file": "seq_x/checkpoints.jsonl", "n": 1})
    with gzip.open(archive, "wt") as f:
        f.write("\n".join(lines + [other]) + "\n")
    shutil.rmtree(tmp_path / "cache")
    capsys.readouterr()
    _run(monkeypatch, args + ["--archive-only"])
    out = capsys.readouterr().out
    assert f"{len(lines)} rows / checkpoints archived" in out and "edits done" not in out
    with gzip.open(archive, "rt") as f:
        assert sorted(f.read().splitlines()) == sorted(lines + [other])


@pytest.mark.skipif(not _prose(), reason="reference prose not installed (scripts/setup.sh)")
def test_batch_curves_reuse_benchmark_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["edit_benchmark.py", "--model", "tiny-llama",
                                      "--no-known-filter", "--quick", "--n-requests", "4",
                                      "--methods", "memit", "--memit-batch", "1",
                                      "--results-dir", str(tmp_path)])
    edit_benchmark.main()
    capsys.readouterr()
    _run(monkeypatch, ["--results-dir", str(tmp_path), "--mode", "batch", "--methods", "memit",
                       "--batch-sizes", "1,2,4"])
    out = capsys.readouterr().out
    assert "batch memit@1: 4 rows from the edit benchmark" in out
    batch = json.loads((tmp_path / "quick" / "edit_curves_tiny-llama.json").read_text()
                       )["results"]["batch"]["memit"]
    assert batch["1"]["from_benchmark"] == 4 and batch["2"]["from_benchmark"] == 0
    assert [batch[k]["n_edits"] for k in ("1", "2", "4")] == [4, 2, 1]
    assert all(batch[k]["n_requests_done"] == 4 for k in batch)
    bench_rows = json.loads((tmp_path / "quick" / "edit_benchmark_tiny-llama.json").read_text()
                            )["results"]["methods"]["memit"]["after"]["counterfact"]["ES"]["mean"]
    assert batch["1"]["after"]["counterfact"]["ES"]["mean"] == bench_rows


def test_bad_arguments_fail_before_model_work(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="unknown method"):
        _run(monkeypatch, ["--results-dir", str(tmp_path), "--methods", "rome,nope"])
    with pytest.raises(SystemExit, match="batch-sizes"):
        _run(monkeypatch, ["--results-dir", str(tmp_path), "--mode", "batch", "--methods", "rome",
                           "--batch-sizes", "0,2"])

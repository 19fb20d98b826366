"""End-to-end quick runs of the TNF-DA, FiNE and QL-synapse experiment scripts on tiny random
models (no weights; ``--no-known-filter`` since a random model knows no fact): the results file
has the documented fields and every figure exists; ``--plot-only`` redraws from the file."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(autouse=True)
def _keep_threads():
    """The scripts set torch's thread count (``--threads``, default 1): restore it."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _script(name: str):
    sys.path.insert(0, str(EXP))
    spec = importlib.util.spec_from_file_location(f"exp_{name}", EXP / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(name: str, model: str, tmp_path: Path, *extra: str) -> dict:
    mod = _script(name)
    argv = ["--quick", "--model", model, "--no-known-filter", "--results-dir", str(tmp_path),
            *extra]
    mod.main(argv)
    path = tmp_path / "quick" / f"{name}_{model}.json"
    assert path.exists()
    doc = json.loads(path.read_text())
    assert doc["experiment"] == name and doc["mode"] == "quick"
    assert doc["model"]["name"] == model
    assert "torch" in doc["versions"]
    for png in (tmp_path / "quick" / "figures").glob(f"*_{model}.png"):
        assert png.stat().st_size > 1000
    # --plot-only redraws from the saved file without recomputing
    mtime = path.stat().st_mtime_ns
    mod.main(argv + ["--plot-only"])
    assert path.stat().st_mtime_ns == mtime
    return doc


def _fig(tmp_path: Path, name: str, model: str) -> Path:
    p = tmp_path / "quick" / "figures" / f"{name}_{model}.png"
    assert p.exists(), p
    return p


def test_tnfda_quick(tmp_path, capsys):
    doc = _run("tnfda_neurons", "tiny-llama", tmp_path, "--n-facts", "8", "--n-exact", "1")
    r = doc["results"]
    assert r["n_facts"] + len(r["skipped"]) == 8 and r["n_facts"] >= 4
    assert doc["config"]["mediation"]["gamma"] == 20.0
    for f in r["facts"]:
        shares = f["grid_shares"]
        assert len(shares) == len(r["grid"])
        assert all(a <= b + 1e-6 for a, b in zip(shares, shares[1:]))  # cumulative
        assert shares[-1] == pytest.approx(1.0, abs=1e-5)
        assert 0 < f["share_at_1pct"] <= 1 and len(f["targeted"]) >= 1
    c = r["concentration_abs"]
    assert c["n_facts"] == r["n_facts"] and 0 < c["mean_share_at_1pct"] <= 1
    assert {"Top1", "Top2", "Base", "Repetition"} <= set(r["repetition"]["table"][-1])
    assert r["overlap"]["metric"] == "jaccard" and "same_group_mean" in r["overlap"]
    ex = r["exact"]["per_fact"]
    assert len(ex) == 1 and -1 <= ex[0]["spearman"] <= 1 and 0 <= ex[0]["top1pct_overlap"] <= 1
    for fig in ("tnfda_fig3", "tnfda_table1", "tnfda_overlap"):
        _fig(tmp_path, fig, "tiny-llama")
    out = capsys.readouterr().out
    assert "| relation | n | Top1 | Top2 | Base | Repetition |" in out


def test_fine_quick(tmp_path, capsys):
    doc = _run("fine_neurons", "tiny-gpt2", tmp_path, "--n-facts", "10", "--freeze-last", "1")
    r = doc["results"]
    u = r["layer_distribution_unique"]
    assert r["n_facts"] == 10 and u["n_layers"] == 3
    assert u["counts"][-1] == 0  # the last layer is frozen
    assert u["total"] == r["n_unique_neurons"] == sum(u["counts"])
    assert sum(r["layer_distribution_repeats"]["counts"]) == sum(len(f["neurons"]) for f in r["facts"])
    # each fact: top-5 per answer token, united -> between 5 and 5 x answer tokens neurons
    for f in r["facts"]:
        assert 5 <= len(f["neurons"]) <= 5 * f["n_answer_tokens"]
    assert r["frequent_neurons"][0]["n_facts"] >= r["frequent_neurons"][-1]["n_facts"]
    assert all(len(x["tokens"]) == 5 for x in r["frequent_neurons"])
    ex = r["examples"][0]["neurons"]
    assert len(ex) == 3 and ex[0]["score"] >= ex[1]["score"] >= ex[2]["score"]
    for fig in ("fine_fig4", "fine_table6"):
        _fig(tmp_path, fig, "tiny-gpt2")
    assert "Most frequently selected neurons" in capsys.readouterr().out


def test_ql_synapses_quick(tmp_path):
    doc = _run("ql_synapses", "tiny-llama", tmp_path, "--n-facts", "4", "--freeze-last", "1")
    r = doc["results"]
    assert r["locator"] == "contribution" and r["n_facts"] == 4
    for f in r["facts"]:
        assert f["k"] >= 2 and 1 / f["k"] - 1e-9 <= f["P"] <= 1
        assert f["label"] in ("K_I", "K_II", None)
    assert set(r["summary"]) == {"paper", "ignore_first"}
    s = r["summary"]["paper"]["all"]
    assert set(s) == {"delta_value", "delta_prob"}
    assert math.isfinite(s["delta_value"]["self_suppress"])
    assert len(r["effects"]["paper"]) == len(r["effects"]["ignore_first"]) == 4
    assert sum(e["n_synapses"] for e in r["effects"]["paper"]) >= 1
    h = r["heatmap"]
    import numpy as np

    with np.load(tmp_path / "quick" / h["maps_file"]) as z:
        maps = {k: z[k] for k in z.files}
    assert set(maps) == {"none", "suppressed", "enhanced"}
    assert maps["none"].shape == (3, 48) and h["n_synapses"] >= 1
    # enhancing or suppressing the synapses changes the activations
    assert not np.array_equal(maps["none"], maps["suppressed"])
    for fig in ("ql_fig5", "ql_fig6", "ql_fig7_10"):
        _fig(tmp_path, fig, "tiny-llama")

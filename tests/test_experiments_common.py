"""The experiment scripts' shared plumbing (``kn_lens.experiment``): one ``--threads`` default
everywhere, ``--figures-dir`` honoured in quick mode too, and every script a leaf that imports
only the library (no ``sys.path`` tricks, no importing another script)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kn_lens import experiment

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"
SCRIPTS = sorted(p for p in EXP.glob("*.py") if not p.name.startswith("_"))
LEAVES = sorted([*EXP.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def test_figures_dir_is_used_in_every_mode(tmp_path):
    ap = experiment.parser("x")
    a = ap.parse_args(["--quick", "--results-dir", str(tmp_path / "r"),
                       "--figures-dir", str(tmp_path / "figs")])
    assert experiment.figure_path(a, "fig").parent == tmp_path / "figs"
    a = ap.parse_args(["--quick", "--results-dir", str(tmp_path / "r")])
    assert experiment.figure_path(a, "fig").parent == tmp_path / "r" / "quick" / "figures"
    a = ap.parse_args([])
    assert a.threads == 0 and a.figures_dir is None
    assert experiment.figure_path(a, "fig").parent == experiment.FIGURES == ROOT / "figures"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_one_threads_flag_with_one_default(script):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's kn_lens
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert text.count("--threads THREADS") == 2, script.name  # usage line + option list
    assert "default 0" in text.split("--threads THREADS", 2)[2][:120], script.name


def _leaf_problems(path: Path) -> list[str]:
    """How ``path`` is not a leaf: ``sys.path`` touched, or another script imported."""
    siblings = {p.stem for p in path.parent.glob("*.py")} - {path.stem} | {path.parent.name}
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and \
                isinstance(node.value, ast.Name) and node.value.id == "sys":
            out.append(f"line {node.lineno}: sys.path")
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and \
                any(a.name == "path" for a in node.names):
            out.append(f"line {node.lineno}: from sys import path")
        elif isinstance(node, ast.Import):
            out += [f"line {node.lineno}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] in siblings]
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").split(".")[0] in siblings:
                out.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import")
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) and \
                getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "spec_from_file_location", "__import__", "run_path"):
            out.append(f"line {node.lineno}: dynamic import")
    return out


@pytest.mark.parametrize("script", LEAVES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_are_leaves(script):
    """A script imports only kn_lens (plus stdlib / third-party): shared code lives in the
    library, never in another script reached through ``sys.path``."""
    assert _leaf_problems(script) == [], script


def test_leaf_check_catches_the_old_tricks(tmp_path):
    (tmp_path / "helper.py").write_text("X = 1\n")
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nfrom pathlib import Path\n"
                   "sys.path.insert(0, str(Path(__file__).parent))\n"
                   "import helper\nfrom helper import X\nfrom . import helper as h\n"
                   "import importlib\nimportlib.import_module('helper')\n")
    found = _leaf_problems(bad)
    assert any("sys.path" in p for p in found)
    assert sum("helper" in p for p in found) == 2 and any("from . import" in p for p in found)
    assert any("dynamic import" in p for p in found)
    good = tmp_path / "good.py"
    good.write_text("import sys\nimport json\nfrom kn_lens import experiment\nprint(sys.argv)\n")
    assert _leaf_problems(good) == []


def test_compact_json_round_trips():
    doc = {"a": [[1, 2], [3, 4]], "b": [1.5, None, "x ] [ y"], "c": {"d": [], "e": [[]]},
           "s": "line\nbreak [ ]", "n": [{"k": [1, 2]}, [0.1, [2, 3]]]}
    text = experiment.compact_json(doc)
    assert json.loads(text) == doc
    assert '"a": [[1, 2], [3, 4]]' in text and '"b": [1.5, null, "x ] [ y"]' in text


def test_rows_files_and_archives(tmp_path, capsys):
    """Rows survive a cut-off line; an archive keeps other runs' rows and restores a fresh
    cache of its own run."""
    rows = tmp_path / "run" / "a.jsonl"
    rows.parent.mkdir()
    experiment.append_jsonl(rows, [{"i": 0, "v": 1}, {"i": 1, "v": 2}])
    rows.write_text(rows.read_text() + '{"i": 2, "v"')  # a killed write
    assert experiment.read_jsonl(rows, lambda d: d["i"]) == {0: {"i": 0, "v": 1}, 1: {"i": 1, "v": 2}}
    archive = tmp_path / "rows.jsonl.gz"
    experiment.write_archive(archive, "other", [{"file": "a.jsonl", "i": 9, "v": 0}])
    n = experiment.write_archive(archive, "k1", ({"file": "a.jsonl", **d} for d in
                                                 experiment.read_jsonl(rows, lambda d: d["i"]).values()))
    assert n == 2
    assert set(experiment.read_archive(archive, "other", "file")) == {"a.jsonl"}
    fresh = tmp_path / "fresh"
    experiment.restore_from_archive(archive, "k1", "file", fresh, file_of=lambda f: f,
                                    id_of=lambda f: (lambda d: d["i"]))
    assert experiment.read_jsonl(fresh / "a.jsonl", lambda d: d["i"]) == {
        0: {"i": 0, "v": 1}, 1: {"i": 1, "v": 2}}
    assert "a.jsonl: 2 rows from rows.jsonl.gz" in capsys.readouterr().out
    experiment.restore_from_archive(archive, "k1", "file", fresh, file_of=lambda f: f,
                                    id_of=lambda f: (lambda d: d["i"]))  # nothing new
    assert len((fresh / "a.jsonl").read_text().splitlines()) == 2


def test_run_keys_are_the_committed_ones():
    """A run's folder and archived rows carry its settings' key: the format is frozen (the
    committed archives, and the row folders of runs in progress, resume from these keys)."""
    assert experiment.run_key(n_requests=200, seed=0, quick=False, max_new_tokens=32,
                              no_known_filter=False) == "50ee878407"  # edit_benchmark, SmolLM2
    assert experiment.run_key(n_requests=100, seed=0, quick=False, no_known_filter=False,
                              pool=200) == "000faa083b"  # edit_curves, SmolLM2
    assert experiment.run_key(b=1, a=True) == experiment.run_key(a=True, b=1)


def test_tiny_models_by_name_and_config_errors_exit_cleanly():
    from kn_lens import testing
    from kn_lens.errors import ConfigError, UnknownModelError

    m = experiment.load_experiment_model("tiny-llama", seed=1, n_ctx=128)
    assert m.cfg.n_ctx == 128 and m.cfg.gated_mlp and m.cfg.seed == 1
    assert set(testing.TINY_MODELS) >= {"tiny-gpt2", "tiny-llama"}
    with pytest.raises(UnknownModelError):
        testing.tiny_model("tiny-nope")
    args = experiment.parser("x").parse_args([])

    def bad(_):
        raise ConfigError("unknown method 'x'")
    with pytest.raises(SystemExit, match="unknown method 'x'"):
        experiment.run(args, bad, lambda a: None)

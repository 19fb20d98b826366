"""The experiment scripts' shared flags do what they say: one ``--threads`` default everywhere,
``--figures-dir`` honoured in quick mode too."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXP))

import _common  # noqa: E402

SCRIPTS = sorted(p for p in EXP.glob("*.py") if not p.name.startswith("_"))


def test_figures_dir_is_used_in_every_mode(tmp_path):
    ap = _common.parser("x")
    a = ap.parse_args(["--quick", "--results-dir", str(tmp_path / "r"),
                       "--figures-dir", str(tmp_path / "figs")])
    assert _common.figure_path(a, "fig").parent == tmp_path / "figs"
    a = ap.parse_args(["--quick", "--results-dir", str(tmp_path / "r")])
    assert _common.figure_path(a, "fig").parent == tmp_path / "r" / "quick" / "figures"
    a = ap.parse_args([])
    assert a.threads == 0 and a.figures_dir is None
    assert _common.figure_path(a, "fig").parent == _common.FIGURES


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_one_threads_flag_with_one_default(script):
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=EXP.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert text.count("--threads THREADS") == 2, script.name  # usage line + option list
    assert "default 0" in text.split("--threads THREADS", 2)[2][:120], script.name

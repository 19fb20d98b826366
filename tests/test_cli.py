import subprocess
import sys

import pytest

from kn_lens.cli import build_parser, main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("models", "demo", "locate", "predict"):
        assert cmd in out


def test_console_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "kn_lens.cli", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "kn-lens" in r.stdout


def test_models_list(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KN_LENS_CACHE", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma-3-270m" in out and str(tmp_path) in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["predict", "The capital of France is", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err


def test_locate_parser_defaults():
    args = build_parser().parse_args(["locate", "The capital of France is", "Paris"])
    assert args.method == "contribution" and args.k == 10

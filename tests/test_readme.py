"""README's generated parts are the results files' (so they cannot silently vanish or drift):
the known-facts tables of both models."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import known_facts  # noqa: E402


@pytest.mark.parametrize("model", known_facts.MODELS)
def test_known_facts_table_in_readme_is_the_results_file(model):
    args = argparse.Namespace(model=model, results_dir=ROOT / "results", quick=False)
    text = (ROOT / "README.md").read_text()
    a, b = known_facts.readme_block(model, text)
    block = text[a:b]
    assert "| **all** |" in block and block.count("\n|") >= 20  # the whole table, not a stub
    assert block.rstrip("\n") == known_facts.table(args).rstrip("\n"), (
        f"README's known-facts table of {model} differs from results/known_facts_{model}.json: "
        f"python experiments/known_facts.py --model {model} --plot-only --update-readme")

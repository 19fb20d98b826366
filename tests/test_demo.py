"""The main job (README command (a)) runs end to end; here on a tiny random model."""
import pytest

from kn_lens import hooks
from kn_lens.demo import run_demo
from kn_lens.testing import tiny_llama


def test_demo_runs_and_leaves_no_trace():
    pytest.importorskip("kn_lens.evaluate.reference")
    from kn_lens.errors import DataFileError
    from kn_lens.evaluate import reference_text

    try:
        reference_text()
    except DataFileError:
        pytest.skip("reference prose not installed (scripts/setup.sh fetches it)")
    model = tiny_llama(n_ctx=256)  # real prompts with random prefixes
    lines: list[str] = []
    res = run_demo(model=model, n_facts=3, out=lines.append, stats_tokens=3000)
    text = "\n".join(lines)
    assert "knowledge neurons of" in text and "edit:" in text and "ROME moves" in text
    assert "counterfact" in text and "tokens" in text and "generation" in text
    assert res["weights_restored"] is True
    assert res["rome"]["undone"] is True and res["rome"]["hooks_agree"] is True
    assert "FiNE moves the same fact" in text and "ROME | FiNE" in text
    assert 0 < res["fine"]["n_params"] < res["rome"]["n_params"]
    assert set(res["fine"]["after"]) == {"counterfact", "tokens", "generation"}
    assert hooks.active_hook_count(model) == 0
    assert set(res["metrics"]) >= {"reliability", "generalisation", "locality", "dppl"}

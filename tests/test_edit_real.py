"""What only a trained model shows (SmolLM2-135M): ROME, FT-L, MEMIT, FiNE, KNE and TNF-DA each move
the Eiffel Tower to Rome, and the harness sees it on all three protocols; the CLI edits, saves and reloads.

Measured when written (2 cores): P(" Rome") after the edit 0.999 (ROME, layer 5), 0.986 (FT-L,
layer 5, L-inf 5e-3), 0.999 (MEMIT, layers 1-5), 0.93 (FiNE: 5 neurons in layers 22-25, stopped
at P >= 0.9 after 10 steps), 0.987 (KNE: 47 neurons in 15 layers, 2 steps), TNF-DA (461 AtP-ranked
neurons, L_gen <= 0.05 after 9 steps) " Rome" top; " Paris" before,
p = 0.62. The first run computes the key statistics C of layers 1-5 (100k tokens, about 1.5 min
per pass on 2 cores; cached).
"""
import pytest
import torch

from kn_lens import hooks as H
from kn_lens.datasets import builtin_dataset, edit_request
from kn_lens.edit import edit
from kn_lens.edit.tnf_da import TNFDAConfig
from kn_lens.evaluate.harness import HarnessConfig, evaluate
from kn_lens.facts import Fact, predict, prompt_query, query_from_prompt

pytestmark = pytest.mark.real_model

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def request_():
    ds = builtin_dataset()
    return edit_request(ds, Fact("Eiffel Tower", "landmark_city", "Paris"), "Rome", prompt=PROMPT)


# TNF-DA ranks by attribution patching here (its exact mediation takes minutes per fact on 2 cores)
CONFIGS = {"tnf_da": TNFDAConfig(locator="atp")}


@pytest.mark.parametrize("method", ["rome", "ft_l", "memit", "fine", "kne", "tnf_da"])
def test_editor_moves_the_eiffel_tower_to_rome(default_model, request_, method):
    model = default_model
    snap = {k: v.clone() for k, v in model.state_dict().items()
            if "blocks.5." in k or "blocks.1." in k
            or k.split(".")[-1] in ("W_out", "W_in", "W_gate")}
    q = prompt_query(model, PROMPT, "Rome", request_.fact)
    other = query_from_prompt(model, "The capital of France is", "Paris")  # another relation
    (before,), (other_before,) = predict(model, [q], k=1), predict(model, [other], k=1)
    assert before.top_tokens[0] == " Paris"
    e = edit(model, [request_], method=method, config=CONFIGS.get(method))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())
    assert H.active_hook_count(model) == 0
    with model.hooks(fwd_hooks=e.hooks(model)):
        (after,), (other_after,) = predict(model, [q], k=1), predict(model, [other], k=1)
    assert after.top_tokens[0] == " Rome", after
    assert other_after.top_tokens[0] == other_before.top_tokens[0] == " Paris"
    rep = evaluate(model, e, [request_], config=HarnessConfig(n_bootstrap=0, max_new_tokens=12))
    assert rep.before["counterfact"]["ES"].mean == 0.0 and rep.after["counterfact"]["ES"].mean == 1.0
    assert rep.after["counterfact"]["ES_argmax"].mean == 1.0
    assert rep.after["tokens"]["rewrite_acc"].mean == 1.0
    assert rep.after["generation"]["rewrite_success"].mean == 1.0  # "Rome" appears as text
    assert rep.before["generation"]["rewrite_success"].mean == 0.0


def test_cli_edit_save_and_load(default_model, tmp_path, capsys, monkeypatch):
    from kn_lens import cli, models

    monkeypatch.setattr(models, "load_model", lambda name=None, **kw: default_model)
    assert cli.main(["edit", PROMPT, "Rome", "--subject", "Eiffel Tower", "--relation",
                     "landmark_city", "--old", "Paris", "--save", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "| counterfact | ES |" in out and "after:  ' Rome'" in out
    assert cli.main(["edit", PROMPT, "--load", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "after:  ' Rome'" in out and "before: ' Paris'" in out
    assert cli.main(["edit", PROMPT, "Rome", "--subject", "Colosseum"]) == 2  # not in the prompt
    assert "does not occur" in capsys.readouterr().err

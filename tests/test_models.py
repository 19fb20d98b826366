import pytest
import torch

from kn_lens import errors
from kn_lens.facts import Fact, make_query, predict
from kn_lens.models import OFFLINE_MODELS, load_model, model_info, prepared_path


def test_unknown_model_name_is_clear():
    with pytest.raises(errors.UnknownModelError, match="not-a-model-xyz"):
        load_model("not-a-model-xyz")


def test_folder_without_config(tmp_path):
    with pytest.raises(errors.ModelWeightsUnavailableError, match="config.json"):
        load_model(tmp_path)


def test_known_name_without_weights_names_model(tmp_path, monkeypatch):
    # gpt2-small is known to TransformerLens, but its weights are not here and there is no hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(errors.ModelWeightsUnavailableError, match="gpt2-small") as exc:
        load_model("gpt2-small")
    assert "load_model()" in str(exc.value)


def test_prepare_unknown_alias():
    from kn_lens.models import prepare_model

    with pytest.raises(errors.UnknownModelError):
        prepare_model("nope")


def test_cache_location_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KN_LENS_CACHE", str(tmp_path))
    assert str(prepared_path("smollm2-135m")).startswith(str(tmp_path))
    assert "llama" not in str(prepared_path("smollm2-135m"))


def test_tiny_model_info(tiny_model):
    info = model_info(tiny_model)
    assert info.n_layers == tiny_model.cfg.n_layers and info.d_mlp == tiny_model.cfg.d_mlp
    assert info.gated_mlp == bool(tiny_model.cfg.gated_mlp)


@pytest.mark.parametrize("family", ["gpt2", "gpt-neox", "llama", "gemma-3"])
def test_hf_folder_of_each_family_loads(tmp_path, family):
    """A local folder saved by the current ``transformers`` (GPT-2, GPT-NeoX, LLaMA, Gemma-3)
    loads, and the HookedTransformer computes the folder model's next-token distribution."""
    from transformer_lens import loading_from_pretrained as loading

    from kn_lens.testing import tiny_hf, tiny_tokenizer

    convert = loading.convert_hf_model_config
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    hf = tiny_hf(family, len(tok)).eval()
    folder = tmp_path / f"tiny-{family}"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    model = load_model(folder, prepend_bos=False)
    assert loading.convert_hf_model_config is convert  # the scoped conversion is undone
    text = "The capital of France is Paris, and the Eiffel Tower stands in it"
    ids = torch.tensor([tok.encode(text)])
    assert ids.shape[1] > 8  # longer than Gemma's sliding window: local layers are exercised
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids).logits, -1)
        ours = torch.log_softmax(model(ids), -1)
    assert ref.std() > 1e-3  # not a flat distribution (a trivially equal one)
    assert torch.allclose(ref, ours, atol=1e-4), float((ref - ours).abs().max())
    assert model.kn_info.source.startswith("hf_folder:")
    assert model.kn_info.gated_mlp == (family in ("llama", "gemma-3"))
    from kn_lens import contribution_scores, query_from_prompt

    s = contribution_scores(model, query_from_prompt(model, "The capital of France is", "Paris"))
    assert s.scores.shape == (2, model.cfg.d_mlp) and torch.isfinite(s.scores).all()


def test_hf_folder_without_tokenizer_is_clear(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(errors.ModelWeightsUnavailableError, match="tokenizer"):
        load_model(tmp_path / "gpt2")


@pytest.mark.real_model
def test_default_model_knows_paris(default_model):
    info = default_model.kn_info
    assert info.name == "smollm2-135m" and info.prepend_bos is False and info.fold_ln
    q = make_query(default_model, Fact("Eiffel Tower", "located_in", "Paris"),
                   "The {} is located in the city of")
    (p,) = predict(default_model, [q])
    assert p.top_tokens[0] == " Paris" and p.answer_first_rank == 0
    assert p.answer_prob > 0.5


def test_offline_registry_lists_both():
    assert {"smollm2-135m", "gemma-3-270m"} <= set(OFFLINE_MODELS)

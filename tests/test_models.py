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


def test_hf_folder_roundtrip(tmp_path):
    """A local Hugging Face folder loads through the same path as the offline models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kn_lens.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "tiny-hf"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    model = load_model(folder, prepend_bos=False)
    ids = torch.tensor([tok.encode("The capital of France is Paris")])
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids).logits, -1)
        ours = torch.log_softmax(model(ids), -1)
    assert torch.allclose(ref, ours, atol=1e-4)
    assert model.kn_info.source.startswith("hf_folder:")


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

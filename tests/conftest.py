import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def gpt2_tiny():
    from kn_lens.testing import tiny_gpt2

    return tiny_gpt2()


@pytest.fixture(scope="session")
def llama_tiny():
    from kn_lens.testing import tiny_llama

    return tiny_llama()


@pytest.fixture(params=["gpt2", "llama"], scope="session")
def tiny_model(request, gpt2_tiny, llama_tiny):
    return gpt2_tiny if request.param == "gpt2" else llama_tiny


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M), prepared into the cache on first use."""
    from kn_lens.models import load_model

    return load_model()

"""kn-lens: find where a language model keeps a fact, and edit it precisely (on TransformerLens)."""
from kn_lens.errors import (ConfigError, DataFileError, InvalidFactError, InvalidTemplateError,
                            KnLensError, ModelWeightsUnavailableError, NumericalError,
                            TokenizationError, UnknownModelError)
from kn_lens.facts import (EditRequest, Fact, LabelledPrompt, Prediction, Query, Relation,
                           answer_logprobs, answer_probs, make_query, predict, queries_for_fact,
                           query_from_prompt)
from kn_lens.models import DEFAULT_MODEL, ModelInfo, load_model, model_info, prepare_model
from kn_lens.neurons import Neuron, NeuronScores, NeuronSet

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataFileError", "InvalidFactError", "InvalidTemplateError", "KnLensError",
    "ModelWeightsUnavailableError", "NumericalError", "TokenizationError", "UnknownModelError",
    "EditRequest", "Fact", "LabelledPrompt", "Prediction", "Query", "Relation", "answer_logprobs",
    "answer_probs", "make_query", "predict", "queries_for_fact", "query_from_prompt",
    "DEFAULT_MODEL", "ModelInfo", "load_model", "model_info", "prepare_model",
    "Neuron", "NeuronScores", "NeuronSet",
]

"""kn-lens: find where a language model keeps a fact, and edit it precisely (on TransformerLens)."""
from kn_lens.errors import (ConfigError, DataFileError, InvalidFactError, InvalidTemplateError,
                            KnLensError, ModelWeightsUnavailableError, NumericalError,
                            TokenizationError, UnknownModelError)
from kn_lens.facts import (EditRequest, Fact, LabelledPrompt, Prediction, Query, Relation,
                           answer_logprobs, answer_probs, make_query, predict, queries_for_fact,
                           query_from_prompt)
from kn_lens.models import DEFAULT_MODEL, ModelInfo, load_model, model_info, prepare_model
from kn_lens.neurons import Neuron, NeuronScores, NeuronSet
from kn_lens.locate import (METHODS, ContributionConfig, IGConfig, agreement, available_methods,
                            contribution_scores, integrated_gradients, locate)
from kn_lens.locate.mediation import (AtPConfig, MediationConfig, attribution_patching,
                                      causal_mediation)
from kn_lens.edit import (Edit, KNEditConfig, LowRankDelta, WeightDelta, available_editors,
                          compose)  # the driver is kn_lens.edit.edit (the name edit is the package)
from kn_lens.evaluate import EditMetrics, evaluate_edit, perplexity, reference_slices
from kn_lens.evaluate.harness import EditReport, HarnessConfig  # kn_lens.evaluate.evaluate judges
from kn_lens.datasets import (Dataset, build_edit_requests, builtin_dataset, edit_request,
                              known_facts)

from kn_lens.study import StudyConfig, StudyResult, study  # kn_lens.study(model, file, out=...)

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataFileError", "InvalidFactError", "InvalidTemplateError", "KnLensError",
    "ModelWeightsUnavailableError", "NumericalError", "TokenizationError", "UnknownModelError",
    "EditRequest", "Fact", "LabelledPrompt", "Prediction", "Query", "Relation", "answer_logprobs",
    "answer_probs", "make_query", "predict", "queries_for_fact", "query_from_prompt",
    "DEFAULT_MODEL", "ModelInfo", "load_model", "model_info", "prepare_model",
    "Neuron", "NeuronScores", "NeuronSet",
    "METHODS", "ContributionConfig", "IGConfig", "agreement", "available_methods",
    "contribution_scores", "integrated_gradients", "locate",
    "AtPConfig", "MediationConfig", "attribution_patching", "causal_mediation",
    "Edit", "KNEditConfig", "LowRankDelta", "WeightDelta", "available_editors", "compose",
    "EditMetrics", "evaluate_edit", "perplexity", "reference_slices",
    "EditReport", "HarnessConfig",
    "Dataset", "build_edit_requests", "builtin_dataset", "edit_request", "known_facts",
    "StudyConfig", "StudyResult", "study",
]

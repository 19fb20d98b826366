"""Knowledge-neuron locators: every one maps (model, query) to a ``NeuronScores`` [layer, d_mlp].

- ``integrated_gradients`` ("ig", "ig_eos"): Dai et al. / KNE / AMIG integrated gradients
- ``contribution_scores`` ("contribution"): FiNE eq. 3 direct logit contribution
- ``causal_mediation`` / ``attribution_patching`` ("mediation", "atp"): in ``locate.mediation``
- ``locate(model, queries, method=...)``: the one driver over the registry ``METHODS``
- ``agreement(...)``: how much methods agree (top-k overlap, Spearman)
"""
from kn_lens.locate.agreement import AgreementResult, agreement
from kn_lens.locate.contribution import (
    ContributionConfig,
    contribution_scores,
    select_contribution_neurons,
)
from kn_lens.locate.integrated_gradients import (
    IGConfig,
    IGFlops,
    ig_flops,
    integrated_gradients,
    integrated_gradients_eos,
    integrated_gradients_plain,
)
from kn_lens.locate.registry import (
    METHODS, available_methods, get_method, locate, method_version, register_method,
)

__all__ = [
    "AgreementResult", "agreement",
    "ContributionConfig", "contribution_scores", "select_contribution_neurons",
    "IGConfig", "integrated_gradients", "integrated_gradients_eos", "integrated_gradients_plain",
    "IGFlops", "ig_flops",
    "METHODS", "available_methods", "get_method", "locate", "method_version", "register_method",
    "causal_mediation", "attribution_patching", "MediationConfig", "AtPConfig",
]

_MEDIATION = ("causal_mediation", "attribution_patching", "MediationConfig", "AtPConfig")


def __getattr__(name: str):
    """The mediation locators live in ``kn_lens.locate.mediation``; imported on first use."""
    if name in _MEDIATION:
        import importlib

        return getattr(importlib.import_module("kn_lens.locate.mediation"), name)
    raise AttributeError(f"module 'kn_lens.locate' has no attribute {name!r}")

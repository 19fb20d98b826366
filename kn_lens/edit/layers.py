"""Default editing layers per model, chosen by measurement (see README, "Editing").

ROME edits the MLP at the layer where restoring the MLP output of the subject's last token has
the largest average indirect effect (causal tracing, ROME Sec. 2); MEMIT spreads its update over a
range of layers ending there (GPT-J: layers 3-8). For the two offline models the layers come from
``experiments/rome_layers.py`` (the numbers are in README); other models fall back to the share
of depth ROME used for GPT-2 XL (17 of 48 layers ~ 0.35) unless a layer is passed explicitly. The
table is keyed by ``model.kn_info.name``: it is data about measured models, not behaviour that
depends on a name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# model name -> {"rome": layer, "memit": (layers...), "ft_l": layer}
MEASURED: dict[str, dict] = {
    # experiments/rome_layers.py (50 known facts; restoring the MLP outputs of a 10-layer window
    # at the subject's last token, ROME's procedure): the mean indirect effect peaks at layer 5
    # (0.37) and falls to 0.15 once the window no longer holds layer 0. A single MLP alone (window
    # 1, 20 facts): layer 0 carries almost all of it (0.32; next best 0.02), so the window-10
    # peak is the widest window that still holds MLP 0 (README discusses the choice).
    "smollm2-135m": {"rome": 5, "memit": (1, 2, 3, 4, 5), "ft_l": 5},
    # the same sweep on Gemma-3-270m (48 facts): peak at layer 5 (0.38), plateau over 0-8, 0.05
    # from layer 9 on; a single MLP: layer 3 (0.22; next best 0.03)
    "gemma-3-270m": {"rome": 5, "memit": (1, 2, 3, 4, 5), "ft_l": 5},
}

FALLBACK_DEPTH = 17 / 48  # ROME's GPT-2 XL layer as a share of depth
MEMIT_SPAN = 5  # MEMIT's GPT-2 XL range 13-17; GPT-J 3-8 (6 layers)


def _name(model) -> str:
    info = getattr(model, "kn_info", None)
    return info.name if info is not None else str(model.cfg.model_name)


def rome_layer(model: "HookedTransformer") -> int:
    table = MEASURED.get(_name(model), {})
    if "rome" in table:
        return int(table["rome"])
    return min(model.cfg.n_layers - 1, max(0, round(FALLBACK_DEPTH * (model.cfg.n_layers - 1))))


def memit_layers(model: "HookedTransformer") -> tuple[int, ...]:
    table = MEASURED.get(_name(model), {})
    if "memit" in table:
        return tuple(int(x) for x in table["memit"])
    last = rome_layer(model)
    return tuple(range(max(0, last - MEMIT_SPAN + 1), last + 1))


def ft_layer(model: "HookedTransformer") -> int:
    table = MEASURED.get(_name(model), {})
    return int(table.get("ft_l", rome_layer(model)))

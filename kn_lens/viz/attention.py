"""circuitsvis views of attention and knowledge synapses, for Jupyter (returns the HTML object;
nothing opens a browser). Inputs are plain data: tokens and patterns as arrays or tensors."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["attention_view", "synapse_view"]


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def attention_view(tokens: Sequence[str], attention: Any):
    """``circuitsvis.attention.attention_patterns`` for ``attention`` of shape [head, query, key]
    over ``tokens``. Returns a ``RenderedHTML`` (shows itself in a notebook; ``str()`` is HTML)."""
    from circuitsvis.attention import attention_patterns

    a = _array(attention)
    if a.ndim != 3 or a.shape[1] != len(tokens) or a.shape[2] != len(tokens):
        raise ValueError(f"attention must be [head, {len(tokens)}, {len(tokens)}] for "
                         f"{len(tokens)} tokens, got {a.shape}")
    return attention_patterns(tokens=list(tokens), attention=a)


def synapse_view(tokens: Sequence[str], patterns: Any, mask: Any | None = None, *,
                 layer: int | None = None):
    """Explore knowledge synapses (QL eq. 6).

    ``patterns`` is [layer, head, query, key] (``kn_lens.analysis.synapses.attention_patterns``),
    ``mask`` the synapse mask [layer, head, key] (``Synapses.mask``). With ``layer`` the view shows
    that layer's heads; without, one panel per layer (the mean over its heads, QL's 1/H average).
    With a mask, only the synapse columns keep their attention (other entries are zeroed), so the
    view shows which keys were selected and by whom.
    """
    p = _array(patterns)
    if p.ndim != 4:
        raise ValueError(f"patterns must be [layer, head, query, key], got {p.shape}")
    if mask is not None:
        m = _array(mask).astype(bool)
        if m.shape != (p.shape[0], p.shape[1], p.shape[3]):
            raise ValueError(f"mask must be {(p.shape[0], p.shape[1], p.shape[3])}, got {m.shape}")
        p = p * m[:, :, None, :]
    if layer is not None:
        if not 0 <= layer < p.shape[0]:
            raise ValueError(f"layer {layer} outside 0..{p.shape[0] - 1}")
        return attention_view(tokens, p[layer])
    return attention_view(tokens, p.mean(axis=1))

"""circuitsvis views of attention, knowledge synapses and per-token values, offline.

circuitsvis's ``RenderedHTML`` prints (``str()``) HTML that loads its JavaScript from a CDN, and
its notebook display first probes the internet (a 1 s timeout per view) before falling back to
the inlined bundle; without internet the CDN version renders nothing. Every view here is an
:class:`OfflineView`: the inlined bundle (``RenderedHTML.local_src``) in notebooks, in ``str()``
and in :func:`save_html`, which writes a standalone page (the ~1.3 MB bundle once per page, however
many views it holds). Inputs are plain data: tokens and arrays or tensors. Nothing opens a browser
(:mod:`kn_lens.viz.browser` renders a saved page headless, for tests and screenshots).
"""
from __future__ import annotations

import html as _html
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kn_lens.errors import ConfigError

__all__ = ["OfflineView", "attention_view", "synapse_view", "token_view", "save_html"]

# <div id="circuits-vis-..." .../> <script crossorigin type="module"> BUNDLE CircuitsVis.render(...) </script>
_VIEW = re.compile(r'^\s*<div id="(?P<id>circuits-vis-[\w-]+)"(?P<attrs>[^>]*?)/?>\s*'
                   r'<script crossorigin type="module">\s*(?P<bundle>.*?)'
                   r'(?P<call>CircuitsVis\.render\(.*\))\s*</script>\s*$', re.S)
_REMOTE = re.compile(r'<script[^>]*\ssrc\s*=\s*["\']?(https?:)?//'  # <script src="https://...">
                     r'|\bimport\s[^;]{0,200}?\sfrom\s*["\'](https?:)?//', re.I)  # import .. from "https://"


class OfflineView:
    """A circuitsvis view whose HTML carries its own JavaScript (renders without internet).

    Shows itself in Jupyter (``_repr_html_``); ``str()`` / :attr:`html` is the same HTML;
    :func:`save_html` writes it to a page."""

    def __init__(self, html: str, title: str = ""):
        if not isinstance(html, str) or not html.strip():
            raise ConfigError("an OfflineView needs the view's HTML (a non-empty string)")
        if _REMOTE.search(html):
            raise ConfigError("this HTML loads a script from the network; pass circuitsvis's "
                              "RenderedHTML (its inlined local_src is used), not str() of it")
        self.html = html
        self.title = title

    @classmethod
    def of(cls, view: Any, title: str = "") -> "OfflineView":
        """An :class:`OfflineView` of ``view``: an OfflineView, a circuitsvis ``RenderedHTML``
        (its inlined ``local_src``) or an HTML string without remote scripts."""
        if isinstance(view, OfflineView):
            return view if not title or title == view.title else cls(view.html, title)
        local = getattr(view, "local_src", None)
        if isinstance(local, str):
            return cls(local, title)
        if isinstance(view, str):
            return cls(view, title)
        raise ConfigError(f"not a view: {type(view).__name__} (expected an OfflineView, a "
                          "circuitsvis RenderedHTML or an HTML string)")

    def _repr_html_(self) -> str:
        return self.html

    def __html__(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"OfflineView({self.title!r}, {len(self.html):,} characters of HTML)"


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def attention_view(tokens: Sequence[str], attention: Any, *, title: str = "") -> OfflineView:
    """``circuitsvis.attention.attention_patterns`` for ``attention`` of shape [head, query, key]
    over ``tokens``, as an :class:`OfflineView`."""
    from circuitsvis.attention import attention_patterns

    a = _array(attention)
    if a.ndim != 3 or a.shape[1] != len(tokens) or a.shape[2] != len(tokens):
        raise ValueError(f"attention must be [head, {len(tokens)}, {len(tokens)}] for "
                         f"{len(tokens)} tokens, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("attention has NaN or infinite values")
    return OfflineView.of(attention_patterns(tokens=list(tokens), attention=a), title)


def synapse_view(tokens: Sequence[str], patterns: Any, mask: Any | None = None, *,
                 layer: int | None = None, title: str = "") -> OfflineView:
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
        return attention_view(tokens, p[layer], title=title)
    return attention_view(tokens, p.mean(axis=1), title=title)


def token_view(tokens: Sequence[str], values: Any, *, labels: Sequence[str] | None = None,
               title: str = "") -> OfflineView:
    """Tokens coloured by one value each (``values`` [token], e.g. a knowledge neuron's
    activation along the prompt) or by several (``values`` [token, k] with ``labels``: one
    selectable series per neuron), as an :class:`OfflineView`."""
    from circuitsvis.tokens import colored_tokens, colored_tokens_multi

    v = _array(values)
    if v.ndim not in (1, 2) or v.shape[0] != len(tokens):
        raise ValueError(f"values must be [{len(tokens)}] or [{len(tokens)}, k] for "
                         f"{len(tokens)} tokens, got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("values have NaN or infinite entries")
    if v.ndim == 1:
        return OfflineView.of(colored_tokens(tokens=list(tokens), values=v.tolist()), title)
    import torch

    labels = list(labels) if labels is not None else [f"{i}" for i in range(v.shape[1])]
    if len(labels) != v.shape[1]:
        raise ValueError(f"{len(labels)} labels for {v.shape[1]} value series")
    return OfflineView.of(colored_tokens_multi(tokens=list(tokens), values=torch.from_numpy(v),
                                               labels=labels), title)


def save_html(views: Any, path: str | os.PathLike, *, title: str = "kn-lens views") -> Path:
    """Write ``views`` (one view, a sequence of them, or a mapping title -> view; each an
    :class:`OfflineView`, a circuitsvis ``RenderedHTML`` or HTML without remote scripts) as one
    standalone HTML page that renders without internet. The circuitsvis bundle is written once
    when the views share it (they do within one circuitsvis version). Atomic: the page appears
    whole or not at all. Returns the path."""
    if isinstance(views, Mapping):
        items = [OfflineView.of(v, str(k)) for k, v in views.items()]
    elif isinstance(views, (list, tuple)):
        items = [OfflineView.of(v) for v in views]
    else:
        items = [OfflineView.of(views)]
    if not items:
        raise ConfigError("save_html needs at least one view")
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"save_html writes an .html file, not {path.name!r}")
    parts = [_VIEW.match(v.html) for v in items]
    shared = all(parts) and len({m.group("bundle") for m in parts}) == 1
    body = []
    for v, m in zip(items, parts):
        if v.title:
            body.append(f"<h3>{_html.escape(v.title)}</h3>")
        if shared:  # the view's root element and its render call; the bundle is in <head>
            body.append(f'<div id="{m.group("id")}"{m.group("attrs").rstrip()}></div>\n'
                        f'<script>{m.group("call")}</script>')
        else:
            body.append(v.html)
    head = f"<script>{parts[0].group('bundle')}</script>" if shared else ""
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{_html.escape(title)}</title>\n{head}\n</head>\n"
            "<body style=\"font-family: sans-serif\">\n" + "\n".join(body) + "\n</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

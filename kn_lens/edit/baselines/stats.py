"""Second-moment statistics of an MLP's keys, C = E[k k^T] (ROME eq. 2 / MEMIT eq. 11).

``k`` is what ``W_out`` reads (``blocks.{l}.mlp.hook_post``: act(gate) * up for gated MLPs),
collected at every token position of local prose: Jane Austen's *Emma*, *Mansfield Park* and *Sense
and Sensibility* (``STATS_BOOKS``), which are disjoint from the novels that dPPL is measured on
(``kn_lens.evaluate.perplexity.DEFAULT_BOOKS``: *Pride and Prejudice*, *Persuasion*), so an edit's
perplexity is never measured on the text its statistics came from. ROME / MEMIT use 100,000
Wikipedia samples; Wikipedia ships in no package reachable here.

C is uncentred (ROME's ``mom2``), accumulated in float64 over ``n_tokens`` tokens (default
100,000; the count is printed when computed) in windows of ``window`` tokens (BOS first for models
that use one), and cached on disk under ``$KN_LENS_CACHE/stats/`` keyed by the model's metadata, a
fingerprint of its embedding matrix, the layer, the books, the token count and the window (edits
never change the embedding, so statistics computed once serve a sequence of edits), and in memory.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens import hooks as H
from kn_lens.backend import stop_before
from kn_lens.errors import ConfigError, DataFileError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

STATS_BOOKS = ("emma", "mansfieldpark", "sensesensibility")
DEFAULT_TOKENS = 100_000
_MEMORY: dict[str, Tensor] = {}


def _fingerprint(model) -> str:
    from kn_lens.backend import embedding_matrix
    from kn_lens.models import model_info

    # the weights decide the statistics, not where or through which model class they were run
    # (and caches written before ModelInfo recorded device / backend keep their keys)
    info = {k: v for k, v in model_info(model).to_dict().items() if k not in ("device", "backend")}
    w = embedding_matrix(model, slice(0, 64)).detach().float().cpu()
    h = hashlib.sha1(json.dumps(info, sort_keys=True).encode())
    h.update(w.numpy().tobytes())
    h.update(str(tuple(model.W_E.shape)).encode())
    return h.hexdigest()[:16]


def _key(model, layer: int, books: Sequence[str], n_tokens: int, window: int) -> str:
    return f"{_fingerprint(model)}-L{layer}-{'+'.join(books)}-{n_tokens}-w{window}"


def _cache_file(model, key: str):
    from kn_lens.models import cache_dir, model_info

    name = model_info(model).name.replace("/", "_")
    return cache_dir() / "stats" / name / f"{key}.pt"


def stats_windows(model: "HookedTransformer", n_tokens: int, window: int,
                  books: Sequence[str] = STATS_BOOKS) -> Tensor:
    """``[n_windows, window]`` token rows covering ``n_tokens`` text tokens of ``books``."""
    from kn_lens.evaluate.perplexity import reference_tokens

    if n_tokens < 1 or window < 2:
        raise ConfigError(f"need n_tokens >= 1 and window >= 2 (got {n_tokens}, {window})")
    window = min(window, model.cfg.n_ctx)
    bos = bool(model.cfg.default_prepend_bos)
    width = window - 1 if bos else window
    n_rows = -(-n_tokens // width)
    ids = reference_tokens(model, books, min_tokens=n_rows * width)
    if n_rows * width > ids.numel():
        raise DataFileError(f"{'+'.join(books)} has {ids.numel()} tokens, fewer than the "
                            f"{n_rows * width} asked for second-moment statistics")
    rows = ids[: n_rows * width].view(n_rows, width)
    if bos:
        bos_id = model.tokenizer.bos_token_id
        rows = torch.cat([torch.full((n_rows, 1), bos_id, dtype=torch.long, device="cpu"), rows],
                         dim=1)
    return rows


@torch.no_grad()
def second_moments(model: "HookedTransformer", layers: Sequence[int], *,
                   n_tokens: int = DEFAULT_TOKENS, window: int = 256,
                   books: Sequence[str] = STATS_BOOKS, batch_size: int = 8, cache: bool = True,
                   verbose: bool = True) -> dict[int, Float[Tensor, "d_mlp d_mlp"]]:
    """C_l = E[k k^T] of ``hook_post`` at every layer in ``layers`` (one pass for all of them),
    from the in-memory or disk cache when present (``cache=False``: computed afresh and not stored).
    Returns float32 matrices on the CPU."""
    layers = sorted({int(x) for x in layers})
    if not layers:
        raise ConfigError("second_moments needs at least one layer")
    for layer in layers:
        if not 0 <= layer < model.cfg.n_layers:
            raise ConfigError(f"layer {layer} outside the model's {model.cfg.n_layers} layers")
    window = min(window, model.cfg.n_ctx)
    books = tuple(books)
    out: dict[int, Tensor] = {}
    todo = []
    for layer in layers:
        key = _key(model, layer, books, n_tokens, window)
        if cache and key in _MEMORY:
            out[layer] = _MEMORY[key]
            continue
        path = _cache_file(model, key)
        if cache and path.exists():
            try:
                out[layer] = _MEMORY[key] = torch.load(path, weights_only=True)["C"]
                continue
            except Exception:  # a corrupt cache file is recomputed, never trusted
                path.unlink(missing_ok=True)
        todo.append(layer)
    if not todo:
        return out
    t0 = time.perf_counter()
    rows = stats_windows(model, n_tokens, window, books)
    d = model.cfg.d_mlp
    # float64 sums on the CPU (exact enough for 100k tokens; MPS has no float64)
    acc = {layer: torch.zeros(d, d, dtype=torch.float64, device="cpu") for layer in todo}
    count = 0
    store: dict[str, Tensor] = {}
    fwd = [h for layer in todo for h in H.cache_hook(H.mlp_post(layer), store)]
    bos = int(bool(model.cfg.default_prepend_bos))
    for s in range(0, rows.shape[0], batch_size):
        toks = rows[s:s + batch_size].to(model.cfg.device)
        with model.hooks(fwd_hooks=fwd):
            model(toks, **stop_before(model, max(todo) + 1))
        for layer in todo:
            k = store[H.mlp_post(layer)][:, bos:].reshape(-1, d).double().cpu()
            acc[layer] += k.T @ k
        count += toks[:, bos:].numel()
    seconds = time.perf_counter() - t0
    for layer in todo:
        C = (acc[layer] / count).float()
        if not torch.isfinite(C).all():
            raise DataFileError(f"second moment of layer {layer} is not finite")
        key = _key(model, layer, books, n_tokens, window)
        out[layer] = C
        if cache:
            _MEMORY[key] = C
            path = _cache_file(model, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"C": C, "n_tokens": count, "books": books, "layer": layer,
                        "window": window, "seconds": seconds}, tmp)
            tmp.replace(path)
    if verbose:
        print(f"[kn-lens] second moments C = E[k k^T] of layers {todo}: {count} tokens of "
              f"{', '.join(books)} in {seconds:.1f} s" + (" (cached)" if cache else ""), file=sys.stderr)
    return out


def second_moment(model: "HookedTransformer", layer: int, **kw) -> Float[Tensor, "d_mlp d_mlp"]:
    """C = E[k k^T] of one layer (see :func:`second_moments`)."""
    return second_moments(model, [layer], **kw)[int(layer)]

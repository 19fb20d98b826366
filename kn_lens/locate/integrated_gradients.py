"""Integrated-gradients knowledge-neuron attribution (Dai et al. 2022; KNE eq. 4-5; QL App. A.4).

For every layer ``l`` on its own, the activations of that layer's FFN neurons (``hook_post``: what
``W_out`` reads) *at the answer-predicting position only* are moved along a straight path from a
baseline ``b`` to their real value ``w``; everything else in the network runs as usual. The
attribution of neuron ``i`` is ``(w_i - b_i) x mean_k dP/dw_i (b + k/m (w - b))``, ``k = 1..m``
(right Riemann sum, KNE eq. 5 / QL eq. 10), where ``P`` is the softmax probability of the answer
token. Baselines:

- ``"zero"`` (Dai et al.): ``b = 0``.
- ``"eos"`` (Chen et al.'s AMIG, QL eq. 16-17): ``b`` = the same layer's activations at the same
  position when the model reads a *baseline prompt* of the same length made of end-of-sequence
  tokens (``q'_ik = <eos>``; a BOS the model always prepends is kept in place). QL eq. 18's
  extra per-word aggregation and normalisation is not applied: scores stay on the probability
  scale so that completeness holds.

Multi-token answers (KNE eq. 4): each answer token ``a_j`` is predicted teacher-forced at its own
position ``p_j``; the neurons at ``p_j`` are integrated against ``P(a_j | prompt, a_<j)``. The
per-token maps are kept in ``NeuronScores.per_token`` and summed into ``scores``.

Two implementations give the same numbers:

- :func:`integrated_gradients_plain` is the textbook one: for each layer and answer token, a full
  forward over the whole input with a hook that overwrites layer ``l`` at ``p_j``, then a backward.
- :func:`integrated_gradients` (fast, the default) uses what a scaled neuron cannot change. One
  clean forward records every block's residual stream and every attention layer's keys and
  values. Scaling layer ``l`` at ``p_j`` leaves everything before layer ``l``'s MLP output and
  every position ``< p_j`` unchanged, and ``P(a_j)`` is read at ``p_j``; so only the single
  position ``p_j`` is recomputed, from layer ``l``'s ``W_out`` on: the path point times ``W_out``
  is added to the cached clean residual, then blocks ``l+1..`` run on that one position,
  attending to the cached keys/values of the earlier positions, and the unembedding and softmax
  follow. Many rows (``chunk``: path points x layers) share one forward/backward, built as a
  staircase: rows of layer ``l`` join the batch right after block ``l``, so no row computes
  anything before its own layer. That is the FLOP floor of exact IG (``ig_flops``; the benchmark
  prints the ratio): the blocks are :func:`kn_lens._fast.prefix_block` (the prefix keys used
  once for the whole batch, rotary folded into them, no per-row copies), the unembedding is
  :func:`kn_lens._fast.answer_prob` (the softmax over the vocabulary reduced chunk by chunk with
  its gradient in the same sweep, no ``rows x d_vocab`` logits), and the backward runs through
  the one position and asks for no weight gradient. Architectures ``prefix_block`` does not
  cover, and a model with hooks attached (which such blocks would not all fire), run
  TransformerLens' own forward of the one position from the batch's lowest layer instead
  (``start_at_layer``, a frozen key/value cache, hooks that overwrite ``mlp_post`` and let the
  rows of later layers enter at their own block); ``extras["blocks"]`` says which ran.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens import _fast, hooks
from kn_lens.backend import is_bridge
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import Query
from kn_lens.models import model_info
from kn_lens.neurons import NeuronScores

Baseline = Literal["zero", "eos"]


@dataclass(frozen=True, kw_only=True)
class IGConfig:
    """Settings of integrated gradients."""

    steps: int = 20  # m, Riemann steps: Dai et al. 2022 / KNE eq. 5 / QL eq. 10 use m = 20
    baseline: Baseline = "zero"  # "zero": Dai et al.; "eos": Chen et al. AMIG (QL eq. 16-17)
    # most rows (path points x layers) per forward/backward: bounds memory (no logits are kept:
    # SmolLM2's 600 rows add ~0.1 GiB, Gemma-3's 360 ~0.26 GiB); 640 = every row of a 32-layer
    # model at m = 20 in one call (fewer, larger matmuls: ~4 % faster than 200 on SmolLM2);
    # never changes the result beyond float rounding, so it is not part of the config's identity
    # (equality, result-store keys)
    chunk: int = dataclasses.field(default=640, compare=False)
    layers: tuple[int, ...] | None = None  # score only these layers (others stay 0); None = all

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"IGConfig.steps must be a positive integer, got {self.steps!r}")
        if self.baseline not in ("zero", "eos"):
            raise ConfigError(f"IGConfig.baseline must be 'zero' or 'eos', got {self.baseline!r}")
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ConfigError(f"IGConfig.chunk must be a positive integer, got {self.chunk!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers:
                raise ConfigError("IGConfig.layers is empty; pass None for all layers")


def method_name(config: IGConfig) -> str:
    return "ig" if config.baseline == "zero" else "ig_eos"


# --------------------------------------------------------------------------- shared preparation


def _check_query(model, query: Query) -> None:
    if not isinstance(query, Query):
        raise InvalidFactError(f"expected a Query, got {type(query).__name__}; build one with "
                               "make_query() or query_from_prompt()")
    if query.n_answer == 0 or query.n_prompt == 0:
        raise InvalidFactError(f"query {query.prompt!r} has an empty prompt or answer")
    n_ctx = model.cfg.n_ctx
    if len(query.input_ids) > n_ctx:
        raise InvalidFactError(f"query {query.prompt!r} has {len(query.input_ids)} tokens, more "
                               f"than the model's context ({n_ctx})")


def _layers(model, config: IGConfig) -> list[int]:
    n = model.cfg.n_layers
    if config.layers is None:
        return list(range(n))
    bad = [x for x in config.layers if not 0 <= x < n]
    if bad:
        raise ConfigError(f"IGConfig.layers {bad} out of range for a model with {n} layers")
    return sorted(set(config.layers))


def baseline_tokens(model, query: Query) -> list[int]:
    """The AMIG baseline prompt: the query's input with every token replaced by EOS (a BOS the
    model always prepends stays in place)."""
    eos = getattr(model.tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the 'eos' IG baseline needs a tokenizer with an eos_token_id")
    toks = [int(eos)] * len(query.input_ids)
    bos = getattr(model.tokenizer, "bos_token_id", None)
    if model.cfg.default_prepend_bos and bos is not None and query.input_ids[0] == bos:
        toks[0] = int(bos)
    return toks


@torch.no_grad()
def _post_acts(model, tokens: list[int]) -> Float[Tensor, "layer pos d_mlp"]:
    store: dict = {}
    names = [hooks.mlp_post(l) for l in range(model.cfg.n_layers)]
    fwd = [h for n in names for h in hooks.cache_hook(n, store)]
    t = torch.tensor([tokens], dtype=torch.long, device=model.cfg.device)
    with model.hooks(fwd_hooks=fwd):
        model(t, return_type=None)
    return torch.stack([store[n][0] for n in names])


def _baseline_acts(model, query: Query, config: IGConfig,
                   clean_post: Float[Tensor, "layer pos d_mlp"]) -> Float[Tensor, "layer pos d_mlp"]:
    if config.baseline == "zero":
        return torch.zeros_like(clean_post)
    return _post_acts(model, baseline_tokens(model, query))


def _path(w: Tensor, b: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Path points b + k/m (w - b), k = 1..m, as [m, d_mlp], and the difference w - b."""
    alphas = torch.arange(1, steps + 1, dtype=w.dtype, device=w.device) / steps
    return b[None] + alphas[:, None] * (w - b)[None], (w - b)


def _result(model, query: Query, config: IGConfig, per_token: Tensor, extras: dict,
            method: str | None = None) -> NeuronScores:
    per_token = per_token.detach().float().cpu()
    return NeuronScores(scores=per_token.sum(0), method=method or method_name(config), query=query,
                        config=config, model=model_info(model), per_token=per_token, extras=extras)


def _answer_prob(logits: Float[Tensor, "rows d_vocab"], token: int) -> Float[Tensor, "rows"]:
    """The softmax in float32 or wider (a float64 model keeps float64)."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.softmax(wide, dim=-1)[:, token]


# --------------------------------------------------------------------------- fast


@dataclass
class _Clean:
    """One clean forward's state at every position (batch dimension dropped)."""

    post: Float[Tensor, "layer pos d_mlp"]
    base: Float[Tensor, "layer pos d_mlp"] | None  # the EOS baseline prompt's, when asked for
    resid_pre: list[Tensor]  # per layer [pos, d_model]: what block l reads
    before_mlp: list[Tensor]  # per layer [pos, d_model]: what block l's MLP output is added to
    keys: list[Tensor]  # per layer [pos, kv_head, d_head], as TransformerLens caches them
    values: list[Tensor]


@torch.no_grad()
def _clean_run(model, tokens: list[int], baseline: list[int] | None = None) -> _Clean:
    """The clean forward; with ``baseline`` (a prompt of the same length) that prompt's neurons
    from the same pass (a batch of two: the weights, which a pass over a short prompt spends its
    time reading, are read once)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    n, parallel = model.cfg.n_layers, model.cfg.parallel_attn_mlp
    store: dict = {}
    names = [hooks.mlp_post(l) for l in range(n)] + [hooks.resid_pre(l) for l in range(n)]
    names += [hooks.attn_out(l) if parallel else hooks.resid_mid(l) for l in range(n)]
    fwd = [h for name in names for h in hooks.cache_hook(name, store)]
    rows = [tokens] if baseline is None else [tokens, baseline]
    t = torch.tensor(rows, dtype=torch.long, device=model.cfg.device)
    # the keys/values as attention uses them (after q/k norms, before rotary): a key/value cache
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(rows))
    # An explicit all-ones mask: otherwise TransformerLens guesses padding from pad/BOS ids.
    # No unembedding: P(a_j) of the clean run comes with the path's last point (alpha = 1).
    with model.hooks(fwd_hooks=fwd):
        model(t, past_kv_cache=kv, attention_mask=torch.ones_like(t), stop_at_layer=n)
    resid_pre = [store[hooks.resid_pre(l)][0] for l in range(n)]
    before = [resid_pre[l] + store[hooks.attn_out(l)][0] if parallel
              else store[hooks.resid_mid(l)][0] for l in range(n)]
    post = torch.stack([store[hooks.mlp_post(l)] for l in range(n)], 1)  # [row, layer, pos, d]
    return _Clean(post[0], None if baseline is None else post[1], resid_pre, before,
                  [e.past_keys[0] for e in kv.entries], [e.past_values[0] for e in kv.entries])


def _pack(layers: list[int], steps: int, chunk: int) -> list[list[tuple[int, int, int]]]:
    """Group (layer, first step, last step) pieces into forwards of at most ``chunk`` rows."""
    piece = min(steps, chunk)
    items = [(l, s, min(s + piece, steps)) for l in layers for s in range(0, steps, piece)]
    calls: list[list[tuple[int, int, int]]] = [[]]
    rows = 0
    for it in items:
        n = it[2] - it[1]
        if rows + n > chunk and calls[-1]:
            calls.append([])
            rows = 0
        calls[-1].append(it)
        rows += n
    return calls


def _grad_prefix(model, items: list[tuple[int, Tensor]], clean: _Clean, prefix: list, pos: int,
                 token: int) -> tuple[list[Tensor], Tensor]:
    """d P(token) / d mlp_post at each path point of each (layer, points) item (and P at each
    point, the rows in item order), in one batched forward/backward of position ``pos`` alone,
    built as a staircase: the rows of layer ``l`` enter right after block ``l``'s MLP (``W_out``
    applied to the path point, added to the cached clean residual) and run blocks ``l+1..`` with
    :func:`kn_lens._fast.prefix_block` over the cached keys/values of positions ``< pos``
    (``prefix``: per layer, keys through :func:`kn_lens._fast.relative_prefix_keys`); nothing is
    computed for a row before its layer. The unembedding and softmax are
    :func:`kn_lens._fast.answer_prob` (vocabulary chunks, gradient in the same sweep)."""
    leaves = [pts.detach().clone().requires_grad_(True) for _, pts in items]
    x = None
    with torch.enable_grad():
        for layer in range(min(l for l, _ in items), model.cfg.n_layers):
            block = model.blocks[layer]
            if x is not None:
                x = _fast.prefix_block(block, x, *prefix[layer])
            new = [leaf for (l, _), leaf in zip(items, leaves) if l == layer]
            if new:
                post = torch.cat(new) if len(new) > 1 else new[0]
                entry = _fast.block_tail(block, _fast.mlp_out_from_post(block.mlp, post),
                                         clean.before_mlp[layer][pos])[:, None, :]
                x = entry if x is None else torch.cat([x, entry])
        prob = _fast.answer_prob(model, x[:, 0], token)
        return list(torch.autograd.grad(prob.sum(), leaves)), prob.detach()


def _frozen_cache(model, keys, values, upto: int, rows: int):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [
        TransformerLensKeyValueCacheEntry(
            past_keys=k[None, :upto].expand(rows, -1, -1, -1),
            past_values=v[None, :upto].expand(rows, -1, -1, -1), frozen=True)
        for k, v in zip(keys, values)
    ]
    mask = torch.ones(rows, upto, dtype=torch.int, device=keys[0].device)
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=True)


def _grad_transformer_lens(model, items: list[tuple[int, Tensor]], clean: _Clean, caches: dict,
                           pos: int, token: int) -> tuple[list[Tensor], Tensor]:
    """As :func:`_grad_prefix`, for blocks :func:`kn_lens._fast.prefix_block` does not cover:
    TransformerLens' own forward of position ``pos`` from the lowest layer of the batch
    (``start_at_layer``) with a frozen key/value cache, the neurons overwritten by a
    ``mlp_post`` hook; rows of a later layer enter at their own block with the cached clean
    residual (a ``resid_pre`` hook), so each row is exactly its per-layer computation."""
    start = min(l for l, _ in items)
    offsets, o = [], 0
    for _, pts in items:
        offsets.append((o, o + pts.shape[0]))
        o += pts.shape[0]
    rows = o
    if rows not in caches:
        caches[rows] = _frozen_cache(model, clean.keys, clean.values, pos, rows)
    leaves = [pts.detach().clone().requires_grad_(True) for _, pts in items]
    fwd = []
    for (layer, _), (a, b), leaf in zip(items, offsets, leaves):
        if layer != start:
            def enter(act: Tensor, hook, a=a, b=b, clean=clean.resid_pre[layer][pos]) -> Tensor:
                act = act.clone()
                act[a:b, 0] = clean.to(act.dtype)
                return act

            fwd.append((hooks.resid_pre(layer), enter))

        def replace(act: Tensor, hook, a=a, b=b, leaf=leaf) -> Tensor:
            act = act.clone()
            act[a:b, 0] = leaf.to(act.dtype)
            return act

        fwd.append((hooks.mlp_post(layer), replace))
    x = clean.resid_pre[start][pos][None, None, :].expand(rows, 1, -1)
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
        resid_out = model(x, start_at_layer=start, stop_at_layer=model.cfg.n_layers,
                          past_kv_cache=caches[rows])
        prob = _fast.answer_prob(model, resid_out[:, -1], token)
        return list(torch.autograd.grad(prob.sum(), leaves)), prob.detach()


def _use_prefix_blocks(model) -> bool:
    """Whether the fast IG runs its own blocks (:func:`_grad_prefix`): the architecture is covered
    and no hook is attached to the model (those blocks do not fire every hook point
    TransformerLens' forward would, e.g. the attention pattern's)."""
    return _fast.prefix_block_ok(model) and hooks.active_hook_count(model) == 0


def integrated_gradients(model, query: Query, *, config: IGConfig | None = None) -> NeuronScores:
    """Integrated-gradients attribution of every FFN neuron to ``P(answer)`` (fast, exact; on a
    TransformerBridge, which cannot restart at a block, the plain implementation).

    Returns ``NeuronScores`` with ``scores [layer, d_mlp]`` (summed over answer tokens) and
    ``per_token [answer, layer, d_mlp]``. ``extras`` holds ``p_clean`` (P(a_j) per answer token),
    the implementation name and which blocks ran (``"prefix"``: kn-lens' one-position blocks;
    ``"transformer_lens"``: TransformerLens' forward with a frozen key/value cache).
    """
    config = IGConfig() if config is None else config
    if is_bridge(model):  # no start_at_layer / TransformerLens key-value cache on a bridge
        res = integrated_gradients_plain(model, query, config=config)
        return dataclasses.replace(res, method=method_name(config), extras={
            **res.extras, "implementation": "plain (TransformerBridge)"})
    _check_query(model, query)
    layers = _layers(model, config)
    tokens = list(query.input_ids)
    own_blocks = _use_prefix_blocks(model)
    with _fast.fast_forward(model, frozen_weights=True, weight_grads=False):
        eos = baseline_tokens(model, query) if config.baseline == "eos" else None
        clean = _clean_run(model, tokens, eos)
        base = torch.zeros_like(clean.post) if eos is None else clean.base
        L, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
        per_token = torch.zeros(query.n_answer, L, d_mlp, device="cpu")
        p_clean = []
        calls = _pack(layers, config.steps, config.chunk)
        for j, (pos, tok) in enumerate(zip(query.answer_positions, query.answer_ids)):
            paths = {l: _path(clean.post[l, pos], base[l, pos], config.steps) for l in layers}
            gsum = {l: torch.zeros(d_mlp, dtype=torch.float32, device=clean.post.device)
                    for l in layers}
            prefix = []
            if own_blocks:
                prefix = [(_fast.relative_prefix_keys(model.blocks[l].attn, clean.keys[l][:pos]),
                           clean.values[l][:pos]) for l in range(L)]
            caches: dict = {}
            for call in calls:
                items = [(l, paths[l][0][s0:s1]) for l, s0, s1 in call]
                grads, probs = (_grad_prefix(model, items, clean, prefix, pos, tok) if own_blocks
                                else _grad_transformer_lens(model, items, clean, caches, pos, tok))
                row = 0
                for (l, s0, s1), g in zip(call, grads):
                    gsum[l] += g.float().sum(0)
                    row += s1 - s0
                    if l == layers[-1] and s1 == config.steps:  # alpha = 1: the clean run
                        p_clean.append(float(probs[row - 1]))
            for l in layers:
                per_token[j, l] = (paths[l][1].float() * gsum[l] / config.steps).cpu()
    return _result(model, query, config, per_token,
                   {"p_clean": p_clean, "implementation": "fast",
                    "blocks": "prefix" if own_blocks else "transformer_lens"})


# --------------------------------------------------------------------------- the FLOP floor


@dataclass(frozen=True)
class IGFlops:
    """The matrix-multiply FLOPs exact IG cannot avoid for one query (forward + the backward to
    the scaled activations only, no weight gradients), by part. Per answer token at position
    ``p`` and per row (path point x layer ``l``): ``W_out`` of layer ``l``; every block ``l+1..``
    on the one position (q/k/v/o projections, scores and values over the ``p + 1`` positions it
    attends to (at most the window for local layers), the MLP's ``W_in`` (and ``W_gate``) and
    ``W_out``); the full unembedding (``P`` is a softmax over the vocabulary: every logit is
    needed, and its backward multiplies ``dP/dlogits`` by the whole ``W_U``). A backward costs
    what its forward costs (an input gradient of ``x W`` is ``g W^T``), plus the gradients of the
    answer position's own key and value. Norms, activations and softmaxes are not counted."""

    blocks: int
    w_out: int
    unembed: int
    rows: int  # forward rows: path points x layers x answer tokens

    @property
    def total(self) -> int:
        return self.blocks + self.w_out + self.unembed


def ig_flops(model, query: Query, *, config: IGConfig | None = None) -> IGFlops:
    """:class:`IGFlops` of ``query`` under ``config`` (see there for what is counted)."""
    config = IGConfig() if config is None else config
    _check_query(model, query)
    cfg = model.cfg
    layers = _layers(model, config)
    n_q, d_head, d_model, d_mlp = cfg.n_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    n_kv = cfg.n_heads if cfg.ungroup_grouped_query_attention else \
        (cfg.n_key_value_heads or cfg.n_heads)
    proj = 2 * d_model * (n_q + 2 * n_kv) * d_head + 2 * n_q * d_head * d_model \
        + 2 * (3 if cfg.gated_mlp else 2) * d_model * d_mlp
    blocks = w_out = unembed = rows = 0
    for pos in query.answer_positions:
        keys = []
        for b in model.blocks:
            window = cfg.window_size if getattr(b.attn, "attn_type", "global") == "local" else None
            keys.append(pos + 1 if window is None else min(pos + 1, window))
        # forward: projections + scores and values; backward: the same + own key and value
        per_block = [2 * proj + 8 * n_q * d_head * k + 4 * n_q * d_head for k in keys]
        for l in layers:
            blocks += config.steps * sum(per_block[l + 1:])
        n = config.steps * len(layers)
        rows += n
        w_out += n * 2 * 2 * d_mlp * d_model
        unembed += n * 2 * 2 * d_model * cfg.d_vocab
    return IGFlops(blocks=blocks, w_out=w_out, unembed=unembed, rows=rows)


# --------------------------------------------------------------------------- plain reference


def _grad_plain(model, layer: int, tokens: list[int], points: Tensor, pos: int,
                token: int) -> Float[Tensor, "rows d_mlp"]:
    rows = points.shape[0]
    leaf = points.detach().clone().requires_grad_(True)

    def replace(act: Tensor, hook) -> Tensor:
        act = act.clone()
        act[:, pos] = leaf.to(act.dtype)
        return act

    t = torch.tensor([tokens] * rows, dtype=torch.long, device=model.cfg.device)
    with torch.enable_grad(), model.hooks(fwd_hooks=[(hooks.mlp_post(layer), replace)]):
        logits = model(t)
        prob = _answer_prob(logits[:, pos], token)
        (grad,) = torch.autograd.grad(prob.sum(), leaf)
    return grad


def integrated_gradients_plain(model, query: Query, *, config: IGConfig | None = None
                               ) -> NeuronScores:
    """The straightforward per-layer IG (full forward + backward for every layer and answer
    token): the reference the fast implementation is tested and benchmarked against."""
    config = IGConfig() if config is None else config
    _check_query(model, query)
    layers = _layers(model, config)
    tokens = list(query.input_ids)
    post = _post_acts(model, tokens)
    base = _baseline_acts(model, query, config, post)
    L, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    per_token = torch.zeros(query.n_answer, L, d_mlp, device="cpu")
    for j, (pos, tok) in enumerate(zip(query.answer_positions, query.answer_ids)):
        for l in layers:
            points, diff = _path(post[l, pos], base[l, pos], config.steps)
            gsum = torch.zeros(d_mlp, dtype=torch.float32, device=points.device)
            for s in range(0, config.steps, config.chunk):
                gsum += _grad_plain(model, l, tokens, points[s:s + config.chunk], pos,
                                    tok).float().sum(0)
            per_token[j, l] = (diff.float() * gsum / config.steps).cpu()
    # the registry name ("ig_plain", whichever baseline: config.baseline says which)
    return _result(model, query, config, per_token, {"implementation": "plain"}, "ig_plain")


def integrated_gradients_eos(model, query: Query, *, config: IGConfig | None = None
                             ) -> NeuronScores:
    """IG with Chen et al.'s end-of-sequence baseline (AMIG; registered as ``"ig_eos"``)."""
    if config is None:
        config = IGConfig(baseline="eos")
    elif config.baseline != "eos":
        raise ConfigError("integrated_gradients_eos needs IGConfig(baseline='eos'); use "
                          "integrated_gradients for the zero baseline")
    return integrated_gradients(model, query, config=config)


def path_endpoint_probs(model, query: Query, layer: int, *, config: IGConfig | None = None,
                        answer_index: int = 0) -> tuple[float, float]:
    """P(a_j) with layer ``layer``'s neurons at the answer position at their real value and at the
    baseline: IG completeness says the layer's attributions sum to the difference."""
    config = IGConfig() if config is None else config
    tokens = list(query.input_ids)
    post = _post_acts(model, tokens)
    base = _baseline_acts(model, query, config, post)
    pos, tok = query.answer_positions[answer_index], query.answer_ids[answer_index]
    out = []
    for value in (post[layer, pos], base[layer, pos]):
        def put(act: Tensor, hook, value=value) -> Tensor:
            act = act.clone()
            act[:, pos] = value.to(act.dtype)
            return act

        with torch.no_grad(), model.hooks(fwd_hooks=[(hooks.mlp_post(layer), put)]):
            logits = model(torch.tensor([tokens], device=model.cfg.device))
        out.append(float(_answer_prob(logits[:, pos], tok)[0]))
    return out[0], out[1]

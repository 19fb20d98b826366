"""From an :class:`~kn_lens.facts.EditRequest` to what editors train on, and request checks.

- :func:`check_requests` -- every editor's input check (typed errors, before any model work): the
  subject is spelled in every rewrite prompt, the new object is non-empty, tokenises faithfully
  and differs from the old one, prompts fit the context.
- :func:`rewrite_queries` -- the rewrite prompt (and its random-prefix variants, ROME's context
  templates / TNF-DA eq. 8) teacher-forcing the new object, with each query's edit site (the
  subject's last token).
- :func:`essence_queries` -- "{subject} is a"-style prompts for the KL term.
- :func:`default_layers` -- the editing layer(s) per model (see :mod:`kn_lens.edit.layers`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from kn_lens.errors import ConfigError, InvalidFactError, KnLensError
from kn_lens.facts import EditRequest, Query, encode_answer, prompt_query, subject_last_position

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

ESSENCE_TEMPLATE = "{} is a"  # ROME's KL prompt (compute_v.py)


def check_requests(model: "HookedTransformer", requests: Sequence[EditRequest]) -> list[EditRequest]:
    """Validate edit requests for ``model``; returns them as a list. Raises ConfigError for an
    empty list or a non-request, InvalidFactError / TokenizationError naming the request."""
    if isinstance(requests, EditRequest):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise ConfigError("no edit requests: pass a list with at least one EditRequest")
    for k, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise ConfigError(f"request {k} is a {type(r).__name__}, not an EditRequest")
        where = f"request {k} ({r.fact.subject!r}: {r.fact.object!r} -> {r.new_object!r})"
        if not r.new_object.strip():
            raise InvalidFactError(f"{where}: empty new object")
        if r.new_object.strip() == r.fact.object.strip():
            raise InvalidFactError(f"{where}: the new object equals the old one")
        try:
            new_ids = encode_answer(model.tokenizer, " " + r.new_object)
            old_ids = encode_answer(model.tokenizer, " " + r.fact.object)
        except KnLensError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        if new_ids == old_ids:
            raise InvalidFactError(f"{where}: old and new objects tokenise identically")
        for p in r.prompts:
            if r.fact.subject not in p:
                raise InvalidFactError(f"{where}: the subject {r.fact.subject!r} does not occur in "
                                       f"the rewrite prompt {p!r}")
            q = prompt_query(model, p, r.new_object, r.fact)
            if len(q.input_ids) > model.cfg.n_ctx:
                raise InvalidFactError(f"{where}: prompt {p!r} is longer than the context")
    return requests


def rewrite_queries(model: "HookedTransformer", request: EditRequest, *,
                    prefixes: Sequence[str] = ("",), target: str | None = None,
                    all_prompts: bool = True) -> list[Query]:
    """Rewrite prompt(s) x ``prefixes`` ("" is the bare prompt) teacher-forcing ``target``
    (default: the new object). Prefixes are joined to the prompt's text and tokenised with it."""
    obj = request.new_object if target is None else target
    prompts = request.prompts if all_prompts else request.prompts[:1]
    return [prompt_query(model, p, obj, request.fact, prefix=pre) for p in prompts for pre in prefixes]


def essence_queries(model: "HookedTransformer", request: EditRequest,
                    templates: Sequence[str] = (ESSENCE_TEMPLATE,)) -> list[Query]:
    """"{subject} is a"-style prompts (their answer slot is unused: KL reads the distributions)."""
    out = []
    for t in templates:
        if t.count("{}") != 1:
            raise ConfigError(f"essence template {t!r} needs exactly one '{{}}'")
        out.append(prompt_query(model, t.replace("{}", request.fact.subject), request.fact.object,
                                request.fact))
    return out


def sites(model: "HookedTransformer", queries: Sequence[Query]) -> list[int]:
    """The subject's last token in each query (ROME / MEMIT's edit site)."""
    return [subject_last_position(model, q) for q in queries]


def context_prefixes(request: EditRequest, n: int | None) -> tuple[str, ...]:
    """The bare prompt ("") followed by ``n`` of the request's seeded random prefixes (all when
    ``n`` is None)."""
    pre = request.prefixes if n is None else request.prefixes[:n]
    if n is not None and n > len(request.prefixes):
        raise ConfigError(f"{n} prefixes asked for but the request has {len(request.prefixes)} "
                          "(build_edit_requests(n_prefixes=...))")
    return ("",) + tuple(pre)


def check_layer(model: "HookedTransformer", layer: int, what: str = "layer") -> int:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < model.cfg.n_layers:
        raise ConfigError(f"{what} {layer!r} outside the model's layers 0..{model.cfg.n_layers - 1}")
    return layer

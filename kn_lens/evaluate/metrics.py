"""Knowledge-modification metrics of QL (Sec. 2.2, App. A.5): reliability, generalisation, locality,
their average, and dPPL.

A.5 (after Yao et al. 2023 / EasyEdit) defines each metric as an expected top-1 indicator,
``E 1{argmax_y f_edited(y | x) = y_target}``. For a multi-token target kn-lens uses EasyEdit's
teacher-forced token accuracy: the share of the target's tokens that are the argmax given the
prompt and the target's previous tokens (for a one-token target this is exactly A.5's indicator).

- **Erasure** (target = the original answer o): QL "invert[s] their values (i.e., 1 - value)":
  reliability = 1 - accuracy on the edited query(ies), generalisation = 1 - accuracy on the
  neighbour (paraphrase) queries of the same fact. Higher is better.
- **Update** (target = the new answer o'): reliability / generalisation = accuracy of o' on the
  edited / neighbour queries (queries whose answer is o', see :func:`retarget`).
- **Locality** (both): on out-of-scope queries (other facts), the share of tokens whose argmax
  after the edit equals the argmax before it (teacher-forced on each query's own answer), i.e.
  A.5's ``1{f_edited(x) = f(x)}``.
- **Average**: mean of the three; **dPPL** = (PPL_after - PPL_before) / PPL_before on reference
  slices (QL: lower is better).

Probabilities of the targets before and after are recorded too (``p_before``/``p_after``), since a
0/1 accuracy hides how far a probability moved.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

from torch import Tensor

from kn_lens.edit.delta import Edit
from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.evaluate.perplexity import PreparedReference, perplexity, relative_ppl_change
from kn_lens.evaluate.scoring import score
from kn_lens.facts import Query, encode_answer
from kn_lens.models import ModelInfo, model_info

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Mode = Literal["erasure", "update"]
Apply = Literal["auto", "hooks", "materialise"]


@dataclass(frozen=True)
class QueryOutcome:
    """One query measured before and after an edit."""

    prompt: str
    target: str
    accuracy_before: float  # teacher-forced token accuracy of the target (A.5 indicator for 1 token)
    accuracy_after: float
    p_before: float  # P(target), whole target, teacher-forced
    p_after: float
    top1_before: str  # greedy next token after the prompt
    top1_after: str
    unchanged: float  # share of target positions whose argmax is the same before and after


@dataclass(frozen=True)
class EditMetrics:
    """QL Table 2 / 3 row for one edit (higher is better for all but dPPL)."""

    mode: str
    reliability: float
    generalisation: float  # NaN when no neighbour queries were given
    locality: float  # NaN when no out-of-scope queries were given
    average: float  # mean of the defined metrics among the three
    dppl: float | None  # None when no reference slices were given
    ppl_before: float | None
    ppl_after: float | None
    edited: tuple[QueryOutcome, ...]
    neighbours: tuple[QueryOutcome, ...]
    out_of_scope: tuple[QueryOutcome, ...]
    n_params: int
    edit_description: str
    applied_via: str
    model: ModelInfo
    extras: dict = field(default_factory=dict, compare=False)

    def summary(self) -> dict:
        return {"mode": self.mode, "reliability": self.reliability,
                "generalisation": self.generalisation, "locality": self.locality,
                "average": self.average, "dppl": self.dppl, "n_params": self.n_params}


def retarget(model: "HookedTransformer", query: Query, new_answer: str) -> Query:
    """The same prompt with another answer (o'), for Update's reliability/generalisation."""
    text = new_answer if new_answer.startswith(" ") else " " + new_answer
    if not text.strip():
        raise InvalidFactError("empty new answer")
    return Query(query.fact.with_object(text.strip()), query.template, query.prompt, text,
                 query.prompt_ids, encode_answer(model.tokenizer, text), query.template_index)


@dataclass(frozen=True)
class _Measure:
    argmax: tuple[tuple[int, ...], ...]  # per query, argmax at each target position
    accuracy: tuple[float, ...]
    prob: tuple[float, ...]


def _measure(model, queries: Sequence[Query], fwd_hooks: list, batch_size: int = 16) -> _Measure:
    scores = score(model, queries, fwd_hooks=fwd_hooks, batch_size=batch_size)
    return _Measure(tuple(s.argmax for s in scores), tuple(s.accuracy for s in scores),
                    tuple(s.prob for s in scores))


def _outcomes(model, queries, before: _Measure, after: _Measure) -> tuple[QueryOutcome, ...]:
    tok = model.tokenizer
    out = []
    for k, q in enumerate(queries):
        same = sum(int(a == b) for a, b in zip(before.argmax[k], after.argmax[k])) / q.n_answer
        out.append(QueryOutcome(q.prompt, q.answer, before.accuracy[k], after.accuracy[k],
                                before.prob[k], after.prob[k], tok.decode([before.argmax[k][0]]),
                                tok.decode([after.argmax[k][0]]), same))
    return tuple(out)


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def hook_supported(model: "HookedTransformer", edit: Edit) -> bool:
    """Whether ``edit.hooks(model)`` can express the edit (else it must be materialised)."""
    try:
        edit.hooks(model, strict=False)
    except ConfigError:
        return False
    return True


@contextmanager
def edit_active(model: "HookedTransformer", edit: Edit, how: Apply = "auto", *,
           strict: bool = True) -> Iterator[list]:
    """Scope in which ``edit`` is active: yields the fwd_hooks to pass to every forward pass
    (hook mode) or ``[]`` with the weights materialised (restored exactly on exit)."""
    if how not in ("auto", "hooks", "materialise"):
        raise ConfigError(f"how must be 'auto', 'hooks' or 'materialise', not {how!r}")
    if how == "auto":
        how = "hooks" if hook_supported(model, edit) else "materialise"
    if how == "hooks":
        yield edit.hooks(model, strict=strict)
    else:
        with edit.applied(model, strict=strict):
            yield []


def evaluate_edit(model: "HookedTransformer", edit: Edit, *, edited: Sequence[Query],
                  generalisation: Sequence[Query] = (), locality: Sequence[Query] = (),
                  mode: Mode = "erasure",
                  reference: PreparedReference | Tensor | Sequence[Tensor] | None = None,
                  how: Apply = "auto", strict: bool = True, batch_size: int = 16) -> EditMetrics:
    """Measure an edit the QL way (see module doc). ``edited`` / ``generalisation`` carry
    the original answer for erasure and the new answer for update (:func:`retarget`);
    ``locality`` queries are other facts with their own answers. ``reference`` are token slices
    (:func:`kn_lens.evaluate.perplexity.reference_slices`) for dPPL, or a
    :class:`~kn_lens.evaluate.perplexity.PreparedReference` (:func:`prepare_reference`): its
    perplexity before is reused and, for an edit confined to blocks >= L, only those blocks are
    recomputed (the same numbers, several times faster when editing many facts). The edit is active only inside
    this call (through hooks, or materialised and restored bit for bit).
    """
    if mode not in ("erasure", "update"):
        raise ConfigError(f"mode must be 'erasure' or 'update', not {mode!r}")
    if not edited:
        raise ConfigError("evaluate_edit needs at least one edited query")
    groups = [list(edited), list(generalisation), list(locality)]
    flat = [q for g in groups for q in g]
    before = _measure(model, flat, [], batch_size)
    start = 0
    if isinstance(reference, PreparedReference):
        if reference.model_name != model_info(model).name:
            raise ConfigError(f"the PreparedReference was built on {reference.model_name!r}, not "
                              f"{model_info(model).name!r}")
        ppl_b = reference.ppl
        layers = [d.layer for d in edit.deltas]
        start = 0 if not layers or any(x is None for x in layers) else min(layers)
    else:
        ppl_b = None if reference is None else perplexity(model, reference)
    via = how
    with edit_active(model, edit, how, strict=strict) as fwd_hooks:
        via = "hooks" if fwd_hooks else "materialise"
        after = _measure(model, flat, fwd_hooks, batch_size)
        ppl_a = None if reference is None else perplexity(model, reference, fwd_hooks=fwd_hooks,
                                                          start_at_layer=start)

    outs, start = [], 0
    for g in groups:
        n = len(g)
        sl = slice(start, start + n)
        b = _Measure(before.argmax[sl], before.accuracy[sl], before.prob[sl])
        a = _Measure(after.argmax[sl], after.accuracy[sl], after.prob[sl])
        outs.append(_outcomes(model, g, b, a))
        start += n
    ed, nb, oos = outs
    if mode == "erasure":
        rel = 1.0 - _mean([o.accuracy_after for o in ed])
        gen = 1.0 - _mean([o.accuracy_after for o in nb]) if nb else float("nan")
    else:
        rel = _mean([o.accuracy_after for o in ed])
        gen = _mean([o.accuracy_after for o in nb]) if nb else float("nan")
    loc = _mean([o.unchanged for o in oos]) if oos else float("nan")
    defined = [x for x in (rel, gen, loc) if not math.isnan(x)]
    dppl = None if ppl_b is None else relative_ppl_change(ppl_b, ppl_a)
    if isinstance(reference, PreparedReference):
        n_ref = reference.n_tokens
    else:
        n_ref = None if reference is None else sum(int(r.numel()) - 1 for r in reference)
    return EditMetrics(mode, rel, gen, loc, _mean(defined), dppl, ppl_b, ppl_a, ed, nb, oos,
                       edit.n_params, edit.description, via, model_info(model),
                       {"reference_tokens_scored": n_ref})

"""The prompts that judge an edit, built from an :class:`~kn_lens.facts.EditRequest`.

A :class:`ProbeSet` holds, for one request, every prompt tokenised for one model with the answers
each protocol compares:

| kind | prompts | ``new`` scores | ``true`` scores |
|---|---|---|---|
| ``rewrite`` | the request's rewrite prompt(s) | the new object | the old object |
| ``paraphrase`` | the relation's other templates | the new object | the old object |
| ``prefix`` | the rewrite prompt after *held-out* random prefixes | the new object | the old object |
| ``alias`` | the rewrite prompt with the subject's aliases | the new object | the old object |
| ``neighbourhood`` | other subjects, same relation (and, when possible, same object) | the new object | the neighbour's own object |
| ``relation`` | the same subject with other relations | -- | that fact's object |

The prefix probes use prefixes drawn with a seed of their own (``"probe:"`` + the request's
fact), disjoint in purpose from ``request.prefixes``, which editors train on (ROME's contexts,
TNF-DA eq. 8): a random-prefix score measured on the training prefixes would measure memorisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

from kn_lens.errors import ConfigError, KnLensError
from kn_lens.facts import EditRequest, Query, prompt_query, query_from_prompt

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Kind = Literal["rewrite", "paraphrase", "prefix", "alias", "neighbourhood", "relation"]
KINDS: tuple[str, ...] = ("rewrite", "paraphrase", "prefix", "alias", "neighbourhood", "relation")


@dataclass(frozen=True)
class Probe:
    kind: str
    prompt: str
    true: Query  # the prompt scored with the answer that is true before the edit
    new: Query | None  # the prompt scored with the request's new object (None: relation probes)


@dataclass(frozen=True)
class ProbeSet:
    request: EditRequest
    probes: tuple[Probe, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (prompt, why) for prompts that could not be built

    def of(self, kind: str) -> tuple[Probe, ...]:
        if kind not in KINDS:
            raise ConfigError(f"unknown probe kind {kind!r}; choose one of {KINDS}")
        return tuple(p for p in self.probes if p.kind == kind)

    def queries(self) -> list[Query]:
        """Every query of the set (true and new), each once, for one batched scoring pass."""
        out: list[Query] = []
        for p in self.probes:
            out.append(p.true)
            if p.new is not None:
                out.append(p.new)
        return out

    @classmethod
    def from_request(cls, model: "HookedTransformer", request: EditRequest, *,
                     n_prefix_probes: int = 3, seed: int | str = 0) -> "ProbeSet":
        """Build the probes (see the module doc). Prompts the tokenizer cannot encode are left
        out and listed in ``skipped``; a rewrite prompt that cannot be built raises."""
        from kn_lens.datasets.edits import random_prefixes

        fact, new, old = request.fact, request.new_object, request.fact.object
        probes: list[Probe] = []
        skipped: list[tuple[str, str]] = []

        def subject_probe(kind, prompt, subject=None, prefix=""):
            t = prompt_query(model, prompt, old, fact, subject=subject, prefix=prefix)
            n = prompt_query(model, prompt, new, fact, subject=subject, prefix=prefix)
            probes.append(Probe(kind, prefix + prompt, t, n))

        for p in request.prompts:
            subject_probe("rewrite", p)  # errors here are the request's errors: raise
        for p in request.paraphrase_prompts:
            try:
                subject_probe("paraphrase", p)
            except KnLensError as exc:
                skipped.append((p, str(exc)))
        for pre in random_prefixes(n_prefix_probes, f"probe:{seed}:{fact.key()}"):
            subject_probe("prefix", request.prompts[0], prefix=pre)
        for p, alias in zip(request.alias_prompts, fact.aliases):
            try:
                subject_probe("alias", p, subject=alias)
            except KnLensError as exc:
                skipped.append((p, str(exc)))
        for lp in request.neighbourhood:
            try:
                t = query_from_prompt(model, lp.prompt, lp.answer, lp.fact)
                n = query_from_prompt(model, lp.prompt, new, lp.fact)
                probes.append(Probe("neighbourhood", lp.prompt, t, n))
            except KnLensError as exc:
                skipped.append((lp.prompt, str(exc)))
        for lp in request.relation_specificity:
            try:
                probes.append(Probe("relation", lp.prompt,
                                    query_from_prompt(model, lp.prompt, lp.answer, lp.fact), None))
            except KnLensError as exc:
                skipped.append((lp.prompt, str(exc)))
        return cls(request, tuple(probes), tuple(skipped))


def probe_sets(model: "HookedTransformer", requests: Sequence[EditRequest], **kw) -> list[ProbeSet]:
    return [ProbeSet.from_request(model, r, **kw) for r in requests]

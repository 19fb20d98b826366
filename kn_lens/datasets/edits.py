"""CounterFact-style edit requests built from a Dataset (Meng et al., ROME; TNF-DA evaluation).

For each fact, :func:`build_edit_requests` draws a new object from the relation's other objects
and gathers the prompts that judge the edit:

- rewrite prompt: the fact rendered with one template (``rewrite_template``);
- paraphrase prompts: the fact rendered with the relation's other templates (generalisation);
- neighbourhood: other subjects with the same relation AND the same original object, whose answer
  must stay (CounterFact's neighbourhood prompts). If no other subject shares the object, subjects
  of the same relation with other objects are used instead and the request is flagged in
  ``EditSet.neighbour_fallback``;
- relation specificity: the same subject with other relations and their true objects;
- alias prompts: the rewrite template rendered with each alias of the subject;
- random prefixes: short natural-ish sentences (seeded) to prepend for robustness (ROME's context
  templates, TNF-DA's random prefixes).

All prompts are rendered strings (no ``{}``); the answer follows the prompt. Every random choice
is drawn from ``random.Random`` seeded by ``(seed, fact)``, so a request does not depend on which
other facts are in the list or on their order.
"""
from __future__ import annotations

import random
import warnings
from typing import TYPE_CHECKING, Iterable, Sequence

from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import EditRequest, Fact, LabelledPrompt

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# Fixed vocabulary for random prefixes (deterministic per seed; no model needed).
_ADJ = ("old", "small", "quiet", "bright", "long", "cold", "busy", "green", "empty", "warm", "new",
        "dark", "little", "heavy", "open", "early")
_NOUN = ("house", "river", "train", "garden", "teacher", "market", "window", "road", "dog", "book",
         "city", "morning", "letter", "village", "bridge", "kitchen", "team", "meeting", "storm",
         "painting")
_VERB = ("stood", "waited", "moved", "stayed", "appeared", "opened", "closed", "changed", "started",
         "ended", "returned", "rested")
_PREP = ("near", "behind", "beside", "under", "after", "before", "across", "inside")
_OPENERS = ("Yesterday", "Last week", "In the end", "Meanwhile", "Today", "That evening", "Suddenly",
            "Later", "Once again", "For a while")


def random_prefixes(n: int, seed: int | str, *, min_sentences: int = 1, max_sentences: int = 2
                    ) -> tuple[str, ...]:
    """``n`` short natural-ish text prefixes, each ending with ``". "`` (deterministic per seed)."""
    if n < 0 or min_sentences < 1 or max_sentences < min_sentences:
        raise ConfigError("random_prefixes needs n >= 0 and 1 <= min_sentences <= max_sentences")
    rng = random.Random(f"prefix:{seed}")
    out = []
    for _ in range(n):
        sents = []
        for _ in range(rng.randint(min_sentences, max_sentences)):
            s = (f"{rng.choice(_OPENERS)}, the {rng.choice(_ADJ)} {rng.choice(_NOUN)} "
                 f"{rng.choice(_VERB)} {rng.choice(_PREP)} the {rng.choice(_NOUN)}")
            sents.append(s)
        out.append(". ".join(sents) + ". ")
    return tuple(out)


def draw_new_object(fact: Fact, pools: Sequence[Sequence[str]], rng: random.Random, *,
                    model: "HookedTransformer | None" = None,
                    token_cache: dict[str, int] | None = None) -> str:
    """A counterfactual object for ``fact``: ``rng.choice`` among the first of ``pools`` (e.g. the
    relation's objects, then every object) that has a candidate, i.e. an object other than the
    fact's own and, given ``model``, whose first token differs from the true answer's (QL's KN
    update, eq. 2, writes toward the new answer's first-token embedding; ``token_cache``: first
    tokens already known, shared across calls). The one place new objects are drawn:
    :func:`build_edit_requests` (per-fact generator) and :func:`new_objects` (one generator
    across facts)."""
    def first(text: str) -> int:
        from kn_lens.edit.kn import token_of

        if text not in cache:
            cache[text] = token_of(model, text)
        return cache[text]

    cache = {} if token_cache is None else token_cache
    own = None if model is None else first(fact.object)
    for pool in pools:
        cands = [o for o in pool if o != fact.object and (own is None or first(o) != own)]
        if cands:
            return rng.choice(cands)
    raise InvalidFactError(
        f"no object other than {fact.object!r} for {fact.key()!r}"
        + (" with a different first token" if model is not None else "")
        + ": no counterfactual (pass the new objects explicitly)")


def new_objects(facts: Sequence[Fact], *, seed: int, model: "HookedTransformer | None" = None,
                dataset=None) -> dict[Fact, str]:
    """One counterfactual object per fact (:func:`draw_new_object`), drawn in order from one
    ``random.Random(seed)``: among the relation's other objects (the dataset's, else those of
    ``facts``), falling back to every object; with ``model``, only objects whose first token
    differs from the true answer's. QL modification's update targets and CAS's default."""
    if dataset is not None:
        every = sorted({f.object for f in dataset.facts})
        of_relation = dataset.objects_of
    else:
        every = sorted({f.object for f in facts})
        by_rel: dict[str, set[str]] = {}
        for f in facts:
            by_rel.setdefault(f.relation, set()).add(f.object)
        of_relation = lambda r: sorted(by_rel[r])  # noqa: E731
    rng, tokens = random.Random(seed), {}
    return {f: draw_new_object(f, [of_relation(f.relation), every], rng, model=model,
                               token_cache=tokens) for f in facts}


class EditSet(list):
    """A list of EditRequests plus how it was built (``seed``) and which requests fell back to
    same-relation neighbours with other objects (``neighbour_fallback``: their case ids)."""

    def __init__(self, requests: Iterable[EditRequest], *, seed: int,
                 neighbour_fallback: Iterable[int] = ()) -> None:
        super().__init__(requests)
        self.seed = seed
        self.neighbour_fallback = frozenset(neighbour_fallback)


def build_edit_requests(
    dataset,
    facts: Sequence[Fact] | None = None,
    *,
    seed: int,
    n_neighbours: int = 10,  # CounterFact has 10 neighbourhood prompts per case
    n_paraphrases: int | None = None,  # None: every other template of the relation
    n_prefixes: int = 5,
    n_relation_specificity: int = 5,
    rewrite_template: int | Sequence[int] = 0,
    new_objects: Sequence[str] | None = None,
) -> EditSet:
    """One CounterFact-style :class:`EditRequest` per fact (``facts`` default: the whole dataset).

    ``rewrite_template``: the template index of every rewrite prompt, or one per fact (e.g. each
    fact's best template, :attr:`kn_lens.datasets.FactSample.templates`). ``new_objects``
    (optional, one per fact) fixes the new objects instead of drawing them. Raises
    InvalidFactError when a relation has a single object (no counterfactual possible).
    """
    from kn_lens.datasets.core import Dataset

    if not isinstance(dataset, Dataset):
        raise ConfigError("build_edit_requests needs a kn_lens.datasets.Dataset")
    if min(n_neighbours, n_prefixes, n_relation_specificity) < 0 or (
            n_paraphrases is not None and n_paraphrases < 0):
        raise ConfigError("counts (n_neighbours, n_paraphrases, n_prefixes, ...) must be >= 0")
    facts = tuple(dataset.facts if facts is None else facts)
    if new_objects is not None and len(new_objects) != len(facts):
        raise ConfigError(f"new_objects has {len(new_objects)} entries for {len(facts)} facts")
    rewrites = list(rewrite_template) if isinstance(rewrite_template, Sequence) \
        else [rewrite_template] * len(facts)
    if len(rewrites) != len(facts):
        raise ConfigError(f"rewrite_template has {len(rewrites)} entries for {len(facts)} facts")
    out: list[EditRequest] = []
    fallback: list[int] = []
    for case_id, (fact, template) in enumerate(zip(facts, rewrites)):
        rel = dataset.relation_of(fact)
        if not 0 <= template < len(rel.templates):
            raise ConfigError(f"rewrite_template {template} out of range for {rel.id!r}")
        rng = random.Random(f"edit:{seed}:{fact.key()}")
        # --- new object
        new = new_objects[case_id] if new_objects is not None else \
            draw_new_object(fact, [dataset.objects_of(rel.id)], rng)
        # --- prompts
        rewrite = rel.render(fact.subject, template)
        others = [i for i in range(len(rel.templates)) if i != template]
        if n_paraphrases is not None and n_paraphrases < len(others):
            others = sorted(rng.sample(others, n_paraphrases))
        paraphrases = tuple(rel.render(fact.subject, i) for i in others)
        # --- neighbourhood: same relation and same original object
        pool = [f for f in dataset.facts_of(rel.id) if f.object == fact.object and f.subject != fact.subject]
        if not pool and n_neighbours > 0:
            pool = [f for f in dataset.facts_of(rel.id)
                    if f.subject != fact.subject and f.object != new]
            fallback.append(case_id)
        picked = rng.sample(pool, min(n_neighbours, len(pool)))
        neighbourhood = tuple(
            LabelledPrompt(rel.render(f.subject, rng.randrange(len(rel.templates))), f.object, f)
            for f in picked
        )
        # --- relation specificity: same subject, other relations
        same_subj = [f for f in dataset.by_subject(fact.subject) if f.relation != fact.relation]
        same_subj = rng.sample(same_subj, min(n_relation_specificity, len(same_subj)))
        rel_spec = tuple(
            LabelledPrompt(dataset.relation_of(f).render(f.subject, 0), f.object, f) for f in same_subj
        )
        aliases = tuple(rel.templates[template].replace("{}", a) for a in fact.aliases)
        prefixes = random_prefixes(n_prefixes, f"{seed}:{fact.key()}")
        out.append(EditRequest(fact=fact, new_object=new, prompts=(rewrite,),
                               paraphrase_prompts=paraphrases, neighbourhood=neighbourhood,
                               relation_specificity=rel_spec, alias_prompts=aliases,
                               prefixes=prefixes, case_id=case_id))
    if fallback:
        warnings.warn(
            f"{len(fallback)} of {len(facts)} edit requests have no other subject with the same "
            "relation and object; their neighbourhood uses same-relation subjects with other "
            "objects (see EditSet.neighbour_fallback)", stacklevel=2)
    return EditSet(out, seed=seed, neighbour_fallback=fallback)


def edit_request(dataset, fact: Fact, new_object: str, *, prompt: str | None = None, seed: int = 0,
                 case_id: int = 0, **kw) -> EditRequest:
    """One CounterFact-style request for ``fact`` -> ``new_object`` (see
    :func:`build_edit_requests`; ``kw`` are its counts). ``prompt`` replaces the rewrite prompt
    (it must spell the subject); then every template of the relation is a paraphrase and the
    alias prompts are ``prompt`` with each alias in place of the subject."""
    import dataclasses

    if prompt is not None and fact.subject not in prompt:
        raise InvalidFactError(f"the subject {fact.subject!r} does not occur in the prompt {prompt!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a single request: the fallback is visible in its prompts
        req = build_edit_requests(dataset, [fact], seed=seed, new_objects=[new_object], **kw)[0]
    if prompt is None:
        return dataclasses.replace(req, case_id=case_id)
    rel = dataset.relation_of(fact)
    paraphrases = tuple(p for p in (rel.render(fact.subject, i) for i in range(len(rel.templates)))
                        if p != prompt)
    aliases = tuple(prompt.replace(fact.subject, a, 1) for a in fact.aliases)
    return dataclasses.replace(req, prompts=(prompt,), paraphrase_prompts=paraphrases,
                               alias_prompts=aliases, case_id=case_id)

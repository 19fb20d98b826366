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
from typing import Iterable, Sequence

from kn_lens.errors import ConfigError, InvalidFactError
from kn_lens.facts import EditRequest, Fact, LabelledPrompt

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
    rewrite_template: int = 0,
    new_objects: Sequence[str] | None = None,
) -> EditSet:
    """One CounterFact-style :class:`EditRequest` per fact (``facts`` default: the whole dataset).

    ``new_objects`` (optional, one per fact) fixes the new objects instead of drawing them.
    Raises InvalidFactError when a relation has a single object (no counterfactual possible).
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
    out: list[EditRequest] = []
    fallback: list[int] = []
    for case_id, fact in enumerate(facts):
        rel = dataset.relation_of(fact)
        if not 0 <= rewrite_template < len(rel.templates):
            raise ConfigError(f"rewrite_template {rewrite_template} out of range for {rel.id!r}")
        rng = random.Random(f"edit:{seed}:{fact.key()}")
        # --- new object
        if new_objects is not None:
            new = new_objects[case_id]
        else:
            candidates = [o for o in dataset.objects_of(rel.id) if o != fact.object]
            if not candidates:
                raise InvalidFactError(
                    f"relation {rel.id!r} has no object other than {fact.object!r}: no counterfactual"
                )
            new = rng.choice(candidates)
        # --- prompts
        rewrite = rel.render(fact.subject, rewrite_template)
        others = [i for i in range(len(rel.templates)) if i != rewrite_template]
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
        aliases = tuple(rel.templates[rewrite_template].replace("{}", a) for a in fact.aliases)
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

"""The one vocabulary of kn-lens: Relation, Fact, Query, EditRequest; answer tokenisation.

A :class:`Relation` holds ParaRel-style paraphrase templates with one ``{}`` for the subject; the
object follows the rendered prompt (``"The capital of {} is"`` + ``" Paris"``). A :class:`Query` is a
fact rendered with one template and tokenised for one model: prompt ids (with BOS when the model
uses one) and answer ids (leading space included, any number of tokens). Multi-token answers are
scored teacher-forced: P(answer) = prod_j P(a_j | prompt, a_<j).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kn_lens.errors import InvalidFactError, InvalidTemplateError, TokenizationError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

_PLACEHOLDER = "{}"


def validate_template(template: str) -> str:
    """Check a template has exactly one ``{}`` (the subject) and no other braces."""
    if not isinstance(template, str) or not template.strip():
        raise InvalidTemplateError(f"empty template {template!r}: write e.g. 'The capital of {{}} is'")
    n = template.count(_PLACEHOLDER)
    stray = template.replace(_PLACEHOLDER, "")
    if n != 1 or "{" in stray or "}" in stray:
        raise InvalidTemplateError(
            f"template {template!r} must contain exactly one '{{}}' for the subject and no other "
            f"braces (found {n}); the object follows the prompt, e.g. 'The capital of {{}} is'"
        )
    if template.endswith(" "):
        raise InvalidTemplateError(
            f"template {template!r} ends with a space: the answer carries its own leading space"
        )
    return template


def _check_text(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidFactError(f"empty {what} {value!r}: a fact needs a non-empty subject and object")
    if value != value.strip():
        raise InvalidFactError(f"{what} {value!r} has leading/trailing whitespace; strip it first")
    return value


@dataclass(frozen=True)
class Relation:
    """A relation with its paraphrase templates (ParaRel-style; ``{}`` marks the subject)."""

    id: str
    name: str
    templates: tuple[str, ...]
    group: str | None = None  # relations with the same group are semantically similar
    description: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            raise InvalidFactError("a relation needs a non-empty id")
        object.__setattr__(self, "templates", tuple(self.templates))
        if not self.templates:
            raise InvalidTemplateError(f"relation {self.id!r} has no templates")
        for t in self.templates:
            validate_template(t)
        if len(set(self.templates)) != len(self.templates):
            raise InvalidTemplateError(f"relation {self.id!r} repeats a template")

    def render(self, subject: str, template_index: int = 0) -> str:
        return self.templates[template_index].replace(_PLACEHOLDER, subject)


@dataclass(frozen=True)
class Fact:
    """A (subject, relation, object) triple; ``aliases`` are other names of the subject."""

    subject: str
    relation: str
    object: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_text(self.subject, "subject")
        _check_text(self.object, "object")
        if not self.relation:
            raise InvalidFactError(f"fact about {self.subject!r} has an empty relation id")
        object.__setattr__(self, "aliases", tuple(a for a in self.aliases if a != self.subject))

    def with_object(self, new_object: str) -> "Fact":
        return Fact(self.subject, self.relation, new_object, self.aliases)

    def key(self) -> str:
        return f"{self.relation}|{self.subject}|{self.object}"


@dataclass(frozen=True)
class Query:
    """One fact rendered with one template and tokenised for one model."""

    fact: Fact
    template: str
    prompt: str
    answer: str  # the text scored after the prompt, with its leading space
    prompt_ids: tuple[int, ...]  # includes BOS when the model prepends one
    answer_ids: tuple[int, ...]
    template_index: int = -1

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_answer(self) -> int:
        return len(self.answer_ids)

    @property
    def input_ids(self) -> tuple[int, ...]:
        """Prompt followed by all answer tokens but the last (teacher forcing)."""
        return self.prompt_ids + self.answer_ids[:-1]

    @property
    def answer_positions(self) -> tuple[int, ...]:
        """Positions whose logits predict each answer token."""
        return tuple(self.n_prompt - 1 + j for j in range(self.n_answer))

    @property
    def last_position(self) -> int:
        """The answer-predicting position of the first answer token (the prompt's last token)."""
        return self.n_prompt - 1

    def tokens(self, device: torch.device | str = "cpu") -> Int[Tensor, "1 pos"]:
        return torch.tensor([self.input_ids], dtype=torch.long, device=device)

    def with_prompt_prefix(self, prefix_ids: Sequence[int], prefix: str) -> "Query":
        """Insert token ids after BOS (if any) and before the prompt (random-prefix robustness)."""
        return Query(self.fact, self.template, prefix + self.prompt, self.answer,
                     tuple(prefix_ids) + self.prompt_ids, self.answer_ids, self.template_index)


@dataclass(frozen=True)
class LabelledPrompt:
    """A prompt with the answer it should get (used to judge edits)."""

    prompt: str
    answer: str
    fact: Fact | None = None


@dataclass(frozen=True)
class EditRequest:
    """A counterfactual edit: ``fact``'s object becomes ``new_object``, with the prompts that judge it.

    - ``prompts``: the rewrite prompt(s), the fact's own template(s)
    - ``paraphrase_prompts``: other templates of the relation (generalisation)
    - ``neighbourhood``: other subjects with the same relation and original object (specificity;
      their answer must stay)
    - ``relation_specificity``: the same subject with other relations (must stay)
    - ``alias_prompts``: the prompt with an alternative spelling of the subject (generalisation)
    - ``prefixes``: random text prefixes used by TNF-DA / ROME-style training for robustness
    """

    fact: Fact
    new_object: str
    prompts: tuple[str, ...]
    paraphrase_prompts: tuple[str, ...] = ()
    neighbourhood: tuple[LabelledPrompt, ...] = ()
    relation_specificity: tuple[LabelledPrompt, ...] = ()
    alias_prompts: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    case_id: int = -1

    def __post_init__(self) -> None:
        _check_text(self.new_object, "new object")
        if self.new_object == self.fact.object:
            raise InvalidFactError(
                f"edit of {self.fact.subject!r}: new object equals the old one ({self.new_object!r})"
            )
        if not self.prompts:
            raise InvalidFactError(f"edit of {self.fact.subject!r} has no rewrite prompt")

    @property
    def target_fact(self) -> Fact:
        return self.fact.with_object(self.new_object)


# --------------------------------------------------------------------------- tokenisation


def _bos_policy(model: "HookedTransformer") -> bool:
    return bool(model.cfg.default_prepend_bos)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_answer(tokenizer, answer: str) -> tuple[int, ...]:
    """Token ids of an answer (with its leading space), checked to round-trip exactly."""
    if not answer.strip():
        raise InvalidFactError(f"empty answer {answer!r}")
    ids = _encode(tokenizer, answer)
    if not ids:
        raise TokenizationError(f"the tokenizer encodes answer {answer!r} to no tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise TokenizationError(
            f"answer {answer!r} contains characters the tokenizer cannot encode (unknown token "
            f"{tokenizer.unk_token!r}); choose another spelling or another model"
        )
    decoded = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if decoded != answer and decoded.strip() != answer.strip():
        raise TokenizationError(
            f"answer {answer!r} does not survive tokenisation (decodes to {decoded!r}); the "
            "tokenizer cannot represent it faithfully"
        )
    return tuple(ids)


def encode_prompt(model: "HookedTransformer", prompt: str) -> tuple[int, ...]:
    tok = model.tokenizer
    ids = _encode(tok, prompt)
    if not ids:
        raise TokenizationError(f"prompt {prompt!r} encodes to no tokens")
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise TokenizationError(f"prompt {prompt!r} contains characters the tokenizer cannot encode")
    if _bos_policy(model):
        bos = tok.bos_token_id
        if bos is None:
            raise TokenizationError("the model prepends BOS but its tokenizer has no bos_token_id")
        ids = [bos] + ids
    return tuple(ids)


def make_query(
    model: "HookedTransformer",
    fact: Fact,
    template: str,
    *,
    template_index: int = -1,
    subject: str | None = None,
    answer: str | None = None,
) -> Query:
    """Render ``fact`` with ``template`` and tokenise prompt and answer for ``model``.

    The answer is tokenised on its own with a leading space (" Paris"), which is how a causal LM
    continues the prompt; the prompt is tokenised with the model's BOS policy. If tokenising
    prompt + answer jointly would split differently at the boundary, the answer's own
    tokenisation is kept (the one that decodes exactly to the answer).
    """
    validate_template(template)
    subj = _check_text(subject if subject is not None else fact.subject, "subject")
    prompt = template.replace(_PLACEHOLDER, subj)
    answer_text = " " + (fact.object if answer is None else _check_text(answer, "answer"))
    prompt_ids = encode_prompt(model, prompt)
    answer_ids = encode_answer(model.tokenizer, answer_text)
    return Query(fact, template, prompt, answer_text, prompt_ids, answer_ids, template_index)


def queries_for_fact(model: "HookedTransformer", fact: Fact, relation: Relation,
                     templates: Iterable[int] | None = None) -> list[Query]:
    """One Query per template of the relation (or the chosen template indices)."""
    if relation.id != fact.relation:
        raise InvalidFactError(f"fact relation {fact.relation!r} != relation {relation.id!r}")
    idx = range(len(relation.templates)) if templates is None else templates
    return [make_query(model, fact, relation.templates[i], template_index=i) for i in idx]


def query_from_prompt(model: "HookedTransformer", prompt: str, answer: str,
                      fact: Fact | None = None) -> Query:
    """A Query from a free prompt and answer (answer without leading space)."""
    _check_text(answer, "answer")
    if not prompt.strip():
        raise InvalidFactError("empty prompt")
    f = fact or Fact(subject=prompt, relation="free", object=answer)
    return Query(f, prompt, prompt, " " + answer, encode_prompt(model, prompt),
                 encode_answer(model.tokenizer, " " + answer))


# --------------------------------------------------------------------------- scoring


def pad_batch(queries: Sequence[Query], pad_id: int = 0,
              device: torch.device | str = "cpu") -> tuple[Int[Tensor, "batch pos"], list[int]]:
    """Right-pad queries' input ids. Right padding is exact for causal LMs: real positions never
    attend to the pads that follow them, and absolute positions are unchanged."""
    lengths = [len(q.input_ids) for q in queries]
    out = torch.full((len(queries), max(lengths)), pad_id, dtype=torch.long, device=device)
    for i, q in enumerate(queries):
        out[i, : lengths[i]] = torch.tensor(q.input_ids, dtype=torch.long, device=device)
    return out, lengths


# The scorer itself lives in kn_lens.evaluate.scoring (one scorer for every metric and loss);
# these names stay here because every analysis imports them with the vocabulary.


def unembed_rows(model: "HookedTransformer", resid: Float[Tensor, "rows d_model"]
                 ) -> Float[Tensor, "rows d_vocab"]:
    """See :func:`kn_lens.evaluate.scoring.unembed_rows`."""
    from kn_lens.evaluate.scoring import unembed_rows as _unembed

    return _unembed(model, resid)


def answer_position_logits(model: "HookedTransformer", queries: Sequence[Query], *,
                           fwd_hooks: list | None = None) -> list[Float[Tensor, "_answer d_vocab"]]:
    """Logits at each query's answer positions only: :func:`kn_lens.evaluate.scoring.answer_logits`."""
    from kn_lens.evaluate.scoring import answer_logits

    return answer_logits(model, queries, fwd_hooks=fwd_hooks)


def answer_logprobs(model: "HookedTransformer", queries: Sequence[Query], *,
                    batch_size: int = 32, fwd_hooks: list | None = None) -> Float[Tensor, "n"]:
    """log P(answer) of each query (whole multi-token answer, teacher-forced)."""
    from kn_lens.evaluate.scoring import answer_logprobs as _lp

    return _lp(model, queries, batch_size=batch_size, fwd_hooks=fwd_hooks)


def answer_probs(model: "HookedTransformer", queries: Sequence[Query], **kw) -> Float[Tensor, "n"]:
    return answer_logprobs(model, queries, **kw).exp()


@dataclass(frozen=True)
class Prediction:
    query: Query
    top_tokens: tuple[str, ...]
    top_probs: tuple[float, ...]
    answer_first_rank: int  # 0 = top-1
    answer_prob: float  # whole answer, teacher-forced


def predict(model: "HookedTransformer", queries: Sequence[Query], *, k: int = 5,
            batch_size: int = 32, fwd_hooks: list | None = None) -> list[Prediction]:
    """Top-k next tokens after each prompt, the rank of the answer's first token, P(answer)."""
    from kn_lens.evaluate.scoring import score

    out: list[Prediction] = []
    for q, s in zip(queries, score(model, queries, fwd_hooks=fwd_hooks, batch_size=batch_size,
                                   top_k=k)):
        out.append(Prediction(q, tuple(model.tokenizer.decode([t]) for t in s.top_ids),
                              s.top_probs, s.ranks[0], s.prob))
    return out


# --------------------------------------------------------------------------- subjects and prompts


def subject_positions(model: "HookedTransformer", query: Query) -> tuple[int, ...]:
    """Positions (in ``query.input_ids``) of the tokens that overlap the subject's characters.

    The subject's character span comes from the template's ``{}``; failing that, from the first
    occurrence of ``fact.subject`` in the prompt; failing that, the whole prompt (no BOS)."""
    prompt = query.prompt
    n_bos = n_bos_tokens(model, query)
    span = _subject_span(query)
    if span is None:
        return tuple(range(n_bos, query.n_prompt))
    start, end = span
    offsets = _token_char_offsets(model, query, n_bos)
    pos = tuple(n_bos + i for i, (a, b) in enumerate(offsets) if a < end and b > start)
    if not pos:
        raise InvalidFactError(
            f"no prompt token overlaps the subject in {prompt!r}; the subject must be spelled in the prompt")
    return pos


def n_bos_tokens(model: "HookedTransformer", query: Query) -> int:
    """How many BOS tokens precede the prompt text in ``query.prompt_ids`` (0 or 1)."""
    ids = list(model.tokenizer.encode(query.prompt, add_special_tokens=False))
    n = query.n_prompt - len(ids)
    return n if n >= 0 and list(query.prompt_ids[n:]) == ids else int(bool(model.cfg.default_prepend_bos))


def _subject_span(query: Query) -> tuple[int, int] | None:
    t, p = query.template, query.prompt
    k = t.find("{}")
    if k >= 0:
        head, tail = t[:k], t[k + 2:]
        if p.startswith(head) and p.endswith(tail) and len(p) > len(head) + len(tail):
            return k, len(p) - len(tail)
    subj = query.fact.subject
    if subj and subj != p:
        k = p.find(subj)
        if k >= 0:
            return k, k + len(subj)
    return None


def _token_char_offsets(model, query: Query, n_bos: int) -> list[tuple[int, int]]:
    tok = model.tokenizer
    ids = list(query.prompt_ids[n_bos:])
    try:
        enc = tok(query.prompt, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        pass
    # Fallback: lengths of decoded prefixes.
    out, prev = [], 0
    for i in range(len(ids)):
        cur = len(tok.decode(ids[: i + 1], clean_up_tokenization_spaces=False))
        out.append((prev, cur))
        prev = cur
    return out


def subject_last_position(model: "HookedTransformer", query: Query) -> int:
    """Position of the subject's last token (ROME / MEMIT's edit site, causal tracing's "last
    subject token"). Raises InvalidFactError when the subject is not spelled in the prompt."""
    if _subject_span(query) is None:
        raise InvalidFactError(
            f"subject {query.fact.subject!r} does not occur in the prompt {query.prompt!r}")
    return max(subject_positions(model, query))


def prompt_query(model: "HookedTransformer", prompt: str, answer: str, fact: Fact, *,
                 subject: str | None = None, prefix: str = "") -> Query:
    """A Query from an already rendered prompt (an EditRequest's prompts): the subject (default
    ``fact.subject``) must occur in it; its first occurrence becomes the template's ``{}``.
    ``answer`` is the text after the prompt without its leading space. ``prefix`` (random
    context, ROME / TNF-DA) is prepended to the text and tokenised jointly with it, so that the
    tokens are what the model would see in running text."""
    subj = _check_text(subject if subject is not None else fact.subject, "subject")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidFactError("empty prompt")
    k = prompt.find(subj)
    if k < 0:
        raise InvalidFactError(f"subject {subj!r} does not occur in the prompt {prompt!r}: "
                               "write the prompt with the subject spelled as in the request")
    template = prefix + prompt[:k] + _PLACEHOLDER + prompt[k + len(subj):]
    if prefix and ("{" in prefix or "}" in prefix):
        raise InvalidTemplateError(f"prefix {prefix!r} contains braces")
    q_fact = fact if subj == fact.subject else Fact(subj, fact.relation, fact.object, fact.aliases)
    answer_text = " " + _check_text(answer, "answer")
    text = prefix + prompt
    return Query(q_fact, template, text, answer_text, encode_prompt(model, text),
                 encode_answer(model.tokenizer, answer_text))


def with_answer(model: "HookedTransformer", query: Query, answer: str) -> Query:
    """The same prompt scored with another answer (without leading space)."""
    text = " " + _check_text(answer, "answer")
    return Query(query.fact, query.template, query.prompt, text, query.prompt_ids,
                 encode_answer(model.tokenizer, text), query.template_index)

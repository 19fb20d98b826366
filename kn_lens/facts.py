"""The one vocabulary of kn-lens: Relation, Fact, Query, EditRequest; answer tokenisation.

A :class:`Relation` holds ParaRel-style paraphrase templates with one ``{}`` for the subject; the
object follows the rendered prompt (``"The capital of {} is"`` + ``" Paris"``). A :class:`Query` is a
fact rendered with one template and tokenised for one model: prompt ids (with BOS when the model
uses one) and answer ids (leading space included, any number of tokens). Multi-token answers are
scored teacher-forced: P(answer) = prod_j P(a_j | prompt, a_<j).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
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
        out[i, : lengths[i]] = torch.tensor(q.input_ids, dtype=torch.long)
    return out, lengths


def answer_logprob_from_logits(logits: Float[Tensor, "batch pos d_vocab"],
                               queries: Sequence[Query]) -> Float[Tensor, "batch"]:
    """Teacher-forced log P(answer | prompt) of each query from a forward pass over pad_batch()."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, q in enumerate(queries):
        pos = torch.tensor(q.answer_positions, device=logits.device)
        ids = torch.tensor(q.answer_ids, device=logits.device)
        out.append(logp[i, pos, ids].sum())
    return torch.stack(out)


def unembed_rows(model: "HookedTransformer", resid: Float[Tensor, "rows d_model"]
                 ) -> Float[Tensor, "rows d_vocab"]:
    """ln_final + unembed + logit soft-cap on selected residual rows, as HookedTransformer.forward
    does for every position (and without its per-call copy of the whole unembedding matrix)."""
    from transformer_lens.utilities import apply_softcap

    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid[:, None, :])[:, 0]
    logits = resid @ model.W_U + model.b_U
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def answer_position_logits(model: "HookedTransformer", queries: Sequence[Query], *,
                           fwd_hooks: list | None = None) -> list[Float[Tensor, "_answer d_vocab"]]:
    """Logits at each query's answer positions only (one padded forward for all ``queries``).

    Same numbers as ``model(pad_batch(queries))[i, q.answer_positions]`` up to float rounding,
    without unembedding every position: for short prompts and a large vocabulary the unembedding
    dominates a forward pass."""
    toks, _ = pad_batch(list(queries), device=model.cfg.device)
    with model.hooks(fwd_hooks=fwd_hooks or []):
        resid = model(toks, stop_at_layer=model.cfg.n_layers)
        rows = torch.cat([resid[i, list(q.answer_positions)] for i, q in enumerate(queries)])
        logits = unembed_rows(model, rows)
    return list(logits.split([q.n_answer for q in queries]))


@torch.no_grad()
def answer_logprobs(model: "HookedTransformer", queries: Sequence[Query], *,
                    batch_size: int = 16, fwd_hooks: list | None = None) -> Float[Tensor, "n"]:
    """log P(answer) of each query (whole multi-token answer, teacher-forced)."""
    res = []
    for s in range(0, len(queries), batch_size):
        chunk = queries[s : s + batch_size]
        for q, lg in zip(chunk, answer_position_logits(model, chunk, fwd_hooks=fwd_hooks)):
            lp = torch.log_softmax(lg.float(), dim=-1)
            res.append(lp[torch.arange(q.n_answer), torch.tensor(q.answer_ids, device=lg.device)].sum())
    return torch.stack(res) if res else torch.zeros(0)


def answer_probs(model: "HookedTransformer", queries: Sequence[Query], **kw) -> Float[Tensor, "n"]:
    return answer_logprobs(model, queries, **kw).exp()


@dataclass(frozen=True)
class Prediction:
    query: Query
    top_tokens: tuple[str, ...]
    top_probs: tuple[float, ...]
    answer_first_rank: int  # 0 = top-1
    answer_prob: float  # whole answer, teacher-forced


@torch.no_grad()
def predict(model: "HookedTransformer", queries: Sequence[Query], *, k: int = 5,
            batch_size: int = 16) -> list[Prediction]:
    """Top-k next tokens after each prompt, the rank of the answer's first token, P(answer)."""
    out: list[Prediction] = []
    for s in range(0, len(queries), batch_size):
        chunk = queries[s : s + batch_size]
        toks, _ = pad_batch(chunk, device=model.cfg.device)
        logits = model(toks)
        lp_answer = answer_logprob_from_logits(logits, chunk)
        for i, q in enumerate(chunk):
            probs = torch.softmax(logits[i, q.last_position].float(), -1)
            p, ids = probs.topk(k)
            first = probs[q.answer_ids[0]]
            rank = int((probs > first).sum())
            out.append(Prediction(q, tuple(model.tokenizer.decode([int(t)]) for t in ids),
                                  tuple(float(x) for x in p), rank, float(lp_answer[i].exp())))
    return out

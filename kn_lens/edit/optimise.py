"""The shared optimisation loop: trainable deltas on a parameter mask + composable loss terms.

Every optimisation-based editor (FT-L, ROME's v*, MEMIT's z, FiNE, TNF-DA, KNE) is this loop with
its own mask and terms:

- **Targets** (what is trained, :class:`Target`): slices of a weight (rows of ``W_out`` for
  chosen neurons, columns of ``W_in`` / ``W_gate``, attention heads) or a whole matrix, all
  applied through :func:`kn_lens.edit.delta.delta_hooks` exactly as a finished edit would be;
  or *activation* vectors added to a block's MLP output / residual stream at each example's edit
  site (ROME's v*, MEMIT's z), one vector per request group.
- **Terms** (what is minimised): :class:`NLL` of the new object, every answer token scored at
  its own position (teacher-forced; neither the FT-L bug of scoring every target token from the
  last prompt position nor a first-token-only loss); :class:`KL` to the unedited model at chosen
  positions; FiNE's :class:`RepetitionPenalty`; regularisers on the deltas in
  :class:`OptimConfig` (L2, ROME's relative norm decay, Adam weight decay, L-infinity and norm
  clamps after every step).
- **Control**: a step budget, early stopping on the loss or on the target probability, and a
  typed :class:`~kn_lens.errors.NumericalError` (no result) on a NaN / inf loss.

The model is never changed: its parameters' ``requires_grad`` flags are switched off for the
duration (so gradients reach only the deltas, and no ``.grad`` is left on the model) and restored
in ``finally``; every forward pass runs inside ``with model.hooks(...)``, so no hook survives an
exception. When every target sits in block ``L`` or above, the residual stream entering block
``L`` is computed once and each step runs only blocks ``L..``; when every target is an activation
delta at the rows' edit sites, each step also runs only the positions from the site on, attending
to frozen prefix keys / values (exact; :mod:`kn_lens.edit._suffix`).

Memory: a step holds the autograd graph of every training row through every block it runs
(over 30 KB per token and block on SmolLM2-135M: a TNF-DA batch of 100 requests, 672k, held
more than 22 GB). When weight-delta rows exceed ``OptimConfig.max_graph_tokens`` (padded tokens
x blocks), the step runs in chunks of rows with the same gradient (up to float summation
order). When every term is a mean over its examples (``LossTerm.decomposable``: NLL, KL and the
repetition penalty), each chunk's forward is scored and its part of every term back-propagated
at once (one pass: one forward and one backward of every row per step, as unchunked). Otherwise
two passes: a no-grad forward of every row gives the logits, the loss is computed and
differentiated with respect to them, then each chunk is run again with autograd and
back-propagated with its part of that gradient (one extra forward per step, and every row's
logits at its positions held at once).

Resumable: inside :func:`resumable` (every sweep item runs in it, :class:`kn_lens.sweep.
executors.Worker`), an optimisation that runs longer than a few minutes saves its state (the
deltas, Adam's moments, the step and the loss history) now and then; the same call after a kill
(same model, targets, examples, terms and settings) continues from the last save and returns
what an uninterrupted run returns. A TNF-DA batch of 100 requests takes hours on one CPU core.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kn_lens import hooks as H
from kn_lens._fast import fast_forward
from kn_lens.backend import is_bridge
from kn_lens.edit import _suffix
from kn_lens.edit.delta import _KINDS, _param, delta_hooks, param_name, parse_param
from kn_lens.errors import ConfigError, NumericalError
from kn_lens.evaluate.scoring import logits_at, pad_ids
from kn_lens.facts import Query

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


# --------------------------------------------------------------------------- examples and terms


@dataclass(frozen=True)
class Example:
    """One row of the training batch: input ids, the positions whose logits a term reads, the
    request it belongs to (``group``) and its edit site (the subject's last token) for
    activation targets (None: no activation delta in this row)."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    group: int = 0
    site: int | None = None


def query_example(q: Query, *, group: int = 0, site: int | None = None) -> Example:
    """The example that teacher-forces ``q``'s answer: logits at its answer positions."""
    return Example(tuple(q.input_ids), tuple(q.answer_positions), group, site)


class LossTerm:
    """A loss over some examples. Subclasses set ``examples`` and implement :meth:`loss`; the
    loop passes the logits at each example's positions, in order."""

    name = "term"
    weight: float = 1.0
    examples: tuple[Example, ...] = ()
    needs_reference = False  # whether prepare() needs the unedited model's logits
    # whether loss() is the mean of per_example() over the examples: chunked steps then back-
    # propagate each chunk's part in one pass (module doc); otherwise they take two passes
    decomposable = False

    def prepare(self, reference: list[Tensor]) -> None:
        """Called once with the *unedited* model's logits at this term's examples."""

    def loss(self, logits: list[Float[Tensor, "_n d_vocab"]]) -> Float[Tensor, ""]:
        raise NotImplementedError

    def per_example(self, logits: list[Float[Tensor, "_n d_vocab"]],
                    which: Sequence[int]) -> Float[Tensor, " n"]:
        """The loss of examples ``which`` (indices into ``examples``), given their logits in that
        order; only for ``decomposable`` terms, whose ``loss`` is the mean of these over all
        examples."""
        raise NotImplementedError


class NLL(LossTerm):
    """Teacher-forced NLL of each query's answer: mean per-token NLL per query (every answer
    token at its own position), averaged over queries (ROME / MEMIT / FiNE eq. 4). ``groups`` and
    ``sites`` tie each query to a request and its edit site (activation targets)."""

    name = "nll"

    def __init__(self, queries: Sequence[Query], *, weight: float = 1.0,
                 groups: Sequence[int] | None = None, sites: Sequence[int | None] | None = None):
        queries = list(queries)
        if not queries:
            raise ConfigError("an NLL term needs at least one query")
        groups = [0] * len(queries) if groups is None else list(groups)
        sites = [None] * len(queries) if sites is None else list(sites)
        if not len(groups) == len(sites) == len(queries):
            raise ConfigError("NLL: one group and one site per query")
        self.weight = float(weight)
        self.answers = [tuple(q.answer_ids) for q in queries]
        self.examples = tuple(query_example(q, group=g, site=s)
                              for q, g, s in zip(queries, groups, sites))
        self.last_probs: list[float] = []

    decomposable = True

    def per_query(self, logits: list[Tensor]) -> Tensor:
        """Mean per-token NLL of each query."""
        return self.per_example(logits, range(len(self.answers)))

    def per_example(self, logits: list[Tensor], which: Sequence[int]) -> Tensor:
        from kn_lens.evaluate.scoring import token_logprobs

        return torch.stack([-token_logprobs(lg, self.answers[j]).mean()
                            for lg, j in zip(logits, which)])

    def record(self, per: Tensor) -> None:
        """Keep each query's whole-answer probability from its mean per-token NLL ``per``."""
        lengths = torch.tensor([len(a) for a in self.answers], dtype=per.dtype, device=per.device)
        self.last_probs = [float(x) for x in torch.exp(-per.detach() * lengths)]

    def loss(self, logits: list[Tensor]) -> Tensor:
        per = self.per_query(logits)
        self.record(per)
        return per.mean()


class KL(LossTerm):
    """KL divergence to the unedited model at the examples' positions, averaged over positions
    and examples. ``direction="ref||edit"`` is KL(P_unedited || P_edited) (ROME / MEMIT's
    essence-drift term, ``kl_div(log p_edit, log p_ref)``); ``"edit||ref"`` is FiNE eq. 5's
    KL(P_edited || P_unedited)."""

    name = "kl"
    needs_reference = True

    def __init__(self, examples: Sequence[Example], *, weight: float = 1.0,
                 direction: Literal["ref||edit", "edit||ref"] = "ref||edit"):
        if direction not in ("ref||edit", "edit||ref"):
            raise ConfigError(f"KL direction must be 'ref||edit' or 'edit||ref', not {direction!r}")
        self.examples = tuple(examples)
        if not self.examples or any(not e.positions for e in self.examples):
            raise ConfigError("a KL term needs examples with at least one position each")
        self.weight = float(weight)
        self.direction = direction
        self._ref: list[Tensor] = []

    def prepare(self, reference: list[Tensor]) -> None:
        self._ref = [torch.log_softmax(r.detach().float(), -1) for r in reference]

    decomposable = True

    def loss(self, logits: list[Tensor]) -> Tensor:
        if len(self._ref) != len(logits):
            raise ConfigError("KL term used before prepare()")
        return self.per_example(logits, range(len(logits))).mean()

    def per_example(self, logits: list[Tensor], which: Sequence[int]) -> Tensor:
        if len(self._ref) != len(self.examples):
            raise ConfigError("KL term used before prepare()")
        out = []
        for lg, j in zip(logits, which):
            ref = self._ref[j]
            lp = torch.log_softmax(lg.float(), -1)
            if self.direction == "ref||edit":
                out.append((ref.exp() * (ref - lp)).sum(-1).mean())
            else:
                out.append((lp.exp() * (lp - ref)).sum(-1).mean())
        return torch.stack(out)


def kl_examples(queries: Sequence[Query], *, positions: Literal["last", "prompt"] = "last",
                groups: Sequence[int] | None = None, sites: Sequence[int | None] | None = None
                ) -> list[Example]:
    """KL examples from prompts: the next-token distribution after the prompt (``"last"``,
    ROME's "{subject} is a") or at every prompt position but the first (``"prompt"``, FiNE's
    positions 1 .. l_p - 1; every position predicts the next prompt token)."""
    groups = [0] * len(queries) if groups is None else list(groups)
    sites = [None] * len(queries) if sites is None else list(sites)
    out = []
    for q, g, s in zip(queries, groups, sites):
        ids = tuple(q.prompt_ids)
        pos = (len(ids) - 1,) if positions == "last" else tuple(range(1, len(ids)))
        out.append(Example(ids, pos or (len(ids) - 1,), g, s))
    return out


class RepetitionPenalty(LossTerm):
    """FiNE eq. 6: ``-log(1 - P(o* | p(s, r, o*)))``, the probability of producing the new object
    *again* right after it (whole object, teacher-forced), pushed down."""

    name = "repetition"

    def __init__(self, queries: Sequence[Query], *, weight: float = 1.0):
        self.weight = float(weight)
        self.answers = [tuple(q.answer_ids) for q in queries]
        ex = []
        for q in queries:
            ids = tuple(q.prompt_ids) + tuple(q.answer_ids) * 2
            start = len(q.prompt_ids) + len(q.answer_ids) - 1
            ex.append(Example(ids[:-1], tuple(range(start, start + len(q.answer_ids)))))
        self.examples = tuple(ex)

    decomposable = True

    def loss(self, logits: list[Tensor]) -> Tensor:
        return self.per_example(logits, range(len(logits))).mean()

    def per_example(self, logits: list[Tensor], which: Sequence[int]) -> Tensor:
        from kn_lens.evaluate.scoring import token_logprobs

        out = []
        for lg, j in zip(logits, which):
            logp = token_logprobs(lg, self.answers[j]).sum()
            # -log(1 - p) = -log1p(-exp(logp)), stable near p -> 1
            out.append(-torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-6)))
        return torch.stack(out)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A trainable delta. Weight targets: ``param`` slices ``index`` along its unit dimension
    (None: every slice, a dense matrix delta). Activation targets: a vector per group added to
    block ``layer``'s MLP output (``site="mlp_out"``, ROME) or residual stream after the block
    (``site="resid_post"``, MEMIT) at each example's edit site. ``norm_ref`` (per group / slice)
    scales the relative regularisers (ROME: the norm of the original output).

    ``scale`` s (KNE eq. 11, ``W + alpha / sqrt(n) * dW``): Adam trains ``dW`` and the model sees
    ``s * dW``. The loop holds the applied delta ``D = s * dW`` and gives its Adam parameter group
    ``lr * s`` and ``eps / s``, which is Adam on ``dW`` exactly (Adam's moments scale with the
    gradient); the regularisers and clamps of :class:`OptimConfig` act on ``D``."""

    kind: Literal["weight", "activation"]
    param: str | None = None
    index: tuple[int, ...] | None = None
    layer: int | None = None
    site: Literal["mlp_out", "resid_post"] = "mlp_out"
    n_groups: int = 1
    norm_ref: tuple[float, ...] | None = None
    scale: float = 1.0  # KNE eq. 11: the applied delta is scale x the trained matrix (see below)

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and self.scale > 0 and math.isfinite(self.scale)):
            raise ConfigError(f"target scale must be a finite number > 0, got {self.scale!r}")
        if self.kind == "weight":
            if self.param is None or parse_param(self.param) is None:
                raise ConfigError(f"weight target needs a block parameter name, not {self.param!r}")
            if self.index is not None:
                object.__setattr__(self, "index", tuple(int(i) for i in self.index))
                if not self.index or len(set(self.index)) != len(self.index):
                    raise ConfigError(f"weight target on {self.param}: empty or repeated indices")
        elif self.kind == "activation":
            if self.layer is None or self.site not in ("mlp_out", "resid_post"):
                raise ConfigError("activation target needs a layer and site 'mlp_out' or "
                                  "'resid_post'")
            if self.n_groups < 1:
                raise ConfigError("activation target needs n_groups >= 1")
            if self.norm_ref is not None and len(self.norm_ref) != self.n_groups:
                raise ConfigError("activation target: one norm_ref per group")
        else:
            raise ConfigError(f"target kind must be 'weight' or 'activation', not {self.kind!r}")

    # constructors ------------------------------------------------------------
    @classmethod
    def rows(cls, layer: int, index: Sequence[int], kind: str = "W_out", *,
             scale: float = 1.0) -> "Target":
        """Neurons' output vectors (rows of W_out) or input vectors (columns of W_in / W_gate),
        or heads of W_Q/W_K/W_V/W_O: the kind's unit slices ``index``."""
        return cls("weight", param_name(layer, kind), tuple(index), scale=scale)

    @classmethod
    def matrix(cls, layer: int, kind: str = "W_out") -> "Target":
        """The whole matrix (a dense-layer delta, FT-L)."""
        return cls("weight", param_name(layer, kind), None)

    @classmethod
    def activation(cls, layer: int, site: Literal["mlp_out", "resid_post"] = "mlp_out", *,
                   n_groups: int = 1, norm_ref: Sequence[float] | None = None) -> "Target":
        return cls("activation", layer=layer, site=site, n_groups=n_groups,
                   norm_ref=None if norm_ref is None else tuple(float(x) for x in norm_ref))

    # properties --------------------------------------------------------------
    @property
    def block(self) -> int:
        return parse_param(self.param)[0] if self.kind == "weight" else int(self.layer)

    @property
    def weight_kind(self) -> str | None:
        return parse_param(self.param)[1] if self.kind == "weight" else None

    @property
    def dim(self) -> int:
        return _KINDS[self.weight_kind][0] if self.kind == "weight" else 0

    def shape(self, model) -> tuple[int, ...]:
        if self.kind == "activation":
            return (self.n_groups, model.cfg.d_model)
        p = _param(model, self.param, writable=False)
        shape = list(p.shape)
        if self.index is not None:
            if max(self.index) >= shape[self.dim]:
                raise ConfigError(f"target on {self.param}: index {max(self.index)} out of range "
                                  f"{shape[self.dim]}")
            shape[self.dim] = len(self.index)
        return tuple(shape)

    def full_index(self, model) -> Tensor:
        if self.index is not None:
            return torch.tensor(self.index, dtype=torch.long, device="cpu")
        return torch.arange(_param(model, self.param, writable=False).shape[self.dim],
                            device="cpu")


# --------------------------------------------------------------------------- config and result


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The loop's settings (editors set their papers' values; see each editor's config)."""

    steps: int = 25  # step budget (ROME v*: 20, MEMIT z: 25, FT-L: 25)
    lr: float = 5e-4
    weight_decay: float = 0.0  # Adam's L2 weight decay on the deltas (pulls them to zero)
    l2: float = 0.0  # + l2 * ||delta||_2 per target (FiNE's gamma ||delta||)
    norm_decay: float = 0.0  # + norm_decay * ||delta|| / ||ref||^2 per group (ROME's v_weight_decay)
    linf: float | None = None  # clamp every entry to [-linf, linf] after each step (FT-L)
    max_norm: float | None = None  # clamp ||delta|| <= max_norm * ||ref|| per group (ROME: 4)
    stop_loss: float | None = None  # stop once the total loss is below (ROME: 5e-2)
    stop_prob: float | None = None  # stop once every NLL query's P(answer) >= this (FiNE: 0.9)
    stop_nll: float | None = None  # stop once the NLL terms' mean loss is <= this (TNF-DA eq. 14)
    # weight-delta rows above this many padded tokens x blocks run each step in chunks (see the
    # module doc): bounds the graph's memory; the gradient is the same up to float summation
    # order. Single edits and the committed batch runs are below it (SmolLM2: FT-L / FiNE / KNE
    # at 100 requests 28k / 39k / 34k, TNF-DA at 10 requests 72k; TNF-DA at 100: ~0.7M).
    max_graph_tokens: int = field(default=100_000, compare=False)

    def __post_init__(self) -> None:
        if self.max_graph_tokens < 1:
            raise ConfigError(f"max_graph_tokens must be >= 1, got {self.max_graph_tokens}")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "l2", "norm_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        for name in ("linf", "max_norm", "stop_loss", "stop_nll"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be > 0 or None, got {v}")
        if self.stop_prob is not None and not 0 < self.stop_prob <= 1:
            raise ConfigError(f"stop_prob must be in (0, 1], got {self.stop_prob}")


@dataclass(frozen=True)
class OptimResult:
    """The trained deltas (detached, in target order) and how the run went."""

    values: tuple[Tensor, ...]
    targets: tuple[Target, ...]
    steps: int  # optimiser updates made
    stopped: str  # "stop_loss" | "stop_prob" | "stop_nll" | "budget"
    history: tuple[dict, ...]  # per evaluated step: total and per-term losses, min P(answer)
    seconds: float
    extras: dict = field(default_factory=dict, compare=False)

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


# --------------------------------------------------------------------------- resumable runs

@dataclass(frozen=True)
class _Resume:
    folder: Path
    every_s: float
    earlier: float  # seconds killed runs of this item spent up to their last save
    entered: float  # perf_counter() when this run entered :func:`resumable`

    def save(self, path: Path, state: Any) -> None:
        """``state`` to ``path``, then the item's clock: the seconds spent on it up to this
        save, earlier runs included (what a run resumed from here has already cost)."""
        from kn_lens.sweep.store import _atomic_write

        _save_state(path, state)
        seconds = self.earlier + time.perf_counter() - self.entered
        _atomic_write(self.folder / _CLOCK, lambda f: f.write(json.dumps(seconds).encode()),
                      fsync=False)


_RESUME: ContextVar[_Resume | None] = ContextVar("kn_lens_optimise_resume", default=None)
_CLOCK = "seconds.json"


@contextmanager
def resumable(folder: str | Path, *, every_s: float = 300.0):
    """Inside: :func:`optimise` saves its state to ``folder/<digest>.pt`` at most every
    ``every_s`` seconds of a run (a short run writes nothing), and a call with the same inputs
    continues from that file; it is removed when the run completes. Each save also records the
    seconds spent inside so far, earlier killed runs included (:func:`earlier_seconds`); that
    record goes when the block completes without an error."""
    if not every_s > 0:
        raise ConfigError(f"every_s must be > 0, got {every_s}")
    folder = Path(folder)
    clock = folder / _CLOCK
    earlier = float(json.loads(clock.read_text())) if clock.exists() else 0.0
    token = _RESUME.set(_Resume(folder, float(every_s), earlier, time.perf_counter()))
    try:
        yield
    finally:
        _RESUME.reset(token)
    clock.unlink(missing_ok=True)  # completed: nothing left to resume (an error keeps it)


def earlier_seconds() -> float:
    """Seconds that killed runs of the current :func:`resumable` item spent up to their last
    save (what this run resumes from); 0 outside one or for a fresh item. A benchmark item adds
    it to the edit's time, so a resumed edit reports what it cost in all, not its last part."""
    resume = _RESUME.get()
    return 0.0 if resume is None else resume.earlier


def kept(name: str, compute: Callable[[], Any]) -> Any:
    """Inside :func:`resumable`: what ``compute()`` returned in an earlier run of the same item
    that was killed later (kept when it took at least the save interval), else ``compute()``,
    kept now if it took that long; outside, ``compute()``. The work around an optimisation (a
    long localisation before it, the judgement of a long edit after it) resumes with it;
    :func:`forget` drops the value once the work that needed it is done."""
    resume = _RESUME.get()
    if resume is None:
        return compute()
    path = resume.folder / f"{name}.kept.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    t0 = time.perf_counter()
    value = compute()
    if time.perf_counter() - t0 >= resume.every_s:
        resume.save(path, value)
    return value


def forget(name: str) -> None:
    """Drop what :func:`kept` kept under ``name`` (nothing outside :func:`resumable`)."""
    resume = _RESUME.get()
    if resume is not None:
        (resume.folder / f"{name}.kept.pt").unlink(missing_ok=True)


def _digest(model, targets, terms, examples, config, init) -> str:
    """What determines a run: the model's weights (the sweep's fingerprint), the targets, every
    example, the terms and the settings (``max_graph_tokens`` aside) and the initial values."""
    from kn_lens.sweep.modelspec import weights_fingerprint

    h = hashlib.sha1(weights_fingerprint(model).encode())
    h.update(repr(targets).encode())
    h.update(repr([(type(t).__name__, t.weight, len(t.examples)) for t in terms]).encode())
    h.update(repr([(e.ids, e.positions, e.group, e.site) for e in examples]).encode())
    h.update(repr([(f.name, getattr(config, f.name)) for f in fields(config)
                   if f.name != "max_graph_tokens"]).encode())
    for x in init or ():
        h.update(b"-" if x is None else torch.as_tensor(x).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _save_state(path: Path, state: Any) -> None:
    """Write ``state`` whole or not at all (the sweep store's temporary file and rename)."""
    from kn_lens.sweep.store import _atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: torch.save(state, f), fsync=False)


# --------------------------------------------------------------------------- the loop


def _weight_terms(targets: Sequence[Target], tensors: Sequence[Tensor], model) -> list:
    out = []
    for t, x in zip(targets, tensors):
        if t.kind != "weight":
            continue
        idx = t.full_index(model)
        out.append(_LiveSlice(t.param, t.dim, idx, x))
    return out


@dataclass
class _LiveSlice:  # a slice delta whose values are a trainable tensor (duck-typed for delta_hooks)
    param: str
    dim: int
    index: Tensor
    values: Tensor


def _activation_terms(targets, tensors, examples: Sequence[Example], device) -> dict:
    rows = [b for b, e in enumerate(examples) if e.site is not None]
    if not rows:
        return {}
    sites = torch.tensor([examples[b].site for b in rows], dtype=torch.long, device=device)
    groups = torch.tensor([examples[b].group for b in rows], dtype=torch.long, device=device)
    row_t = torch.tensor(rows, dtype=torch.long, device=device)
    out: dict = {}
    for t, x in zip(targets, tensors):
        if t.kind != "activation":
            continue
        if int(groups.max()) >= t.n_groups:
            raise ConfigError(f"an example belongs to group {int(groups.max())} but the activation "
                              f"target has {t.n_groups} group(s)")

        def term(like, x=x):
            add = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
            return add.index_put((row_t, sites), x[groups].to(like.dtype), accumulate=True)
        key = (t.layer, t.site)
        out.setdefault(key, []).append(term)
    return out


def _hooks(model, targets, tensors, examples) -> H.HookList:
    acts = _activation_terms(targets, tensors, examples, model.cfg.device)
    outputs = {(layer, "mlp"): terms for (layer, site), terms in acts.items() if site == "mlp_out"}
    fwd = delta_hooks(model, _weight_terms(targets, tensors, model), outputs=outputs)
    for (layer, site), terms in acts.items():
        if site == "resid_post":
            def add(act, hook, terms=terms):
                for t in terms:
                    act = act + t(act)
                return act
            fwd.append((H.resid_post(layer), add))
    return fwd


def _group_norms(t: Target, x: Tensor) -> Tensor:
    """Per group (activation) or per slice (weight) L2 norms."""
    if t.kind == "activation":
        return x.norm(dim=-1)
    return x.transpose(0, t.dim).flatten(1).norm(dim=-1)


def _ref(t: Target, x: Tensor) -> Tensor:
    if t.norm_ref is None:
        return torch.ones(x.shape[0] if t.kind == "activation" else x.shape[t.dim], device=x.device)
    return torch.tensor(t.norm_ref, dtype=torch.float32, device=x.device)


def optimise(model: "HookedTransformer", targets: Sequence[Target], terms: Sequence[LossTerm], *,
             config: OptimConfig = OptimConfig(), init: Sequence[Tensor | None] | None = None,
             progress: bool = False, fast_prefix: bool = True) -> OptimResult:
    """Train ``targets`` to minimise the weighted sum of ``terms`` (see the module doc).

    Returns the deltas; the model is unchanged. ``init`` gives starting values (default zeros:
    zero steps return zero deltas). Raises NumericalError on a non-finite loss (nothing is
    returned) and ConfigError on bad targets or terms.
    """
    targets, terms = list(targets), list(terms)
    if not targets:
        raise ConfigError("optimise needs at least one target")
    if not terms:
        raise ConfigError("optimise needs at least one loss term")
    n_layers = model.cfg.n_layers
    for t in targets:
        if not 0 <= t.block < n_layers:
            raise ConfigError(f"target in block {t.block} outside the model's {n_layers} blocks")
    examples: list[Example] = []
    spans: list[slice] = []
    for term in terms:
        spans.append(slice(len(examples), len(examples) + len(term.examples)))
        examples.extend(term.examples)
    if not examples:
        raise ConfigError("the loss terms have no examples")
    ids = [e.ids for e in examples]
    positions = [e.positions for e in examples]
    device = model.cfg.device
    # blocks below the lowest target never change, so each step starts there -- on a
    # HookedTransformer; a TransformerBridge always runs from the embeddings
    start = 0 if is_bridge(model) else min(t.block for t in targets)
    t0 = time.perf_counter()
    # Exact fast path: only activation deltas at each row's site, so positions before the site
    # and blocks below ``start`` never change (kn_lens.edit._suffix).
    fast = (fast_prefix and all(t.kind == "activation" for t in targets)
            and all(e.site is not None and min(e.positions) >= e.site for e in examples)
            and _suffix.supported(model))

    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    scope = ExitStack()  # closed in finally: the modules' own forwards again
    try:
        scope.enter_context(fast_forward(model, frozen_weights=True))
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            frozen = _suffix.FrozenPrefix.build(model, ids, [e.site for e in examples], start) \
                if fast else None
            # weight deltas act on every position alike, so an example whose tokens begin
            # another's reads its logits from that row (FiNE: NLL, KL and the repetition
            # penalty all come from prompt + o* + o*): fewer, shared forward rows
            rows = _SharedRows(examples) if not fast and all(
                t.kind != "activation" for t in targets) else None
            if any(term.needs_reference for term in terms):
                if frozen is not None:  # the same unedited forward pass
                    reference = _rows_logits(model, frozen.clean_final, positions)
                elif rows is not None:
                    reference = rows.split(rows.logits(model))
                else:
                    reference = logits_at(model, ids, positions)
                for term, sl in zip(terms, spans):
                    term.prepare(reference[sl])
                del reference  # the terms keep what they need (KL: its positions' log-probs)
            run_ids = rows.ids if rows is not None else ids
            resid = model(pad_ids(model, run_ids), stop_at_layer=start) \
                if (start and not fast) else None
        run_examples = examples if not fast else [
            Example(e.ids, tuple(p - e.site for p in e.positions), e.group, 0) for e in examples]
        tensors = []
        for k, t in enumerate(targets):
            x0 = None if init is None else init[k]
            x = torch.zeros(t.shape(model), dtype=torch.float32, device=device) if x0 is None \
                else torch.as_tensor(x0, dtype=torch.float32, device=device).clone()
            if tuple(x.shape) != t.shape(model):
                raise ConfigError(f"init for target {k} has shape {tuple(x.shape)}, expected "
                                  f"{t.shape(model)}")
            tensors.append(x.requires_grad_(True))
        opt = torch.optim.Adam(  # one group per target: KNE's scale (see Target)
            [{"params": [x], "lr": config.lr * t.scale, "eps": 1e-8 / t.scale}
             for t, x in zip(targets, tensors)], lr=config.lr, weight_decay=config.weight_decay)
        history: list[dict] = []
        stopped = "budget"
        updates = first = 0
        resume = _RESUME.get()
        state_file = None
        if resume is not None:
            state_file = resume.folder / f"{_digest(model, targets, terms, examples, config, init)}.pt"
            if state_file.exists():  # a run of these inputs was stopped: continue it
                state = torch.load(state_file, map_location=device, weights_only=False)
                with torch.no_grad():
                    for x, v in zip(tensors, state["values"]):
                        x.copy_(v)
                opt.load_state_dict(state["opt"])
                history, updates, first = list(state["history"]), state["updates"], state["step"]
        saved_at = time.perf_counter()
        # the hooks read the trained tensors, which the optimiser updates in place: attach once
        scope.enter_context(model.hooks(fwd_hooks=_hooks(model, targets, tensors, run_examples)))
        chunks = None if rows is None else rows.chunks(n_layers - start, config.max_graph_tokens)
        one_pass = chunks is not None and all(term.decomposable for term in terms)
        leaves: list[Tensor] = []
        for step in range(first, config.steps):
            opt.zero_grad(set_to_none=True)
            if one_pass:  # each chunk's forward and its part of the loss, back-propagated
                values = [v.to(device) for v in rows.train_chunks(
                    model, terms, spans, chunks, start_at_layer=start, resid=resid)]
            elif fast:
                logits = _suffix_logits(model, frozen, run_examples)
            elif chunks is not None:  # pass 1: every row's logits, no graph (module doc)
                with torch.no_grad():
                    got = rows.logits(model, start_at_layer=start, resid=resid, buckets=chunks)
                leaves = [lg.detach().requires_grad_(True) for lg in got]
                logits = rows.split(leaves)
            elif rows is not None:
                logits = rows.split(rows.logits(model, start_at_layer=start, resid=resid))
            else:
                logits = logits_at(model, ids, positions, start_at_layer=start, resid=resid)
            parts = {}
            total = torch.zeros((), device=device)
            min_p = None
            for k, (term, sl) in enumerate(zip(terms, spans)):
                if one_pass:  # already back-propagated: its value only
                    value = values[k].mean()
                    if isinstance(term, NLL):
                        term.record(values[k])
                else:
                    value = term.loss(logits[sl])
                parts[term.name] = parts.get(term.name, 0.0) + float(value.detach())
                total = total + term.weight * value
                if isinstance(term, NLL) and term.last_probs:
                    mp = min(term.last_probs)
                    min_p = mp if min_p is None else min(min_p, mp)
            for t, x in zip(targets, tensors):
                if config.l2:
                    total = total + config.l2 * x.norm()
                if config.norm_decay:
                    ref = _ref(t, x).to(x.device)
                    total = total + config.norm_decay * (_group_norms(t, x) / ref ** 2).sum()
            loss = float(total.detach())
            if not math.isfinite(loss):
                raise NumericalError(f"the editing loss became {loss} at step {step} "
                                     f"(terms: {parts}); lower the learning rate or add a clamp")
            history.append({"step": step, "loss": loss, **parts,
                            **({"min_p": min_p} if min_p is not None else {})})
            if progress:
                print(f"  step {step:3d} loss {loss:.4f} {parts}")
            if config.stop_loss is not None and loss < config.stop_loss:
                stopped = "stop_loss"
                break
            if config.stop_prob is not None and min_p is not None and min_p >= config.stop_prob:
                stopped = "stop_prob"
                break
            if config.stop_nll is not None and "nll" in parts and parts["nll"] <= config.stop_nll:
                stopped = "stop_nll"
                break
            if total.requires_grad:  # one pass: only the regularisers are left
                total.backward()
            if chunks is not None and not one_pass:  # pass 2: each chunk's graph in turn
                for chunk in chunks:
                    got = rows.logits(model, start_at_layer=start, resid=resid, buckets=[chunk])
                    pairs = [(got[i], leaves[i].grad) for i in chunk if leaves[i].grad is not None]
                    if pairs:
                        torch.autograd.backward([g for g, _ in pairs], [d for _, d in pairs])
                    del got, pairs
            for x in tensors:
                if x.grad is not None and not torch.isfinite(x.grad).all():
                    raise NumericalError(f"non-finite gradient at step {step}")
            opt.step()
            updates += 1
            with torch.no_grad():
                for t, x in zip(targets, tensors):
                    if config.linf is not None:
                        x.clamp_(-config.linf, config.linf)
                    if config.max_norm is not None:
                        limit = config.max_norm * _ref(t, x).to(x.device)
                        norms = _group_norms(t, x)
                        factor = torch.where(norms > limit, limit / norms.clamp_min(1e-12),
                                             torch.ones_like(norms))
                        shape = [1] * x.ndim
                        shape[0 if t.kind == "activation" else t.dim] = -1
                        x.mul_(factor.view(shape))
            if state_file is not None and time.perf_counter() - saved_at >= resume.every_s:
                resume.save(state_file, {"values": [x.detach() for x in tensors],
                                         "opt": opt.state_dict(), "history": history,
                                         "updates": updates, "step": step + 1})
                saved_at = time.perf_counter()
        values = tuple(x.detach().clone() for x in tensors)
        for v in values:
            if not torch.isfinite(v).all():
                raise NumericalError("the trained delta has NaN or infinite values")
        if state_file is not None:
            state_file.unlink(missing_ok=True)  # complete: nothing to resume
    finally:
        scope.close()
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
    return OptimResult(values, tuple(targets), updates, stopped, tuple(history),
                       time.perf_counter() - t0, {"start_at_layer": start, "frozen_prefix": fast,
                                                  "chunks": 0 if chunks is None else len(chunks),
                                                  "passes": 1 if chunks is None or one_pass
                                                  else 2})


class _SharedRows:
    """The forward rows for ``examples`` when each may read its logits from a longer example
    whose tokens begin with its own (a causal model's logits at a position depend only on the
    tokens up to it). ``split`` maps the rows' logits back to one tensor per example."""

    def __init__(self, examples: Sequence[Example]):
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
        self.ids: list[tuple[int, ...]] = []
        owner = [0] * len(examples)
        for i in order:
            e = examples[i].ids
            for r, row in enumerate(self.ids):
                if row[:len(e)] == e:
                    owner[i] = r
                    break
            else:
                owner[i] = len(self.ids)
                self.ids.append(e)
        wanted: list[set[int]] = [set() for _ in self.ids]
        for i, e in enumerate(examples):
            wanted[owner[i]].update(e.positions)
        self.positions = [sorted(w) for w in wanted]
        at = [{p: k for k, p in enumerate(ps)} for ps in self.positions]
        self.owner = owner
        self.index = [torch.tensor([at[owner[i]][p] for p in e.positions], dtype=torch.long,
                                   device="cpu") for i, e in enumerate(examples)]

    def split(self, row_logits: list[Tensor]) -> list[Tensor]:
        return [row_logits[r][idx.to(row_logits[r].device)]
                for r, idx in zip(self.owner, self.index)]

    def train_chunks(self, model, terms: Sequence[LossTerm], spans: Sequence[slice],
                     chunks: list[list[int]], *, start_at_layer: int = 0,
                     resid: Tensor | None = None) -> list[Tensor]:
        """One pass of a chunked step for decomposable terms: each chunk of rows runs with
        autograd, the examples it owns are scored and ``weight * sum / n`` of each term is back-
        propagated at once, so no chunk's graph outlives it. Returns each term's per-example
        losses (detached, on the CPU); their means are the terms' values."""
        out = [torch.zeros(len(t.examples), dtype=torch.float32) for t in terms]
        for chunk in chunks:
            got = self.logits(model, start_at_layer=start_at_layer, resid=resid, buckets=[chunk])
            inside = set(chunk)
            part = None
            for k, (term, sl) in enumerate(zip(terms, spans)):
                which = [j for j in range(sl.stop - sl.start) if self.owner[sl.start + j] in inside]
                if not which:
                    continue
                lg = [got[self.owner[sl.start + j]][self.index[sl.start + j].to(
                    got[self.owner[sl.start + j]].device)] for j in which]
                per = term.per_example(lg, which)
                out[k][which] = per.detach().float().cpu()
                add = term.weight * per.sum() / len(term.examples)
                part = add if part is None else part + add
            if part is not None and part.requires_grad:
                part.backward()
            del got, part
        return out

    def chunks(self, blocks: int, budget: int) -> list[list[int]] | None:
        """The length buckets split so that each holds at most ``budget`` padded tokens x
        ``blocks`` (a row longer than that alone); None when all rows fit in one graph."""
        buckets = _buckets([len(r) for r in self.ids])
        widths = [max(len(self.ids[i]) for i in b) for b in buckets]
        if sum(len(b) * w for b, w in zip(buckets, widths)) * blocks <= budget:
            return None
        out = []
        for b, w in zip(buckets, widths):
            n = max(1, budget // (w * blocks))
            out.extend(b[k:k + n] for k in range(0, len(b), n))
        return out

    def logits(self, model, *, start_at_layer: int = 0, resid: Tensor | None = None,
               buckets: list[list[int]] | None = None) -> list[Tensor]:
        """Logits at each row's positions, the rows run in length buckets (:func:`_buckets`:
        TNF-DA's prefixed rewrite rows are ~3x its augmentation prompts, one padded batch
        would be half padding). Exact: right padding never reaches a row's own positions, and
        weight deltas treat every row alike. ``resid``: the residual stream entering block
        ``start_at_layer`` for all rows padded together; each bucket reads its rows of it.
        ``buckets``: run these groups of rows instead (:meth:`chunks`; rows in none: None)."""
        out: list[Tensor | None] = [None] * len(self.ids)
        for bucket in buckets if buckets is not None else _buckets([len(r) for r in self.ids]):
            width = max(len(self.ids[i]) for i in bucket)
            part = None if resid is None else resid[bucket, :width]
            got = logits_at(model, [self.ids[i] for i in bucket],
                            [self.positions[i] for i in bucket],
                            start_at_layer=start_at_layer, resid=part)
            for i, lg in zip(bucket, got):
                out[i] = lg
        return out


# a forward + backward call costs about as much as this many extra padded tokens (Python and
# hook overhead over 30 blocks on a CPU); only decides how rows are grouped, never a result
_BUCKET_OVERHEAD = 32


def _buckets(lengths: Sequence[int], overhead: int | None = None) -> list[list[int]]:
    """Row indices grouped into right-padded batches that minimise padded tokens + ``overhead``
    per batch (rows sorted by length, each bucket a run of them; an exact dynamic programme over
    the distinct lengths)."""
    overhead = _BUCKET_OVERHEAD if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []  # rows of one length, longest first
    for i in order:
        if groups and lengths[groups[-1][0]] == lengths[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    n = len(groups)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        count = 0
        for i in range(j, 0, -1):  # the last bucket = groups[i-1 .. j-1], padded to groups[i-1]
            count += len(groups[i - 1])
            cost = best[i - 1] + count * lengths[groups[i - 1][0]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    out, j = [], n
    while j > 0:
        out.append([r for g in groups[cut[j]:j] for r in g])
        j = cut[j]
    return out[::-1]


def _rows_logits(model, resid: Tensor, positions: Sequence[Sequence[int]]) -> list[Tensor]:
    from kn_lens.evaluate.scoring import unembed_rows

    rows = torch.tensor([b for b, ps in enumerate(positions) for _ in ps], device=resid.device)
    cols = torch.tensor([p for ps in positions for p in ps], device=resid.device)
    logits = unembed_rows(model, resid[rows, cols])
    return list(logits.split([len(ps) for ps in positions]))


def _suffix_logits(model, frozen, examples: Sequence[Example]) -> list[Tensor]:
    return _rows_logits(model, frozen.final_resid(model), [e.positions for e in examples])

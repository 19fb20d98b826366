"""TNF-DA: targeted-neuron fine-tuning with relation-based data augmentation (``tnf-da.txt``).

1. **Targeted neurons** (eq. 3-7): the top 1 % of FFN neurons by indirect effect (causal mediation,
   :mod:`kn_lens.locate.mediation`) on the rewrite prompt, searched within the DNI-pruned space
   (the paper's eq. 6-7, gamma = 20 %) or, as an option, the AtP-pruned one (``prune="atp"``: on
   SmolLM2 DNI drops most neurons that carry a fact, see README), or ranked by attribution
   patching alone (``locator="atp"``, fast). Batch edits unite the requests' sets.
2. **Parameters** (theta_okn): only those neurons' input vectors (columns of ``W_in``, and of
   ``W_gate`` for gated MLPs) and output vectors (rows of ``W_out``); everything else frozen.
3. **Data** (eq. 8, 11): the rewrite prompt behind each of the request's N random prefixes
   (``x_j + p``, "TWP"; ``bare_prompt=True`` adds the bare prompt, as eq. 9 and Table 3's text
   have it; ``prefixes=False`` trains on the bare prompt only, "TNWP"), teacher-forcing the
   new object; plus the relation-based augmentation: the same prompt with ``n_augment`` other
   subjects of the request's relation (S_r), whose next-token distributions are held to the
   unedited model's by ``KL(P_edited || P_unedited)`` (eq. 12). Loss ``L = L_gen + alpha L_loc``
   (eq. 13); training stops once ``L_gen <= delta`` (eq. 14, the paper's dynamic epochs).

Ablations (Tables 3-4): ``prefixes=False`` (TNWP), ``neurons="random"`` (Ours-RN: as many random
neurons), ``augment="random"`` (Ours-DA: prompts of random facts of other relations).

The augmentation subjects come from ``augment_subjects`` or, by default, the built-in dataset's
facts of the request's relation, never the request's own subject nor its neighbourhood subjects
(the harness judges specificity on those; training on them would leak). The paper gives no
values for alpha, delta, |S_r|, the learning rate or the step budget; ours are recorded in every
edit (README: how they were chosen).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch

from kn_lens.edit.delta import Edit, w_in_columns, w_out_rows
from kn_lens.edit.kn import _by_layer, _check_neurons
from kn_lens.edit.optimise import (KL, NLL, LossTerm, OptimConfig, Target, forget, kept,
                                   kl_examples, optimise)
from kn_lens.edit.requests import check_requests, rewrite_queries
from kn_lens.errors import ConfigError
from kn_lens.facts import EditRequest, query_from_prompt
from kn_lens.models import model_info
from kn_lens.neurons import NeuronSet, random_like, top_fraction, union

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True, kw_only=True)
class TNFDAConfig:
    fraction: float = 0.01  # targeted neurons: TNF-DA "only 1 % neurons" (Sec. Analysis, Fig. 3)
    locator: Literal["mediation", "atp"] = "mediation"  # eq. 3-4 IE; "atp": first-order IE
    prune: Literal["dni", "atp", "none"] = "dni"  # eq. 6-7 search space (mediation only)
    gamma: float = 20.0  # eq. 7: top gamma % by DNI (kn_lens.locate MediationConfig default)
    n_noise: int = 3  # noise samples of the IE (MediationConfig default)
    neurons: Literal["located", "random"] = "located"  # "random": Table 4 Ours-RN
    prefixes: bool = True  # eq. 8 TWP; False: TNWP (Table 3)
    # with prefixes, also the bare prompt (eq. 9's L_gen(p); Table 3's text trains TWP on "(p, o)
    # and (x_j + p, o)"; ROME's contexts begin with the bare "{}"). False: eq. 8's rows only, as
    # every committed TNF-DA row was made (README: a batch of 100 then misses the bare prompt)
    bare_prompt: bool = False
    augment: Literal["relation", "random", "none"] = "relation"  # eq. 11; "random": Ours-DA
    n_augment: int = 10  # |S_r| (paper: no value)
    augment_subjects: tuple[str, ...] | None = None  # S_r pool; None: the built-in dataset
    alpha: float = 1.0  # eq. 13 (paper: no value)
    delta: float = 0.05  # eq. 14: stop once L_gen <= delta (paper: no value)
    lr: float = 1e-4  # Adam (paper: no value; 1e-3 also moves "The capital of France is", README)
    steps: int = 40  # budget of the dynamic epochs (paper: no value)

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"TNFDAConfig.fraction must be in (0, 1], got {self.fraction}")
        for name, allowed in (("locator", ("mediation", "atp")), ("prune", ("dni", "atp", "none")),
                              ("neurons", ("located", "random")),
                              ("augment", ("relation", "random", "none"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"TNFDAConfig.{name} must be one of {allowed}, not "
                                  f"{getattr(self, name)!r}")
        if self.n_augment < 0 or self.alpha < 0 or not self.delta > 0:
            raise ConfigError("TNFDAConfig: n_augment >= 0, alpha >= 0, delta > 0")
        if self.steps < 0 or not self.lr > 0 or self.n_noise < 1:
            raise ConfigError("TNFDAConfig: steps >= 0, lr > 0, n_noise >= 1")
        if self.bare_prompt and not self.prefixes:
            raise ConfigError("TNFDAConfig.bare_prompt adds the bare prompt to the prefixed rows; "
                              "with prefixes=False (TNWP) the bare prompt is all it trains on")
        if self.augment_subjects is not None:
            object.__setattr__(self, "augment_subjects", tuple(self.augment_subjects))


def _ie_scores(model, query, cfg: TNFDAConfig):
    from kn_lens.locate.mediation import (AtPConfig, MediationConfig, attribution_patching,
                                          causal_mediation)

    if cfg.locator == "atp":
        return attribution_patching(model, query, config=AtPConfig(n_noise=cfg.n_noise))
    return causal_mediation(model, query, config=MediationConfig(
        n_noise=cfg.n_noise, gamma=cfg.gamma, prune=cfg.prune))


def targeted_neurons(model: "HookedTransformer", requests: Sequence[EditRequest], *,
                     config: TNFDAConfig | None = None,
                     generator: torch.Generator | None = None) -> NeuronSet:
    """The top ``fraction`` of neurons by IE on each request's rewrite prompt (the old object),
    united; or as many random neurons (``neurons="random"``)."""
    cfg = config or TNFDAConfig()
    sets = []
    for r in requests:
        (q,) = rewrite_queries(model, r, target=r.fact.object, all_prompts=False)
        sets.append(top_fraction(_ie_scores(model, q, cfg), cfg.fraction))
    located = union(sets)
    if cfg.neurons == "located":
        return located
    if generator is None:
        raise ConfigError("random TNF-DA neurons need a generator (edit(..., seed=...) passes one)")
    return random_like(located, model.cfg.n_layers, model.cfg.d_mlp, generator=generator)


def augmentation_prompts(request: EditRequest, config: TNFDAConfig,
                         generator: torch.Generator) -> list[str]:
    """Eq. 11's p^r_i: the rewrite prompt with ``n_augment`` other subjects of the relation
    (``augment="relation"``) or prompts of random facts of other relations (``"random"``)."""
    cfg = config
    if cfg.augment == "none" or cfg.n_augment == 0:
        return []
    prompt, subject = request.prompts[0], request.fact.subject
    held_out = {subject} | {lp.fact.subject for lp in request.neighbourhood if lp.fact is not None}
    if cfg.augment == "relation":
        if cfg.augment_subjects is not None:
            pool = list(dict.fromkeys(cfg.augment_subjects))
        else:
            from kn_lens.datasets import builtin_dataset

            ds = builtin_dataset()
            if request.fact.relation not in ds.relations:
                raise ConfigError(
                    f"TNF-DA's relation augmentation needs other subjects of relation "
                    f"{request.fact.relation!r}, which the built-in dataset does not have: pass "
                    "TNFDAConfig(augment_subjects=(...)) or augment='none'")
            pool = [f.subject for f in ds.facts_of(request.fact.relation)]
        pool = [s for s in pool if s not in held_out]
        order = torch.randperm(len(pool), generator=generator, device="cpu").tolist()
        return [prompt.replace(subject, pool[i]) for i in order[:cfg.n_augment]]
    from kn_lens.datasets import builtin_dataset

    ds = builtin_dataset()
    facts = [f for f in ds.facts if f.relation != request.fact.relation and f.subject not in held_out]
    order = torch.randperm(len(facts), generator=generator, device="cpu").tolist()
    return [ds.relation_of(facts[i]).render(facts[i].subject) for i in order[:cfg.n_augment]]


@dataclass(frozen=True)
class TNFDAProblem:
    """What TNF-DA trains for some requests and neurons: the targets (the neurons' W_in /
    W_gate columns and W_out rows), the loss terms (eq. 13) and the loop's settings."""

    targets: tuple[Target, ...]
    terms: tuple[LossTerm, ...]
    optim: OptimConfig
    n_train: int  # teacher-forced rewrite rows (prefixes x prompts)
    n_augment: int  # augmentation prompts held by the KL


def training_problem(model: "HookedTransformer", requests: Sequence[EditRequest],
                     neurons: NeuronSet, *, config: TNFDAConfig,
                     generator: torch.Generator) -> TNFDAProblem:
    """TNF-DA's optimisation for ``requests`` on ``neurons`` (checked), without running it."""
    cfg = config
    _check_neurons(model, neurons)  # typed errors: empty, outside the model
    kinds = ["W_in", "W_gate", "W_out"] if model.cfg.gated_mlp else ["W_in", "W_out"]
    targets = [Target.rows(layer, idx, kind) for layer, idx in sorted(_by_layer(neurons).items())
               for kind in kinds]
    queries, loc = [], []
    for r in requests:
        if cfg.prefixes:
            if not r.prefixes:
                raise ConfigError(f"request {r.fact.subject!r} has no random prefixes for eq. 8 "
                                  "(build_edit_requests(n_prefixes=...)), or pass prefixes=False")
            bare = ("",) if cfg.bare_prompt else ()
            queries += rewrite_queries(model, r, prefixes=bare + tuple(r.prefixes))
        else:
            queries += rewrite_queries(model, r)
        loc += [query_from_prompt(model, p, r.fact.object)  # KL reads the next-token distribution
                for p in augmentation_prompts(r, cfg, generator)]
    terms: list[LossTerm] = [NLL(queries)]
    if loc and cfg.alpha:
        terms.append(KL(kl_examples(loc), weight=cfg.alpha, direction="edit||ref"))
    return TNFDAProblem(tuple(targets), tuple(terms), OptimConfig(
        steps=cfg.steps, lr=cfg.lr, stop_nll=cfg.delta), len(queries), len(loc))


def tnf_da(model: "HookedTransformer", requests: Sequence[EditRequest], *,
           config: TNFDAConfig | None = None, neurons: NeuronSet | None = None,
           generator: torch.Generator | None = None) -> Edit:
    """TNF-DA as an :class:`Edit`: trained deltas on the targeted neurons' W_in / W_gate columns
    and W_out rows."""
    cfg = config or TNFDAConfig()
    requests = check_requests(model, requests)
    generator = generator if generator is not None else torch.Generator(device="cpu").manual_seed(0)
    located = neurons is None
    if located:  # in a sweep a long localisation (a batch of 100: ~7-12 min of AtP) is kept
        # with the generator's state after it: a run killed in training resumes without it
        # and draws the same augmentation
        neurons, state = kept("targeted_neurons", lambda: (targeted_neurons(
            model, requests, config=cfg, generator=generator), generator.get_state()))
        generator.set_state(state)
    neurons = neurons if isinstance(neurons, NeuronSet) else NeuronSet(neurons)
    problem = training_problem(model, requests, neurons, config=cfg, generator=generator)
    targets = problem.targets
    res = optimise(model, targets, problem.terms, config=problem.optim)
    if located:
        forget("targeted_neurons")  # trained: the edit is complete
    deltas = []
    for t, v in zip(targets, res.values):
        v = v.cpu()
        if t.weight_kind == "W_out":
            deltas.append(w_out_rows(t.block, t.index, v))
        else:
            deltas.append(w_in_columns(t.block, t.index, v, gate=t.weight_kind == "W_gate"))
    n_params = sum(math.prod(v.shape) for v in res.values)
    kinds = list(dict.fromkeys(t.weight_kind for t in targets))
    layers = len({t.block for t in targets})
    desc = (f"TNF-DA {len(neurons)} neurons ({', '.join(kinds)}) in {layers} layers: " +
            "; ".join(f"{r.fact.subject} -> {r.new_object}" for r in requests[:3]))
    return Edit(tuple(deltas), desc, "tnf_da", model_info(model),
                {"config": cfg, "neurons": neurons.to_list(), "n_train": problem.n_train,
                 "n_augment": problem.n_augment, "n_params": n_params, "steps": res.steps,
                 "stopped": res.stopped, "final_loss": res.final_loss,
                 "history_nll": [h.get("nll") for h in res.history]})

"""The built-in item kinds' runners: what a worker calls, ``fn(model, item) -> result``.

- ``locate``: the locator ``item.method`` on the item's query -> ``NeuronScores`` (or, with
  ``store_dtype="float16"``, a :class:`CompactScores` that loads back as ``NeuronScores``);
- ``analysis``: a per-query analysis step (``synapses`` -> ``Synapses``, ``trace`` ->
  ``TraceResult``);
- ``edit``: the editor ``item.method`` on one request, judged by the harness ->
  :class:`EditOutcome` (the one-request ``EditReport`` and, with ``keep_edit``, the ``Edit``);
- ``known``: which facts the model knows -> :class:`~kn_lens.datasets.KnownFacts`;
- ``kn_modification``: one fact's KN erasure / update through N_i, N_g and CAS, judged -> its
  per-edit records (:func:`kn_lens.analysis.kn_selection_edits`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["run_locate", "run_analysis", "run_edit", "run_known", "run_kn_modification", "CompactScores", "EditOutcome",
           "decode_scores", "prepared_reference"]


def run_locate(model, item):
    from kn_lens.locate import locate

    (scores,) = locate(model, [item.payload], method=item.method, config=item.config,
                       progress=False)
    if item.options.get("store_dtype") == "float16":
        return CompactScores.from_scores(scores)
    return scores


def run_analysis(model, item):
    from kn_lens.sweep.items import analysis_function

    fn, _ = analysis_function(item.method)
    return fn(model, item.payload, config=item.config)


def run_known(model, item):
    from kn_lens.datasets.known import known_facts

    return known_facts(model, item.payload.facts, item.payload.relations, config=item.config)


@dataclass(frozen=True)
class EditOutcome:
    """An ``edit`` item's result: the harness's report on the one request (rows, aggregates;
    merge many with :func:`kn_lens.evaluate.harness.aggregate` over ``report.rows``) and the
    edit itself (``None`` unless the item kept it)."""

    report: Any  # EditReport
    edit: Any = None  # Edit | None


def run_edit(model, item):
    from kn_lens.evaluate.harness import edit_and_evaluate

    job = item.payload
    reference = None
    if job.reference is not None:
        reference = prepared_reference(model, job.reference)
    kept: list = []
    report = edit_and_evaluate(model, [job.request], method=item.method,
                               editor_config=item.config, config=job.harness,
                               reference=reference, seed=item.seed or 0,
                               on_batch=lambda k, e, rows: kept.append(e))
    return EditOutcome(report, kept[0] if job.keep_edit else None)


def run_kn_modification(model, item):
    from kn_lens.analysis.cas import kn_selection_edits

    job = item.payload
    reference = None if job.reference is None else prepared_reference(model, job.reference)
    scores = [decode_scores(s) for s in job.scores]
    return kn_selection_edits(model, scores, selection=job.selection, cas_config=job.cas_config,
                              config=item.config, new_object=job.new_object,
                              locality=job.locality, reference=reference,
                              edit_config=job.edit_config)


def prepared_reference(model, spec):
    """The reference prose of a :class:`~kn_lens.sweep.ReferenceSpec` prepared for dPPL
    (:func:`kn_lens.evaluate.perplexity.prepare_reference`), once per model and spec (kept on the
    model object: a worker's model lives as long as the worker)."""
    from kn_lens.evaluate.perplexity import prepare_reference, reference_slices

    cache = model.__dict__.setdefault("_kn_sweep_references", {})
    if spec not in cache:
        cache[spec] = prepare_reference(model, reference_slices(
            model, spec.n_slices, spec.slice_len, seed=spec.seed))
    return cache[spec]


# --------------------------------------------------------------------------- compact scores


@dataclass(frozen=True)
class CompactScores:
    """A ``NeuronScores`` stored as float16 relative to its largest |score| (per query)."""

    scores: torch.Tensor  # float16, [layer, d_mlp] / scale
    per_token: torch.Tensor | None  # float16, [answer, layer, d_mlp] / scale
    scale: float
    method: str
    query: Any
    config: Any
    model: Any
    extras: dict

    @classmethod
    def from_scores(cls, s) -> "CompactScores":
        scale = float(s.scores.abs().max())
        if s.per_token is not None:
            scale = max(scale, float(s.per_token.abs().max()))
        scale = scale or 1.0
        pt = None if s.per_token is None else (s.per_token.detach().cpu() / scale).half()
        return cls((s.scores.detach().cpu() / scale).half(), pt, scale, s.method, s.query,
                   s.config, s.model, dict(s.extras))

    def to_scores(self):
        from kn_lens.neurons import NeuronScores

        pt = None if self.per_token is None else self.per_token.float() * self.scale
        return NeuronScores(self.scores.float() * self.scale, self.method, self.query,
                            self.config, self.model, pt, {**self.extras, "store_dtype": "float16"})


def decode_scores(stored):
    return stored.to_scores() if isinstance(stored, CompactScores) else stored

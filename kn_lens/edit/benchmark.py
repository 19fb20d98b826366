"""The editing benchmark's shared definitions: editors and the papers' ablations as named
variants, their configs, the benchmark's requests, and a run's resumable state (per-request rows,
the unedited model's measurement, their archives). Used by ``experiments/edit_benchmark.py`` and
``experiments/edit_curves.py`` (whose requests are the benchmark's, and whose batch-size-1 rows
are the benchmark's rows of the same requests).

Requests (:meth:`BenchmarkRun.requests`): ``n_requests`` known facts balanced over relations
(:func:`kn_lens.datasets.sample_facts`, strategy ``"balanced"``), each with its best template as
the rewrite prompt, as CounterFact-style requests (:func:`kn_lens.datasets.build_edit_requests`:
a counterfactual object drawn from the relation's other objects, paraphrases, neighbourhood,
relation-specificity, alias prompts, prefixes), case ids 0..n-1.

Rows: one edit (of one request, or a batch) judged by the harness against the run's pre-edit
measurement is a ``benchmark_edit`` sweep item (:class:`BenchmarkEdit`, computed by
:func:`run_benchmark_edit` in any executor of :mod:`kn_lens.sweep`); its result is the list of
row dicts the run's row files hold (:meth:`BenchmarkRun.rows`, appended as each item is stored).
The row files stay the run's record (and its archives the committed one): rows already there are
never computed again, whatever code wrote them.
"""
from __future__ import annotations

import dataclasses
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kn_lens.errors import ConfigError

if TYPE_CHECKING:
    from kn_lens.datasets import Dataset
    from kn_lens.facts import EditRequest

__all__ = ["METHODS", "VARIANTS", "REUSE", "editor_configs", "resolve", "BenchmarkRun",
           "BenchmarkEdit", "run_benchmark_edit", "benchmark_item", "measure_before",
           "load_benchmark_model", "row_id", "aggregates_to_dict"]

METHODS = ("ft_l", "rome", "memit", "kn_update", "kn_erase", "fine", "kne", "tnf_da")

# The papers' ablations as named variants: label -> (editor, changes to its config). They run
# through the same resumable loop and harness as the editors (``--methods fine_random,...``).
VARIANTS = {
    "fine_random": ("fine", {"neurons": "random"}),  # FiNE Table 2 "w/o Loc."
    "fine_no_lf": ("fine", {"freeze_last": 0}),  # FiNE Table 2 "w/o LF"
    "fine_no_kl": ("fine", {"alpha": 0.0}),  # FiNE Table 12 "w/o L_KL"
    "fine_no_pen": ("fine", {"beta": 0.0}),  # FiNE Table 12 "w/o L_pen"
    "kne_w_in": ("kne", {"module": "W_in"}),  # KNE Sec. 4.3 module study
    "kne_w_gate": ("kne", {"module": "W_gate"}),
    "kne_w_q": ("kne", {"module": "W_Q"}),  # attention heads' slices (q/k/v/o_proj)
    "kne_w_k": ("kne", {"module": "W_K"}),
    "kne_w_v": ("kne", {"module": "W_V"}),
    "kne_w_o": ("kne", {"module": "W_O"}),
    # KNE's Adam lr (the paper gives none) moves every trained entry by ~lr per step, so its
    # effect scales with the weights: Gemma-3's W_out entries (RMS 0.016) are 12x smaller than
    # SmolLM2's (0.19), and lr 1e-2 over-edits Gemma (README). A 10x smaller lr tests that.
    "kne_lr_1e-3": ("kne", {"lr": 1e-3}),
    # TNF-DA with AtP-ranked targeted neurons: exact mediation (the paper's IE, the tnf_da
    # default) takes minutes per edit on this CPU; AtP ranks neurons like it (Spearman >= 0.99,
    # top-1 % overlap >= 0.98 on SmolLM2, README). Its ablations change one thing from tnf_da_atp.
    "tnf_da_atp": ("tnf_da", {"locator": "atp"}),
    "tnf_da_tnwp": ("tnf_da", {"locator": "atp", "prefixes": False}),  # Table 3 TNWP
    "tnf_da_rn": ("tnf_da", {"locator": "atp", "neurons": "random"}),  # Table 4 Ours-RN
    "tnf_da_da": ("tnf_da", {"locator": "atp", "augment": "random"}),  # Table 4 Ours-DA
    # the bare prompt trained with the prefixed ones (eq. 9, Table 3's text; README: batches)
    "tnf_da_atp_bare": ("tnf_da", {"locator": "atp", "bare_prompt": True}),
}

# KNE Sec. 4.4: ensembles located on a share of each relation's requests (the first quarter, by
# request order), united per relation and reused to edit every request of that relation.
REUSE = {"kne_reuse": ("kne", 0.25)}

TINY_N_CTX = 256  # a tiny test model's positions: real prompts plus prefixes fit


def editor_configs(*, quick: bool) -> dict[str, Any]:
    """Every editor's config (the papers' defaults; ``quick`` shrinks every budget)."""
    from kn_lens.edit.baselines.ft_l import FTLConfig
    from kn_lens.edit.baselines.memit import MEMITConfig
    from kn_lens.edit.baselines.rome import ROMEConfig
    from kn_lens.edit.fine import FiNEConfig
    from kn_lens.edit.kn import KNEditorConfig
    from kn_lens.edit.kne import KNEConfig
    from kn_lens.edit.tnf_da import TNFDAConfig

    if quick:
        return {"ft_l": FTLConfig(steps=3), "rome": ROMEConfig(v_steps=3, stats_tokens=4000),
                "memit": MEMITConfig(v_steps=3, stats_tokens=4000),
                "kn_update": KNEditorConfig(locator="contribution"),
                "kn_erase": KNEditorConfig(locator="contribution"),
                "fine": FiNEConfig(steps=3, freeze_last=1),
                "kne": KNEConfig(ig_steps=2, steps=3), "tnf_da": TNFDAConfig(n_noise=1, steps=3)}
    return {"ft_l": FTLConfig(), "rome": ROMEConfig(), "memit": MEMITConfig(),
            "kn_update": KNEditorConfig(), "kn_erase": KNEditorConfig(), "fine": FiNEConfig(),
            "kne": KNEConfig(), "tnf_da": TNFDAConfig()}


def resolve(label: str, configs: dict[str, Any]) -> tuple[str, Any]:
    """(editor name, config) of a method label: an editor, one of :data:`VARIANTS` or
    :data:`REUSE`. Raises ConfigError for any other label."""
    if label in VARIANTS:
        editor, changes = VARIANTS[label]
        return editor, dataclasses.replace(configs[editor], **changes)
    if label in REUSE:
        return REUSE[label][0], configs[REUSE[label][0]]
    if label not in configs:
        raise ConfigError(f"unknown method {label!r}: choose from {sorted(configs)} or the "
                          f"variants {sorted(VARIANTS) + sorted(REUSE)}")
    return label, configs[label]


def load_benchmark_model(name: str, seed: int = 0, *, device=None, dtype=None):
    """The benchmark's model: ``load_model(name, device=, dtype=)``, or a tiny test model with
    :data:`TINY_N_CTX` positions."""
    from kn_lens.experiment import load_experiment_model

    return load_experiment_model(name, seed, n_ctx=TINY_N_CTX, device=device, dtype=dtype)


def aggregates_to_dict(aggs: dict) -> dict:
    """``{protocol: {metric: {"mean", "lo", "hi", "n"}}}`` (4 decimals; JSON: NaN -> None) of
    :func:`kn_lens.evaluate.harness.aggregate`'s output."""
    from kn_lens.experiment import rounded

    return {p: {m: {"mean": rounded(a.mean), "lo": rounded(a.lo), "hi": rounded(a.hi), "n": a.n}
                for m, a in ms.items()} for p, ms in aggs.items()}


def row_id(d: dict) -> int:
    """The request (case id) a stored row belongs to."""
    return d["row"]["case_id"]


def measure_before(model, pss, hcfg, cache: Path, archive: Path | None = None,
                   key: str | None = None):
    """The unedited model's measurement of the probe sets ``pss``, cached as
    ``cache/before.pkl``; a fresh cache takes it from ``archive`` (the committed measurement of
    run ``key``, ~30 min of generation on SmolLM2) when it scored exactly these probes."""
    from kn_lens.evaluate.harness import RequestState, measure
    from kn_lens.experiment import read_archive

    path = cache / "before.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    before = None
    if archive is not None and key is not None:
        items = read_archive(archive, key, "kind").get("before", [])
        states = {d["i"]: RequestState.from_dict(d["state"]) for d in items}
        if len(states) == len(pss) and all(states[i].matches(ps) if i in states else False
                                            for i, ps in enumerate(pss)):
            before = [states[i] for i in range(len(pss))]
            print(f"pre-edit measurement: from {archive.name}")
        elif states:
            print(f"pre-edit measurement in {archive.name} is for other probes: measuring again")
    if before is None:
        t0 = time.perf_counter()
        before = measure(model, pss, config=hcfg)
        print(f"pre-edit measurement: {time.perf_counter() - t0:.0f} s")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(before))
    tmp.replace(path)
    return before


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkRun:
    """One editing-benchmark run's settings and its state on disk: the rows of each method
    (``<results-dir>/cache/edit_benchmark_<model>[_quick]_<key>/<label>.jsonl``, one per request,
    appended as computed), the pre-edit measurement (``before.pkl``), and their gzipped archives
    next to the results file (a run on another machine resumes from them). ``key`` hashes the
    settings that determine the rows; archived rows carry it."""

    NAME: ClassVar[str] = "edit_benchmark"
    results_dir: Path
    model: str
    quick: bool
    n_requests: int
    seed: int
    max_new_tokens: int
    no_known_filter: bool

    @classmethod
    def from_args(cls, args) -> "BenchmarkRun":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @property
    def key(self) -> str:
        from kn_lens.experiment import run_key

        return run_key(n_requests=self.n_requests, seed=self.seed, quick=self.quick,
                       max_new_tokens=self.max_new_tokens, no_known_filter=self.no_known_filter)

    def cache_dir(self) -> Path:
        from kn_lens.experiment import cache_folder

        return cache_folder(self, self.NAME, self.key)

    @property
    def archive_path(self) -> Path:
        from kn_lens.experiment import result_path

        return result_path(self, self.NAME).with_suffix(".rows.jsonl.gz")

    @property
    def before_path(self) -> Path:
        from kn_lens.experiment import result_path

        return result_path(self, self.NAME).with_suffix(".before.jsonl.gz")

    def requests(self, model, dataset: "Dataset") -> list["EditRequest"]:
        """The benchmark's requests (module doc), case ids 0..n-1."""
        from kn_lens.datasets import build_edit_requests
        from kn_lens.experiment import sample

        chosen = sample(self, model, dataset, self.n_requests, strategy="balanced")
        return list(build_edit_requests(dataset, chosen.facts, seed=self.seed,
                                        rewrite_template=chosen.templates))

    def measure_before(self, model, pss, hcfg):
        """:func:`measure_before` in this run's cache, seeded from its archive."""
        return measure_before(model, pss, hcfg, self.cache_dir(), self.before_path, self.key)

    def rows(self, label: str) -> dict[int, dict]:
        """``{case id: row}`` of method ``label`` in the cache."""
        from kn_lens.experiment import read_jsonl

        return read_jsonl(self.cache_dir() / f"{label}.jsonl", row_id)

    def restore(self) -> None:
        """Rows of this run in the archive that the cache lacks are appended to it."""
        from kn_lens.experiment import restore_from_archive

        restore_from_archive(self.archive_path, self.key, "label", self.cache_dir(),
                             file_of=lambda label: f"{label}.jsonl", id_of=lambda label: row_id)

    def archive(self) -> None:
        """Every raw row computed so far, gzipped next to the results (rows of the archive this
        cache lacks kept), and the pre-edit measurement (``results/cache`` is not committed)."""
        from kn_lens.experiment import read_jsonl, write_archive

        self.restore()
        cache = self.cache_dir()
        n = write_archive(self.archive_path, self.key,
                          ({"label": p.stem, **d} for p in sorted(cache.glob("*.jsonl"))
                           for d in read_jsonl(p, row_id).values()))
        print(f"{n} rows archived in {self.archive_path}")
        before = cache / "before.pkl"
        if before.exists():
            states = pickle.loads(before.read_bytes())
            write_archive(self.before_path, self.key,
                          ({"kind": "before", "i": i, "state": s.to_dict()}
                           for i, s in enumerate(states)))


# --------------------------------------------------------------------------- rows as sweep items


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkEdit:
    """The input of a ``benchmark_edit`` item: one edit of ``requests`` (one request, or a batch)
    by the item's editor (``neurons``: a given neuron set, e.g. KNE's reused ensembles; None: the
    editor locates its own), judged by the harness (``harness``) on the run's probe sets
    against the run's pre-edit measurement of them (``probes`` / ``before``, measured once for
    every request), with dPPL on the ``reference`` prose: in the generation protocol's rows when
    the harness generates, else as each row's ``"dppl"``."""

    requests: tuple["EditRequest", ...]
    probes: tuple[Any, ...]  # ProbeSet per request
    before: tuple[Any, ...]  # RequestState per request
    harness: Any  # HarnessConfig
    reference: Any = None  # kn_lens.sweep.ReferenceSpec | None
    neurons: Any = None  # NeuronSet | None

    def __post_init__(self) -> None:
        for name in ("requests", "probes", "before"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.requests or not len(self.requests) == len(self.probes) == len(self.before):
            raise ConfigError("BenchmarkEdit: one probe set and one pre-edit state per request, "
                              f"got {len(self.requests)} / {len(self.probes)} / "
                              f"{len(self.before)}")

    @property
    def fact(self):  # the index's subject / relation columns
        return self.requests[0].fact


def benchmark_item(model, requests, probes, before, *, method: str, config: Any, harness: Any,
                   reference: Any = None, neurons: Any = None, seed: int = 0):
    """The ``benchmark_edit`` :class:`~kn_lens.sweep.WorkItem` of one edit (see
    :class:`BenchmarkEdit`; ``model``: a model or its :class:`~kn_lens.sweep.ModelSpec`)."""
    from kn_lens.sweep.items import WorkItem, spec_of

    job = BenchmarkEdit(requests=requests, probes=probes, before=before, harness=harness,
                        reference=reference, neurons=neurons)
    return WorkItem("benchmark_edit", method, job, spec_of(model), config, seed=seed)


def run_benchmark_edit(model, item) -> list[dict]:
    """A worker's ``benchmark_edit`` item: the edit (timed; a request the editor refuses with a
    typed error is judged as no edit and says why), judged -> one row dict per request:
    ``{"row", "seconds", "n_params", "n_requests_in_edit", "refused"}`` (+ ``"dppl"`` when the
    harness does not generate)."""
    from kn_lens.edit import Edit, edit
    from kn_lens.edit.optimise import earlier_seconds, forget, kept
    from kn_lens.errors import KnLensError
    from kn_lens.evaluate.harness import edit_dppl, judge
    from kn_lens.models import model_info
    from kn_lens.sweep.kinds import prepared_reference

    job = item.payload

    def make():
        t0 = time.perf_counter()
        refused = None
        try:
            e = edit(model, list(job.requests), method=item.method, config=item.config,
                     neurons=job.neurons, seed=item.seed or 0)
        except KnLensError as exc:  # the method cannot make this edit: judged as no edit
            refused = f"{type(exc).__name__}: {exc}"
            e = Edit((), "refused", item.method, model_info(model))
        # a resumed edit (a killed batch continued from its saved optimisation) reports what
        # it cost in all: the killed runs' seconds up to their last save, then this run's
        return e, earlier_seconds() + time.perf_counter() - t0, refused
    # inside a sweep (every item runs in optimise.resumable) a long edit is kept until its
    # judgement is done: a batch edit of hours killed while being judged is not made again
    e, secs, refused = kept("finished_edit", make)
    reference = None if job.reference is None else prepared_reference(model, job.reference)
    rows = judge(model, e, list(job.probes), list(job.before), config=job.harness,
                 reference=reference, edit_index=job.requests[0].case_id)
    extra = {}
    if reference is not None and "generation" not in job.harness.protocols:
        extra["dppl"] = edit_dppl(model, e, reference)
    forget("finished_edit")
    return [{"row": r.to_dict(), "seconds": secs, "n_params": e.n_params, **extra,
             "n_requests_in_edit": len(job.requests), "refused": refused} for r in rows]


def _register() -> None:
    from kn_lens.sweep.items import ItemKind, available_kinds, get_kind, register_kind

    if "benchmark_edit" not in available_kinds():
        edits = get_kind("edit")  # the same editors, configs and versions
        register_kind(ItemKind(
            name="benchmark_edit", run="kn_lens.edit.benchmark:run_benchmark_edit",
            methods=edits.methods, config_class=edits.config_class,
            method_version=edits.method_version, payload=BenchmarkEdit))


_register()

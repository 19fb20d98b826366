"""Loaders for public fact / edit datasets from local files (download them yourself).

- :func:`load_pararel` - ParaRel (Elazar et al. 2021): a folder with one ``<relation>.jsonl`` of
  patterns per relation (``{"pattern": "[X] is the capital of [Y]."}``, in the repository under
  ``data/pattern_data/graphs_json/``) and one ``<relation>.jsonl`` of T-REx facts per relation
  (``{"sub_label", "obj_label"}``, under ``data/trex_lms_vocab/``) -> :class:`Dataset`.
- :func:`load_counterfact` - ROME's ``counterfact.json`` -> list of :class:`EditRequest`.
- :func:`load_knowedit` - KnowEdit JSON files (EasyEdit; ZsRE, wiki_counterfact, wiki_recent, ...)
  -> list of :class:`EditRequest`.

A missing file or a file in another format raises :class:`~kn_lens.errors.DataFileError` naming the
file and what was expected.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kn_lens.errors import DataFileError, KnLensError
from kn_lens.facts import EditRequest, Fact, LabelledPrompt, Relation, validate_template

# --------------------------------------------------------------------------- helpers


def _read_json(path: Path, expected: str) -> Any:
    if not path.is_file():
        raise DataFileError(f"{path} does not exist; expected {expected}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFileError(f"{path} is not valid JSON ({e}); expected {expected}") from None


def _read_jsonl(path: Path, expected: str) -> list[dict]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{n} is not a JSON line ({e}); expected {expected}") from None
        if not isinstance(rec, dict):
            raise DataFileError(f"{path}:{n} is not a JSON object; expected {expected}")
        out.append(rec)
    return out


def _first_str(x: Any) -> str | None:
    """The first string in a str / list[str] / list[list[str]] ground truth (KnowEdit)."""
    while isinstance(x, list) and x:
        x = x[0]
    return x.strip() if isinstance(x, str) and x.strip() else None


# --------------------------------------------------------------------------- ParaRel

_PATTERN_DIRS = ("pattern_data/graphs_json", "data/pattern_data/graphs_json", "patterns", "pattern")
_FACT_DIRS = ("trex_lms_vocab", "data/trex_lms_vocab")


def pararel_pattern_to_template(pattern: str) -> str | None:
    """ParaRel pattern -> kn-lens template, or None when [Y] is not at the end.

    ``"[X] is the capital of [Y] ."`` -> ``"{} is the capital of"``; the final ``.`` (with or
    without a space before it) is stripped, runs of spaces are collapsed, and the pattern must
    contain exactly one ``[X]`` and end with ``[Y]``.
    """
    p = re.sub(r"\s+", " ", pattern).strip()
    p = re.sub(r"\s*\.$", "", p).strip()
    if p.count("[X]") != 1 or p.count("[Y]") != 1 or not p.endswith("[Y]"):
        return None
    if "{" in p or "}" in p:
        return None
    t = p[: -len("[Y]")].rstrip().replace("[X]", "{}")
    try:
        return validate_template(t)
    except KnLensError:
        return None


def _find_dir(root: Path, candidates: tuple[str, ...]) -> Path | None:
    for c in candidates:
        if (root / c).is_dir() and any((root / c).glob("*.jsonl")):
            return root / c
    return None


def load_pararel(path: str | Path, *, relations: list[str] | None = None):
    """Load ParaRel patterns and T-REx facts from a local checkout of the ParaRel data.

    ``path`` is the repository root, its ``data/`` folder, or any folder holding a pattern folder
    (``pattern_data/graphs_json/``, ``patterns/`` or ``pattern/``) and ``trex_lms_vocab/``.
    Patterns whose object slot [Y] is not at the end cannot be used by a causal LM and are
    dropped; the counts are in ``dataset.info`` (``patterns_kept``, ``patterns_dropped``,
    ``relations_without_templates``, ``duplicate_facts_dropped``). Relations keep their Wikidata
    ids (``P36``) as id and name.
    """
    from kn_lens.datasets.core import Dataset

    root = Path(path)
    if not root.is_dir():
        raise DataFileError(
            f"{root} is not a folder; expected the ParaRel data folder with pattern_data/graphs_json/"
            " (or patterns/) and trex_lms_vocab/ holding one <relation>.jsonl each"
        )
    pdir, fdir = _find_dir(root, _PATTERN_DIRS), _find_dir(root, _FACT_DIRS)
    if pdir is None or fdir is None:
        raise DataFileError(
            f"{root}: expected ParaRel folders {' or '.join(_PATTERN_DIRS)} (patterns: "
            '{"pattern": "[X] ... [Y]."} per line) and trex_lms_vocab/ (facts: {"sub_label", '
            '"obj_label"} per line); found ' + ", ".join(sorted(p.name for p in root.iterdir()))
        )
    rels: dict[str, Relation] = {}
    facts: list[Fact] = []
    kept = dropped = dup = 0
    dropped_by_rel: dict[str, int] = {}
    no_templates: list[str] = []
    want = set(relations) if relations is not None else None
    for pfile in sorted(pdir.glob("*.jsonl")):
        rid = pfile.stem
        if want is not None and rid not in want:
            continue
        templates: list[str] = []
        for rec in _read_jsonl(pfile, '{"pattern": "[X] ... [Y]."} per line'):
            if "pattern" not in rec:
                raise DataFileError(f"{pfile}: a line has no 'pattern' field; expected ParaRel patterns")
            t = pararel_pattern_to_template(str(rec["pattern"]))
            if t is None:
                dropped += 1
                dropped_by_rel[rid] = dropped_by_rel.get(rid, 0) + 1
            elif t not in templates:
                templates.append(t)
                kept += 1
        if not templates:
            no_templates.append(rid)
            continue
        ffile = fdir / f"{rid}.jsonl"
        if not ffile.is_file():
            no_templates.append(rid)
            continue
        rels[rid] = Relation(id=rid, name=rid, templates=tuple(templates))
        seen: set[str] = set()
        for rec in _read_jsonl(ffile, '{"sub_label": ..., "obj_label": ...} per line'):
            if "sub_label" not in rec or "obj_label" not in rec:
                raise DataFileError(f"{ffile}: a line lacks 'sub_label'/'obj_label' (T-REx format)")
            s, o = str(rec["sub_label"]).strip(), str(rec["obj_label"]).strip()
            if not s or not o or s in seen:
                dup += 1
                continue
            seen.add(s)
            facts.append(Fact(s, rid, o))
    if not rels:
        raise DataFileError(f"{root}: no relation with usable patterns and facts was found")
    info = {"source": f"pararel:{root}", "patterns_kept": kept, "patterns_dropped": dropped,
            "patterns_dropped_by_relation": dropped_by_rel,
            "relations_without_templates": no_templates, "duplicate_facts_dropped": dup}
    return Dataset(rels, facts, name="pararel", info=info)


# --------------------------------------------------------------------------- CounterFact

_CF_EXPECTED = ("a JSON list of CounterFact records {case_id, requested_rewrite: {prompt (with '{}'), "
                "subject, target_new: {str}, target_true: {str}, relation_id}, paraphrase_prompts, "
                "neighborhood_prompts, attribute_prompts, generation_prompts}")


def load_counterfact(path: str | Path, *, limit: int | None = None) -> list[EditRequest]:
    """ROME's ``counterfact.json`` -> EditRequests.

    Mapping: rewrite prompt = ``requested_rewrite.prompt`` rendered with the subject;
    paraphrases = ``paraphrase_prompts``; neighbourhood = ``neighborhood_prompts`` (answer:
    ``target_true``, which must stay). ``attribute_prompts`` (other subjects whose true object is
    ``target_new``) and ``generation_prompts`` have no EditRequest field and are not kept.
    """
    path = Path(path)
    data = _read_json(path, _CF_EXPECTED)
    if not isinstance(data, list):
        raise DataFileError(f"{path}: top level is {type(data).__name__}; expected {_CF_EXPECTED}")
    out = []
    for i, rec in enumerate(data[:limit] if limit is not None else data):
        try:
            rw = rec["requested_rewrite"]
            subject = rw["subject"].strip()
            template = rw["prompt"]
            new, true = rw["target_new"]["str"].strip(), rw["target_true"]["str"].strip()
            rel_id = rw.get("relation_id", "counterfact")
        except (KeyError, TypeError, AttributeError) as e:
            raise DataFileError(f"{path}: record {i} lacks {e}; expected {_CF_EXPECTED}") from None
        if template.count("{}") != 1:
            raise DataFileError(f"{path}: record {i} prompt {template!r} needs exactly one '{{}}'")
        fact = Fact(subject, rel_id, true)
        out.append(EditRequest(
            fact=fact, new_object=new, prompts=(template.replace("{}", subject),),
            paraphrase_prompts=tuple(rec.get("paraphrase_prompts", ())),
            neighbourhood=tuple(LabelledPrompt(p, true) for p in rec.get("neighborhood_prompts", ())),
            case_id=int(rec.get("case_id", i)),
        ))
    return out


# --------------------------------------------------------------------------- KnowEdit

_KE_EXPECTED = ("a JSON list of KnowEdit records {subject, prompt, target_new, ground_truth, "
                "rephrase|rephrase_prompt, portability: {Subject_Aliasing, Reasoning, ...}, "
                "locality: {Relation_Specificity, Forgetfulness}}")

KNOWEDIT_UNKNOWN = "<unknown>"  # object of insertion records (wiki_recent) that have no ground truth


def _ke_prompts(items: Any) -> list[tuple[str, str | None]]:
    """[(prompt, first ground truth)] from a KnowEdit list of {prompt, ground_truth} items."""
    out = []
    for it in items or []:
        if not isinstance(it, dict) or "prompt" not in it:
            continue
        prompts = it["prompt"] if isinstance(it["prompt"], list) else [it["prompt"]]
        gts = it.get("ground_truth")
        for j, p in enumerate(prompts):
            gt = gts[j] if isinstance(it["prompt"], list) and isinstance(gts, list) and j < len(gts) else gts
            if isinstance(p, str) and p.strip():
                out.append((p.strip(), _first_str(gt)))
    return out


def load_knowedit(path: str | Path, *, limit: int | None = None, relation: str = "knowedit",
                  skip_without_ground_truth: bool = False) -> list[EditRequest]:
    """A KnowEdit JSON file (EasyEdit's format) -> EditRequests.

    Mapping (field names as in EasyEdit's ``KnowEditDataset``): fact = (``subject``, ``relation``,
    ``ground_truth``) - ZsRE-style lists take their first answer; records without a ground truth
    (knowledge insertion, wiki_recent) get object ``KNOWEDIT_UNKNOWN`` unless
    ``skip_without_ground_truth``; rewrite prompt = ``prompt``; paraphrases = ``rephrase`` /
    ``rephrase_prompt``; alias prompts = ``portability.Subject_Aliasing``; relation specificity =
    ``locality.Relation_Specificity`` and ``locality.Forgetfulness`` (answers must stay).
    ``portability.Reasoning`` / ``Logical_Generalization`` have no EditRequest field and are not
    kept. Records that are not subject edits (WikiBio ``text``/``labels``) are rejected.
    """
    path = Path(path)
    data = _read_json(path, _KE_EXPECTED)
    if not isinstance(data, list):
        raise DataFileError(f"{path}: top level is {type(data).__name__}; expected {_KE_EXPECTED}")
    out = []
    for i, rec in enumerate(data[:limit] if limit is not None else data):
        if not isinstance(rec, dict) or not {"subject", "prompt", "target_new"} <= set(rec):
            raise DataFileError(
                f"{path}: record {i} lacks subject/prompt/target_new; expected {_KE_EXPECTED}")
        new = _first_str(rec["target_new"])
        subject, prompt = str(rec["subject"]).strip(), str(rec["prompt"]).strip()
        if not new or not subject or not prompt:
            raise DataFileError(f"{path}: record {i} has an empty subject, prompt or target_new")
        true = _first_str(rec.get("ground_truth"))
        if true is None:
            if skip_without_ground_truth:
                continue
            true = KNOWEDIT_UNKNOWN
        if true == new:
            continue  # not an edit
        reph = rec.get("rephrase", rec.get("rephrase_prompt"))
        reph = [reph] if isinstance(reph, str) else list(reph or [])
        port = rec.get("portability") or {}
        loc = rec.get("locality") or {}
        spec = _ke_prompts(loc.get("Relation_Specificity")) + _ke_prompts(loc.get("Forgetfulness"))
        fact = Fact(subject, relation, true)
        out.append(EditRequest(
            fact=fact, new_object=new, prompts=(prompt,),
            paraphrase_prompts=tuple(p.strip() for p in reph if isinstance(p, str) and p.strip()),
            relation_specificity=tuple(LabelledPrompt(p, a) for p, a in spec if a),
            alias_prompts=tuple(p for p, _ in _ke_prompts(port.get("Subject_Aliasing"))),
            case_id=i,
        ))
    return out

"""A user's relations in one JSON file -> a validated :class:`~kn_lens.datasets.Dataset`.

The format (what ``kn-lens study`` reads)::

    {"relations": [
      {"id": "river_country", "name": "river in country",
       "templates": ["The {} flows through", "The river {} is in"],
       "facts": [["Danube", "Austria"], ["Loire", "France"]],
       "group": "geography", "description": "optional"}]}

A bare list of relations is accepted too, each fact may be ``[subject, object]``,
``[subject, object, [aliases]]`` or ``{"subject", "object", "aliases"}``; and a folder (or the
``relations.json`` of one) in the built-in two-file format (``relations.json`` + ``facts.json``).
:func:`check_relations_file` returns *every* problem with its location (relation id and index,
template or fact index) without raising; :func:`load_relations_file` raises one
:class:`~kn_lens.errors.DataFileError` listing them all (``.problems``) before any model work.
Nothing is written anywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kn_lens.errors import DataFileError, InvalidFactError, InvalidTemplateError
from kn_lens.facts import Fact, Relation, validate_template

__all__ = ["Problem", "check_relations_file", "load_relations_file", "RELATION_KEYS"]

RELATION_KEYS = {"id", "name", "templates", "facts", "group", "description"}
_REQUIRED = ("id", "name", "templates", "facts")
_FACT_KEYS = {"subject", "object", "aliases"}


@dataclass(frozen=True)
class Problem:
    where: str  # e.g. "relation 'river_country' (#0), template 1"
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _text_problem(value, what: str) -> str | None:
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__} {value!r:.40}"
    if not value.strip():
        return f"empty {what}"
    if value != value.strip():
        return f"{what} {value!r} has leading/trailing whitespace"
    return None


def _parse_fact(raw, where: str, problems: list) -> tuple[str, str, tuple[str, ...]] | None:
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - _FACT_KEYS)
        if unknown:
            problems.append(Problem(where, f"unknown key(s) {unknown} (a fact has subject, object, "
                                           "aliases)"))
        subj, obj, aliases = raw.get("subject"), raw.get("object"), raw.get("aliases", [])
    elif isinstance(raw, (list, tuple)) and len(raw) in (2, 3):
        subj, obj = raw[0], raw[1]
        aliases = raw[2] if len(raw) == 3 else []
    else:
        problems.append(Problem(where, f"a fact is [subject, object] (or [subject, object, "
                                       f"[aliases]] / an object), got {raw!r:.60}"))
        return None
    bad = False
    for value, what in ((subj, "subject"), (obj, "object")):
        p = _text_problem(value, what)
        if p:
            problems.append(Problem(where, p))
            bad = True
    if not isinstance(aliases, (list, tuple)) or any(_text_problem(a, "alias") for a in aliases):
        problems.append(Problem(where, f"aliases must be a list of non-empty strings, got "
                                       f"{aliases!r:.60}"))
        bad = True
    return None if bad else (subj, obj, tuple(aliases))


def _check_relations(records, source: str, builtin_ids: set[str]) -> tuple[list[Problem], list]:
    problems: list[Problem] = []
    parsed = []  # (Relation, [(subject, object, aliases)])
    if not isinstance(records, list) or not records:
        return [Problem(source, "expected {\"relations\": [...]} or a non-empty list of relations")], []
    seen_ids: dict[str, int] = {}
    for i, r in enumerate(records):
        rid = r.get("id") if isinstance(r, dict) else None
        where = f"relation {rid!r} (#{i})" if isinstance(rid, str) else f"relation #{i}"
        if not isinstance(r, dict):
            problems.append(Problem(where, f"a relation is an object with keys {sorted(RELATION_KEYS)}"))
            continue
        unknown = sorted(set(r) - RELATION_KEYS)
        if unknown:
            problems.append(Problem(where, f"unknown key(s) {unknown} (allowed: "
                                           f"{sorted(RELATION_KEYS)})"))
        missing = [k for k in _REQUIRED if k not in r]
        if missing:
            problems.append(Problem(where, f"missing key(s) {missing}"))
        for key in ("id", "name"):
            if key in r:
                p = _text_problem(r[key], key)
                if p:
                    problems.append(Problem(where, p))
        if isinstance(rid, str):
            if rid in seen_ids:
                problems.append(Problem(where, f"id {rid!r} is also relation #{seen_ids[rid]}"))
            seen_ids.setdefault(rid, i)
            if rid in builtin_ids:
                problems.append(Problem(where, f"id {rid!r} is a built-in relation's: choose "
                                               "another (the study compares with the built-ins)"))
        for key in ("group", "description"):
            if r.get(key) is not None and not isinstance(r[key], str):
                problems.append(Problem(where, f"{key} must be a string"))
        templates = r.get("templates")
        good_templates = []
        if "templates" in r:
            if not isinstance(templates, list) or not templates:
                problems.append(Problem(where, "templates must be a non-empty list of strings"))
            else:
                for j, t in enumerate(templates):
                    try:
                        validate_template(t)
                        if t in good_templates:
                            problems.append(Problem(f"{where}, template {j}",
                                                    f"repeats template {good_templates.index(t)}"))
                        else:
                            good_templates.append(t)
                    except InvalidTemplateError as e:
                        problems.append(Problem(f"{where}, template {j}", str(e)))
        facts = []
        if "facts" in r:
            raw_facts = r.get("facts")
            if not isinstance(raw_facts, list) or not raw_facts:
                problems.append(Problem(where, "facts must be a non-empty list of [subject, object]"))
            else:
                subjects: dict[str, int] = {}
                for j, raw in enumerate(raw_facts):
                    fw = f"{where}, fact {j}"
                    f = _parse_fact(raw, fw, problems)
                    if f is None:
                        continue
                    if f[0] in subjects:
                        k = subjects[f[0]]
                        same = facts[[s for s, _, _ in facts].index(f[0])][1] == f[1]
                        problems.append(Problem(fw, f"subject {f[0]!r} again (fact {k}"
                                                    f"{', the same object' if same else ', another object: a fact has one answer'})"))
                        continue
                    subjects[f[0]] = j
                    facts.append(f)
        if isinstance(rid, str) and good_templates and not any(
                p.where.startswith(where) for p in problems):
            parsed.append((Relation(rid, r["name"], tuple(good_templates), r.get("group"),
                                    r.get("description") or ""), facts))
    return problems, parsed


def _read(path: Path) -> tuple[object | None, list[Problem]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return None, [Problem(str(path), f"not UTF-8 text ({e})")]
    try:
        return json.loads(text), []
    except json.JSONDecodeError as e:
        return None, [Problem(f"{path}, line {e.lineno} column {e.colno}", f"bad JSON: {e.msg}")]


def _two_files(folder: Path) -> tuple[object | None, list[Problem]]:
    rel, p1 = _read(folder / "relations.json")
    facts, p2 = _read(folder / "facts.json")
    if p1 or p2:
        return None, p1 + p2
    if not isinstance(rel, list) or not isinstance(facts, list):
        return None, [Problem(str(folder), "relations.json and facts.json must each hold a list")]
    by_rel: dict = {}
    problems = []
    ids = {r.get("id") for r in rel if isinstance(r, dict)}
    for j, f in enumerate(facts):
        if not isinstance(f, dict) or f.get("relation") not in ids:
            problems.append(Problem(f"{folder / 'facts.json'}, fact {j}",
                                    f"needs a 'relation' defined in relations.json, got {f!r:.80}"))
            continue
        by_rel.setdefault(f["relation"], []).append(
            {k: v for k, v in f.items() if k != "relation"})
    records = [dict(r, facts=by_rel.get(r.get("id"), [])) if isinstance(r, dict) else r
               for r in rel]
    return (None, problems) if problems else (records, [])


def check_relations_file(path: str | Path, *, builtin_ids: set[str] | None = None
                         ) -> tuple[list[Problem], list]:
    """Every problem of the relations file at ``path`` (see the module doc), and the relations
    parsed without problems. ``builtin_ids`` (default: the built-in dataset's relation ids) may
    not be reused."""
    path = Path(path)
    if builtin_ids is None:
        from kn_lens.datasets.core import builtin_dataset

        builtin_ids = set(builtin_dataset().relations)
    if path.is_dir() or (path.name == "relations.json" and (path.parent / "facts.json").exists()):
        folder = path if path.is_dir() else path.parent
        if not (folder / "relations.json").is_file() or not (folder / "facts.json").is_file():
            return [Problem(str(folder), "a folder needs relations.json and facts.json")], []
        doc, problems = _two_files(folder)
    elif not path.is_file():
        return [Problem(str(path), "no such file")], []
    else:
        doc, problems = _read(path)
    if problems:
        return problems, []
    if isinstance(doc, dict):
        unknown = sorted(set(doc) - {"relations"})
        extra = [Problem(str(path), f"unknown top-level key(s) {unknown} (only 'relations')")] \
            if unknown else []
        more, parsed = _check_relations(doc.get("relations"), str(path), builtin_ids)
        return extra + more, parsed
    return _check_relations(doc, str(path), builtin_ids)


def load_relations_file(path: str | Path, *, name: str | None = None,
                        builtin_ids: set[str] | None = None):
    """The relations and facts of ``path`` as a :class:`~kn_lens.datasets.Dataset`; raises
    :class:`DataFileError` listing every problem (attribute ``problems``) when there is any."""
    from kn_lens.datasets.core import Dataset

    problems, parsed = check_relations_file(path, builtin_ids=builtin_ids)
    if problems:
        err = DataFileError(f"{path}: {len(problems)} problem(s) in the relations file:\n" +
                            "\n".join(f"  - {p}" for p in problems))
        err.problems = problems
        raise err
    rels = {r.id: r for r, _ in parsed}
    try:
        facts = tuple(Fact(s, r.id, o, a) for r, fs in parsed for s, o, a in fs)
        return Dataset(rels, facts, name or Path(path).stem, info={"source": str(path)})
    except (InvalidFactError, InvalidTemplateError) as e:  # a check this module missed
        raise DataFileError(f"{path}: {e}") from e

"""A keyed result store: one file per item, a SQLite index beside the files, claims.

Layout of a store folder::

    index.sqlite              the index (WAL mode; several processes on one machine may share it)
    items/ab/<key>.pt         the result (torch.save of the item's result object)
    items/ab/<key>.json       its key (the canonical JSON of everything that determines it) and
                              its index row: the files alone rebuild the index (:meth:`reindex`)

Every file is written to a temporary name in the same folder, flushed to disk and renamed
(``os.replace``), the result first and its ``.json`` last: an item whose ``.json`` exists is
complete, and a process killed at any moment leaves at most an invisible temporary file.

The index's ``items`` table has one row per item with queryable columns (``kind``, ``method``,
``version``, ``model``, ``model_id``, ``subject``, ``relation``, ``object``, ``template``,
``seed``, ``status`` = ``done`` | ``failed``, ``error``, ``attempts``, ``created``,
``seconds``, ``worker``, ``bytes``) and the full ``key_json``; open it with any SQLite client.
``claims`` holds the items being computed (owner, host, pid, heartbeat): a sweep claims an item
before computing it and releases it when the result is stored, so two sweeps sharing a store
never compute (or write) the same item; a claim whose owner died (same machine: its process is
gone; elsewhere: no heartbeat for ``ttl`` seconds) is taken over. ``models`` records the weights
fingerprint each model identity was computed with.

SQLite's WAL mode needs every process to be on the same machine: keep the store on a local disk
of the machine that runs the sweep's driver (with Ray, workers send results to the driver, which
alone writes). Shards on several machines write to stores of their own; :meth:`merge` joins them.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch

from kn_lens.errors import ConfigError, StoreError

__all__ = ["ResultStore", "Record", "FILTER_COLUMNS"]

_SCHEMA_VERSION = "1"
_COLUMNS = ("key", "status", "kind", "kind_version", "method", "version", "model", "model_id",
            "subject", "relation", "object", "template", "seed", "created", "seconds", "worker",
            "attempts", "error", "bytes", "key_json")
FILTER_COLUMNS = ("key", "status", "kind", "kind_version", "method", "version", "model",
                  "model_id", "subject", "relation", "object", "template", "seed", "worker")
_SQLITE_VARS = 900  # stay below SQLite's bound-parameter limit


@dataclass(frozen=True)
class Record:
    """One row of the index."""

    key: str
    status: str
    kind: str
    kind_version: int
    method: str
    version: int
    model: str
    model_id: str
    subject: str | None
    relation: str | None
    object: str | None
    template: int | None
    seed: int | None
    created: float
    seconds: float | None
    worker: str | None
    attempts: int
    error: str | None
    bytes: int | None
    key_json: str

    @property
    def key_dict(self) -> dict:
        """Everything that determines this item's result."""
        return json.loads(self.key_json)

    def to_dict(self) -> dict:
        return {c: getattr(self, c) for c in _COLUMNS if c != "key_json"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write(path: Path, write, fsync: bool = True) -> int:
    """``write(fileobj)`` into a temporary file beside ``path``, fsync, rename. Returns bytes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


class ResultStore:
    """A store folder (created when missing unless ``create=False``). ``claim_ttl``: seconds
    without a heartbeat after which another process's claim counts as abandoned. ``fsync``:
    flush every result to disk before it counts as stored (a killed *process* never loses or
    corrupts an item either way; without fsync, a crash of the whole machine can: such an item
    is then unreadable and :meth:`load` says to recompute it)."""

    def __init__(self, root: str | os.PathLike, *, create: bool = True, claim_ttl: float = 120.0,
                 fsync: bool = True):
        self.root = Path(root)
        if not (self.root / "index.sqlite").exists():
            if not create:
                raise StoreError(f"{self.root} is not a kn-lens result store (no index.sqlite)")
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"{self.root} exists and is not a folder")
        if not claim_ttl > 0:
            raise ConfigError(f"claim_ttl must be > 0 seconds, got {claim_ttl}")
        self.claim_ttl = float(claim_ttl)
        self.fsync = bool(fsync)
        self.items_dir = self.root / "items"
        self.items_dir.mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._local = threading.local()
        self._heartbeat: tuple[threading.Thread, threading.Event] | None = None
        self._init_schema()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.root)!r})"

    # ------------------------------------------------------------------ connection

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.root / "index.sqlite", timeout=60.0, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextlib.contextmanager
    def _tx(self):
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _init_schema(self) -> None:
        conn = self._conn()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.root}: SQLite could not switch the index to WAL mode (got "
                             f"{mode!r}); is the folder on a network file system? Use a local disk")
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            c.execute("CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, status TEXT NOT NULL,"
                      " kind TEXT, kind_version INTEGER, method TEXT, version INTEGER, model TEXT,"
                      " model_id TEXT, subject TEXT, relation TEXT, object TEXT, template INTEGER,"
                      " seed INTEGER, created REAL, seconds REAL, worker TEXT, attempts INTEGER,"
                      " error TEXT, bytes INTEGER, key_json TEXT)")
            c.execute("CREATE INDEX IF NOT EXISTS items_by_method ON items(kind, method, model_id)")
            c.execute("CREATE INDEX IF NOT EXISTS items_by_fact ON items(relation, subject)")
            c.execute("CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT, "
                      "host TEXT, pid INTEGER, claimed REAL, heartbeat REAL)")
            c.execute("CREATE TABLE IF NOT EXISTS models (model_id TEXT PRIMARY KEY, identity TEXT,"
                      " fingerprint TEXT, first_seen REAL, worker TEXT)")
            row = c.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                raise StoreError(f"{self.root}: index schema {row[0]} is not this kn-lens's "
                                 f"({_SCHEMA_VERSION}); rebuild it with ResultStore.reindex()")

    def close(self) -> None:
        self.stop_heartbeat()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ paths

    def path(self, key: str) -> Path:
        return self.items_dir / key[:2] / f"{key}.pt"

    def _key(self, ref) -> str:
        key = ref if isinstance(ref, str) else getattr(ref, "key", None)
        if not isinstance(key, str) or not key:
            raise ConfigError(f"expected a key, a WorkItem or a Record, got {type(ref).__name__}")
        return key

    # ------------------------------------------------------------------ what is stored

    def done_keys(self, keys: Iterable[str]) -> set[str]:
        """The keys among ``keys`` whose results are stored (index row done and file present)."""
        keys = list(dict.fromkeys(keys))
        out: set[str] = set()
        conn = self._conn()
        for s in range(0, len(keys), _SQLITE_VARS):
            chunk = keys[s:s + _SQLITE_VARS]
            q = f"SELECT key FROM items WHERE status='done' AND key IN ({','.join('?' * len(chunk))})"
            out.update(k for (k,) in conn.execute(q, chunk))
        return {k for k in out if self.path(k).exists() and self.path(k).with_suffix(".json").exists()}

    def has(self, ref) -> bool:
        return bool(self.done_keys([self._key(ref)]))

    def __contains__(self, ref) -> bool:
        return self.has(ref)

    # ------------------------------------------------------------------ claims

    def _stale(self, host: str, pid: int, heartbeat: float, now: float) -> bool:
        if host == self.host and not _pid_alive(pid):
            return True
        return now - heartbeat > self.claim_ttl

    def claim(self, keys: Sequence[str]) -> dict[str, Literal["ok", "done", "busy"]]:
        """Claim items for this process: ``ok`` (claimed now, or already ours), ``done`` (stored
        meanwhile: nothing to do) or ``busy`` (another live process computes it). Atomic: of two
        processes claiming the same key, one gets ``ok``."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, Literal["ok", "done", "busy"]] = {}
        now = time.time()
        with self._tx() as c:  # the index is read inside the transaction: no item done meanwhile
            for k in keys:
                st = c.execute("SELECT status FROM items WHERE key=?", (k,)).fetchone()
                if st is not None and st[0] == "done" and self.path(k).exists():
                    out[k] = "done"
                    continue
                row = c.execute("SELECT owner, host, pid, heartbeat FROM claims WHERE key=?",
                                (k,)).fetchone()
                if row is not None and row[0] != self.owner and not self._stale(row[1], row[2],
                                                                                 row[3], now):
                    out[k] = "busy"
                    continue
                c.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?)",
                          (k, self.owner, self.host, os.getpid(), now, now))
                out[k] = "ok"
        return out

    def release(self, keys: Iterable[str] | None = None) -> None:
        """Give up this process's claims (all of them when ``keys`` is None)."""
        with self._tx() as c:
            if keys is None:
                c.execute("DELETE FROM claims WHERE owner=?", (self.owner,))
            else:
                c.executemany("DELETE FROM claims WHERE key=? AND owner=?",
                              [(k, self.owner) for k in keys])

    def claims(self) -> list[dict]:
        """Every current claim (owner, host, pid, claimed, heartbeat, whether it is stale)."""
        now = time.time()
        rows = self._conn().execute("SELECT key, owner, host, pid, claimed, heartbeat FROM claims")
        return [{"key": k, "owner": o, "host": h, "pid": p, "claimed": c, "heartbeat": hb,
                 "stale": self._stale(h, p, hb, now)} for k, o, h, p, c, hb in rows]

    def heartbeat(self) -> None:
        with self._tx() as c:
            c.execute("UPDATE claims SET heartbeat=? WHERE owner=?", (time.time(), self.owner))

    def start_heartbeat(self, interval: float | None = None) -> None:
        """Refresh this process's claims every ``interval`` seconds (default ttl / 4) in a
        daemon thread, until :meth:`stop_heartbeat`."""
        if self._heartbeat is not None:
            return
        every = self.claim_ttl / 4 if interval is None else float(interval)
        stop = threading.Event()

        def beat():
            while not stop.wait(every):
                try:
                    self.heartbeat()
                except sqlite3.Error:  # a busy index: the next beat comes soon enough
                    pass
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()

        t = threading.Thread(target=beat, name="kn-lens-store-heartbeat", daemon=True)
        t.start()
        self._heartbeat = (t, stop)

    def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            t, stop = self._heartbeat
            stop.set()
            t.join(timeout=10)
            self._heartbeat = None

    # ------------------------------------------------------------------ models

    def check_model(self, model_id: str, identity: str, fingerprint: str, worker: str = "") -> None:
        """Record the weights fingerprint of a model identity, or refuse one that differs from
        the fingerprint earlier results of that identity were computed with."""
        with self._tx() as c:
            row = c.execute("SELECT fingerprint, worker FROM models WHERE model_id=?",
                            (model_id,)).fetchone()
            if row is None:
                c.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?)",
                          (model_id, identity, fingerprint, time.time(), worker))
                return
        if row[0] != fingerprint:
            raise StoreError(
                f"worker {worker!r} loaded model {json.loads(identity).get('name')!r} with weights "
                f"(fingerprint {fingerprint}) that differ from the ones the stored results of this "
                f"model were computed with (fingerprint {row[0]}, worker {row[1]!r}): another "
                "package version, checkpoint or device conversion, or a modified model. Use the "
                "same weights everywhere, or another store")

    # ------------------------------------------------------------------ writing

    def put(self, item, result: Any, *, seconds: float | None = None, worker: str = "",
            attempts: int = 1) -> bool:
        """Store ``item``'s result (atomically: result file, then its ``.json``, then the index
        row; the claim is released). Returns False, writing nothing, when another process has
        taken over this item's claim (this process was presumed dead)."""
        key = item.key
        row = self._conn().execute("SELECT owner FROM claims WHERE key=?", (key,)).fetchone()
        if row is not None and row[0] != self.owner:
            return False
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = _atomic_write(path, lambda f: torch.save(result, f), self.fsync)
        rec = {**item.labels(), "key": key, "status": "done", "created": time.time(),
               "seconds": seconds, "worker": worker, "attempts": attempts, "error": None,
               "bytes": size, "key_json": item.key_json}
        side = json.dumps(rec, sort_keys=True).encode()
        _atomic_write(path.with_suffix(".json"), lambda f: f.write(side), self.fsync)
        self._upsert(rec, release=True)
        return True

    def put_failure(self, item, error: str, *, worker: str = "", attempts: int = 1) -> None:
        """Record that ``item`` failed (kept until a later run computes it; never replaces a
        stored result)."""
        rec = {**item.labels(), "key": item.key, "status": "failed", "created": time.time(),
               "seconds": None, "worker": worker, "attempts": attempts, "error": error,
               "bytes": None, "key_json": item.key_json}
        with self._tx() as c:
            cur = c.execute("SELECT status FROM items WHERE key=?", (item.key,)).fetchone()
            if cur is None or cur[0] != "done":
                c.execute(f"INSERT OR REPLACE INTO items ({','.join(_COLUMNS)}) VALUES "
                          f"({','.join('?' * len(_COLUMNS))})", [rec[c_] for c_ in _COLUMNS])
            c.execute("DELETE FROM claims WHERE key=? AND owner=?", (item.key, self.owner))

    def _upsert(self, rec: dict, release: bool) -> None:
        with self._tx() as c:
            c.execute(f"INSERT OR REPLACE INTO items ({','.join(_COLUMNS)}) VALUES "
                      f"({','.join('?' * len(_COLUMNS))})", [rec[c_] for c_ in _COLUMNS])
            if release:
                c.execute("DELETE FROM claims WHERE key=? AND owner=?", (rec["key"], self.owner))

    # ------------------------------------------------------------------ reading

    def record(self, ref) -> Record:
        key = self._key(ref)
        row = self._conn().execute(f"SELECT {','.join(_COLUMNS)} FROM items WHERE key=?",
                                   (key,)).fetchone()
        if row is None:
            raise KeyError(f"no item {key} in {self.root}")
        return Record(*row)

    def load(self, ref, *, decode: bool = True) -> Any:
        """The stored result of a key, ``WorkItem`` or ``Record`` (as its kind decodes it, e.g.
        float16-stored scores come back as float32 ``NeuronScores``). Results are pickles: load
        only stores you trust. Raises ``KeyError`` when it is not stored."""
        key = self._key(ref)
        path = self.path(key)
        if not path.exists() or not path.with_suffix(".json").exists():
            raise KeyError(f"no stored result for {key} in {self.root}")
        try:
            value = torch.load(path, weights_only=False)
        except Exception as exc:
            raise StoreError(f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it "
                             "and run the sweep again to recompute it") from exc
        if decode:
            from kn_lens.sweep.items import get_kind

            kind = json.loads(path.with_suffix(".json").read_text())["kind"]
            try:
                dec = get_kind(kind).decode
            except ConfigError:
                dec = None
            if dec is not None:
                value = dec(value)
        return value

    def __getitem__(self, ref) -> Any:
        return self.load(ref)

    def query(self, *, status: str | None = "done", order: str = "created", limit: int | None = None,
              **filters) -> list[Record]:
        """Index rows matching every filter (a value, or a list of values for any of them);
        columns: :data:`FILTER_COLUMNS`. ``status=None`` lists failed items too."""
        where, params = [], []
        if status is not None:
            filters["status"] = status
        for col, val in filters.items():
            if col not in FILTER_COLUMNS:
                raise ConfigError(f"cannot filter on {col!r}; columns: {FILTER_COLUMNS}")
            if isinstance(val, (list, tuple, set, frozenset)):
                val = list(val)
                where.append(f"{col} IN ({','.join('?' * len(val))})")
                params += val
            elif val is None:
                where.append(f"{col} IS NULL")
            else:
                where.append(f"{col}=?")
                params.append(val)
        if order not in _COLUMNS:
            raise ConfigError(f"cannot order by {order!r}")
        q = f"SELECT {','.join(_COLUMNS)} FROM items"
        if where:
            q += " WHERE " + " AND ".join(where)
        q += f" ORDER BY {order}, key"
        if limit is not None:
            q += f" LIMIT {int(limit)}"
        return [Record(*r) for r in self._conn().execute(q, params)]

    def results(self, **filters) -> Iterator[tuple[Record, Any]]:
        """``(record, result)`` for every stored item matching ``filters`` (see :meth:`query`)."""
        for rec in self.query(**filters):
            yield rec, self.load(rec.key)

    def summary(self) -> list[dict]:
        """Counts, total seconds and bytes per (kind, method, model, status)."""
        q = ("SELECT kind, method, model, status, COUNT(*), SUM(seconds), SUM(bytes) FROM items "
             "GROUP BY kind, method, model, status ORDER BY kind, method, model, status")
        return [{"kind": k, "method": m, "model": mo, "status": s, "n": n,
                 "seconds": secs or 0.0, "bytes": b or 0}
                for k, m, mo, s, n, secs, b in self._conn().execute(q)]

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple]:
        """A read-only SQL query on the index (tables ``items``, ``claims``, ``models``)."""
        if not query.lstrip().lower().startswith(("select", "with")):
            raise ConfigError("ResultStore.sql runs SELECT queries only")
        return list(self._conn().execute(query, params))

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM items WHERE status='done'").fetchone()[0]

    # ------------------------------------------------------------------ maintenance

    def reindex(self) -> int:
        """Rebuild the index's ``items`` rows from the files (after copying item folders in, or
        losing the index). Rows of items whose files are gone are dropped; failed rows are
        kept. Returns the number of stored items."""
        recs = []
        for side in self.items_dir.glob("*/*.json"):
            if not side.with_suffix(".pt").exists():
                continue
            try:
                rec = json.loads(side.read_text())
            except (OSError, ValueError):
                continue
            if rec.get("key") != side.stem or any(c not in rec for c in _COLUMNS):
                continue
            recs.append(rec)
        with self._tx() as c:
            c.execute("DELETE FROM items WHERE status='done'")
            c.executemany(f"INSERT OR REPLACE INTO items ({','.join(_COLUMNS)}) VALUES "
                          f"({','.join('?' * len(_COLUMNS))})",
                          [[r[c_] for c_ in _COLUMNS] for r in recs])
        return len(recs)

    def merge(self, other: "ResultStore | str | os.PathLike") -> int:
        """Copy into this store the items of ``other`` that it lacks (shards computed on other
        machines into stores of their own). Returns how many were copied."""
        src = other if isinstance(other, ResultStore) else ResultStore(other, create=False)
        mine = self.done_keys(r.key for r in src.query())
        n = 0
        for rec in src.query():
            if rec.key in mine:
                continue
            a = src.path(rec.key)
            if not a.exists() or not a.with_suffix(".json").exists():
                continue
            b = self.path(rec.key)
            b.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(b, lambda f: f.write(a.read_bytes()))
            _atomic_write(b.with_suffix(".json"),
                          lambda f: f.write(a.with_suffix(".json").read_bytes()))
            self._upsert({c: getattr(rec, c) for c in _COLUMNS}, release=False)
            n += 1
        for model_id, identity, fp, _, worker in src.sql("SELECT * FROM models"):
            self.check_model(model_id, identity, fp, worker)
        if src is not other:
            src.close()
        return n

"""The sweep driver: :func:`sweep` computes the items a store lacks, with any executor."""
from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kn_lens.errors import ConfigError, KnLensError
from kn_lens.sweep.store import ResultStore

__all__ = ["SweepConfig", "SweepResult", "sweep", "sweep_results", "SkippedItem", "parse_shard",
           "shard_of", "BACKENDS", "add_sweep_arguments", "sweep_overrides"]

BACKENDS = ("inprocess", "pool", "ray")


def parse_shard(spec: "str | tuple[int, int] | None") -> tuple[int, int] | None:
    """``"i/n"`` (or ``(i, n)``) -> ``(i, n)`` with ``0 <= i < n``; ``None`` stays ``None``."""
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise ConfigError(f"a shard looks like i/n (e.g. 0/4), got {spec!r}") from None
    else:
        try:
            i, n = (int(x) for x in spec)
        except (TypeError, ValueError):
            raise ConfigError(f"a shard is (i, n) or 'i/n', got {spec!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"shard {i}/{n}: need 0 <= i < n")
    return i, n


def shard_of(key: str, n: int) -> int:
    """The shard (of ``n``) an item belongs to: a function of its key alone, so every machine
    agrees on the partition whatever the order or the other items of its list."""
    return int(key[:12], 16) % n


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    backend: str = "inprocess"  # "inprocess" | "pool" | "ray"
    workers: int = 1  # worker processes / Ray actors (inprocess: 1)
    shard: tuple[int, int] | None = None  # (i, n) or "i/n": only the items of shard i of n
    address: str | None = None  # ray: the cluster to join (None: the running Ray, or a local one)
    device: str = "cpu"  # where workers load the model ("cuda": pool workers spread over GPUs)
    threads: int | None = None  # torch threads per worker (None: inprocess keeps the process's,
    #                             pool / ray workers use 1)
    cpus_per_worker: float = 1.0  # ray resources per actor
    gpus_per_worker: float = 0.0
    prefetch: int = 2  # items queued per worker (hides the hand-over latency)
    max_retries: int = 2  # times an item is retried after its worker died
    claim_ttl: float = 120.0  # seconds without heartbeat before another sweep's claim is taken
    fsync: bool = True  # flush each result to disk (ResultStore(fsync=...)); False: faster writes
    wait_for_others: bool = True  # at the end, wait for items other live sweeps are computing
    imports: tuple[str, ...] = ()  # modules workers import first (your kinds / locators)
    fail_fast: bool = False  # stop at the first item that raises

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.backend == "inprocess" and self.workers != 1:
            raise ConfigError("the inprocess backend has one worker; use --backend pool or ray "
                              "for more")
        object.__setattr__(self, "shard", parse_shard(self.shard))
        object.__setattr__(self, "imports", tuple(self.imports))
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be None or an integer >= 1, got {self.threads!r}")
        if self.backend != "inprocess" and self.threads is None:
            object.__setattr__(self, "threads", 1)
        if self.max_retries < 0 or self.prefetch < 1 or not self.claim_ttl > 0:
            raise ConfigError("max_retries >= 0, prefetch >= 1 and claim_ttl > 0")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ConfigError("cpus_per_worker and gpus_per_worker must be >= 0")
        if self.address is not None and self.backend != "ray":
            raise ConfigError("address is for the ray backend")


@dataclass(frozen=True)
class SweepResult:
    """What a sweep did. ``keys``: every item of this sweep (this shard), in the given order;
    load results with :meth:`load` / :meth:`results` or from the store."""

    store: Path
    keys: tuple[str, ...]
    computed: int  # computed and stored by this sweep
    stored_before: int  # already in the store: skipped
    done_elsewhere: int  # stored meanwhile by another sweep sharing the store
    busy: int  # still being computed by another live sweep (wait_for_others=False)
    failed: tuple[tuple[str, str], ...]  # (key, error)
    retries: int  # items resubmitted after their worker died
    seconds: float  # wall time, including start-up
    compute_seconds: float  # sum of the computed items' own times
    startup_seconds: float  # executor start (processes / actors) until the first submit
    backend: str
    workers: int
    shard: tuple[int, int] | None = None
    extras: dict = field(default_factory=dict, compare=False)

    @property
    def items_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")

    @property
    def complete(self) -> bool:
        return not self.failed and not self.busy

    def load(self, ref: "int | str") -> Any:
        """The result of item ``ref`` (its index in ``keys`` or its key)."""
        key = self.keys[ref] if isinstance(ref, int) else ref
        with ResultStore(self.store, create=False) as st:
            return st.load(key)

    def results(self) -> list[Any]:
        """Every item's result in order (``None`` for items not stored)."""
        with ResultStore(self.store, create=False) as st:
            done = st.done_keys(self.keys)
            return [st.load(k) if k in done else None for k in self.keys]

    def summary(self) -> str:
        s = (f"{len(self.keys)} items: {self.computed} computed, {self.stored_before} already "
             f"stored, {self.done_elsewhere} stored by another sweep")
        if self.busy:
            s += f", {self.busy} still computed by another sweep"
        if self.failed:
            s += f", {len(self.failed)} failed"
        if self.retries:
            s += f", {self.retries} retried after a worker died"
        rate = f"{self.items_per_second:.2f} items/s" if self.computed else "nothing computed"
        return f"{s} ({self.backend} x{self.workers}; {self.seconds:.1f} s, {rate})"


def sweep(items: Sequence, store: "ResultStore | str | os.PathLike", *,
          config: SweepConfig = SweepConfig(), model=None, progress: bool = True,
          log: Callable[[str], None] = print,
          on_result: Callable[[Any, Any], None] | None = None) -> SweepResult:
    """Compute every item of ``items`` that ``store`` does not hold yet, store each result as it
    arrives, and say what was done.

    Items already stored are skipped (nothing is computed twice); items are claimed in the store
    before they are computed, so sweeps sharing a store divide the work between them, and a
    sweep killed at any point resumes with every stored item kept. ``model``: a live model to
    use in-process for items of its spec (other backends load models from the items' specs).
    Items that raise are recorded as failed (``SweepResult.failed``) and tried again by the next
    sweep; ``fail_fast`` stops at the first one instead (raising its error as a
    ``KnLensError``). ``on_result(item, result)`` is called in the driver for each item this
    sweep computes, once it is stored (progress lines, or a copy of the result kept elsewhere).
    The model is left as it was."""
    from kn_lens.sweep.executors import Crash, make_executor

    t_start = time.perf_counter()
    if not isinstance(config, SweepConfig):
        raise ConfigError(f"config must be a SweepConfig, got {type(config).__name__}")
    own_store = not isinstance(store, ResultStore)
    st = ResultStore(store, claim_ttl=config.claim_ttl, fsync=config.fsync) if own_store else store
    say = log if progress else (lambda s: None)

    by_key: dict = {}
    for it in items:
        if not hasattr(it, "key") or not hasattr(it, "runner"):
            raise ConfigError(f"sweep() takes WorkItems, got {type(it).__name__}")
        by_key.setdefault(it.key, it)
    keys = tuple(by_key)
    if config.shard is not None:
        i, n = config.shard
        keys = tuple(k for k in keys if shard_of(k, n) == i)
    stored = st.done_keys(keys)
    todo = deque(by_key[k] for k in keys if k not in stored)
    total = len(keys)
    say(f"[sweep] {total} items{'' if config.shard is None else f' (shard {config.shard[0]}/{config.shard[1]})'}"
        f": {len(stored)} already stored, {len(todo)} to compute ({config.backend} x"
        f"{config.workers}) -> {st.root}")

    computed = done_elsewhere = retries = 0
    compute_seconds = 0.0
    failed: list[tuple[str, str]] = []
    attempts: dict[str, int] = {}
    checked_models: set = set()
    deferred: deque = deque()
    startup = 0.0
    executor = None
    last_log = time.perf_counter()
    t_compute = time.perf_counter()

    def report(force: bool = False) -> None:
        nonlocal last_log
        now = time.perf_counter()
        if not force and now - last_log < 2.0:
            return
        last_log = now
        done = len(stored) + computed + done_elsewhere
        rate = computed / max(now - t_compute, 1e-9)
        # items claimed by other sweeps are theirs to compute (and counted as stored only when
        # this sweep polls them again, once its own queue is empty): not in this sweep's eta
        left = total - done - len(failed) - len(deferred)
        eta = f", eta {left / rate:.0f} s" if rate > 0 and left > 0 else ""
        say(f"[sweep] {done}/{total} stored ({computed} computed here, {len(failed)} failed"
            f"{f', {len(deferred)} with other sweeps' if deferred else ''}) {rate:.2f} items/s{eta}")

    def handle(item, out) -> None:
        nonlocal computed, retries, compute_seconds, done_elsewhere
        if isinstance(out, Crash):
            for q in out.queued:  # not started: resubmitted, no attempt counted
                todo.appendleft(q)
            attempts[item.key] = attempts.get(item.key, 0) + 1
            if attempts[item.key] <= config.max_retries:
                retries += 1
                say(f"[sweep] worker died on {item.key[:12]} ({out.reason}); retrying "
                    f"({attempts[item.key]}/{config.max_retries})")
                todo.appendleft(item)
            else:
                msg = f"worker died {attempts[item.key]} times: {out.reason}"
                failed.append((item.key, msg))
                st.put_failure(item, msg, worker="", attempts=attempts[item.key])
                if config.fail_fast:
                    raise KnLensError(f"item {item.key} ({item.kind}/{item.method}): {msg}")
            return
        n_attempts = attempts.get(item.key, 0) + 1
        if out.error is not None:
            failed.append((item.key, out.error))
            st.put_failure(item, out.error, worker=out.worker, attempts=n_attempts)
            if config.fail_fast:
                raise KnLensError(f"item {item.key} ({item.kind}/{item.method}) failed: "
                                  f"{out.error}")
            return
        if out.fingerprint is not None and (item.model, out.fingerprint) not in checked_models:
            st.check_model(item.model.identity_hash(),
                           json.dumps(item.model.identity(), sort_keys=True), out.fingerprint,
                           out.worker)
            checked_models.add((item.model, out.fingerprint))
        if st.put(item, out.result, seconds=out.seconds, worker=out.worker, attempts=n_attempts):
            computed += 1
            compute_seconds += out.seconds
            if on_result is not None:
                on_result(item, out.result)
        else:  # another sweep took the item over (this one was presumed dead): its result counts
            done_elsewhere += 1

    st.start_heartbeat()
    try:
        if todo:
            first = next((it.model for it in todo if it.needs_model), None)
            executor = make_executor(config, model=model, preload=first,
                                     partial=st.root / "partial")
            startup = time.perf_counter() - t_start
            t_compute = time.perf_counter()
        in_flight = 0
        while todo or in_flight or deferred:
            # submit up to capacity, claiming first
            while todo and in_flight < executor.capacity:
                batch = []
                while todo and len(batch) < executor.capacity - in_flight:
                    batch.append(todo.popleft())
                status = st.claim([it.key for it in batch])
                for it in batch:
                    s = status[it.key]
                    if s == "ok":
                        executor.submit(it)
                        in_flight += 1
                    elif s == "done":
                        done_elsewhere += 1
                    else:
                        deferred.append(it)
            if in_flight:
                for item, out in executor.wait():
                    in_flight -= 1
                    if isinstance(out, Crash):
                        in_flight -= len(out.queued)
                    handle(item, out)
                report()
                continue
            if deferred:  # everything left is with other sweeps
                if not config.wait_for_others:
                    break
                time.sleep(min(2.0, config.claim_ttl / 8))
                status = st.claim([it.key for it in deferred])
                keep: deque = deque()
                for it in deferred:
                    s = status[it.key]
                    if s == "ok":
                        todo.append(it)
                    elif s == "done":
                        done_elsewhere += 1
                    else:
                        keep.append(it)
                deferred = keep
                report()
    finally:
        if executor is not None:
            executor.close()
        st.stop_heartbeat()
        st.release()
        if own_store:
            st.close()
    result = SweepResult(
        store=st.root, keys=keys, computed=computed, stored_before=len(stored),
        done_elsewhere=done_elsewhere, busy=len(deferred), failed=tuple(failed), retries=retries,
        seconds=time.perf_counter() - t_start, compute_seconds=compute_seconds,
        startup_seconds=startup, backend=config.backend, workers=config.workers,
        shard=config.shard)
    say(f"[sweep] {result.summary()}")
    return result


@dataclass(frozen=True)
class SkippedItem:
    """Stands for the result of an item that raised one of the errors the caller accepts
    (:func:`sweep_results`' ``skip``), e.g. a query whose subject causal tracing cannot find."""

    key: str
    error: str  # "Type: message"


def sweep_results(items: Sequence, store: "ResultStore | str | os.PathLike", *,
                  config: SweepConfig = SweepConfig(), model=None, progress: bool = True,
                  log: Callable[[str], None] = print, skip: tuple[type, ...] = (),
                  on_result: Callable[[Any, Any], None] | None = None) -> list:
    """:func:`sweep`, then every item's result, in the order of ``items`` (what a script's heavy
    step needs: all of them or none). An item that raised an error of a type in ``skip`` gives a
    :class:`SkippedItem` in its place. Raises :class:`~kn_lens.errors.SweepIncompleteError` when
    any other item is not stored: it failed (its error is listed; the next run tries it again),
    it belongs to another shard (``config.shard``), or another sweep still computes it. Every
    item stored meanwhile stays stored. ``model``: the live model the in-process backend uses
    for items of its spec (the other backends load it in each worker from the items' spec)."""
    from kn_lens.errors import SweepIncompleteError

    own = not isinstance(store, ResultStore)
    st = ResultStore(store, claim_ttl=config.claim_ttl, fsync=config.fsync) if own else store
    try:
        items = list(items)
        res = sweep(items, st, config=config, progress=progress, log=log, on_result=on_result,
                    model=model if config.backend == "inprocess" else None)
        errors = dict(res.failed)
        accepted = tuple(f"{t.__name__}:" for t in skip)
        done = st.done_keys(it.key for it in items)
        out, failed, missing = [], {}, set()
        for it in items:
            if it.key in done:
                out.append(st.load(it.key))
            elif accepted and errors.get(it.key, "").startswith(accepted):
                out.append(SkippedItem(it.key, errors[it.key]))
            elif it.key in errors:
                failed[it.key] = f"{it.kind}/{it.method}: {errors[it.key]}"
            else:
                missing.add(it.key)
        if failed or missing:
            parts = []
            if failed:
                shown = "; ".join(list(failed.values())[:3])
                parts.append(f"{len(failed)} failed ({shown}{'; ...' if len(failed) > 3 else ''}"
                             "); run again to retry them")
            if missing and config.shard is not None:
                parts.append(f"{len(missing)} belong to other shards than {config.shard[0]}/"
                             f"{config.shard[1]}: run the other shards, then once without "
                             "--shard")
            elif missing:
                parts.append(f"{len(missing)} are still being computed by another sweep on "
                             f"{st.root}")
            raise SweepIncompleteError(
                f"{len(failed) + len(missing)} of {len(set(done) | set(failed) | missing)} items "
                f"are not stored in {st.root}: " + "; ".join(parts),
                missing=tuple(failed) + tuple(sorted(missing)), result=res)
        return out
    finally:
        if own:
            st.close()


# --------------------------------------------------------------------------- command lines

_ARGS = ("backend", "workers", "shard", "address", "device", "threads", "cpus_per_worker",
         "gpus_per_worker")


def add_sweep_arguments(parser, *, exclude: Sequence[str] = ()) -> None:
    """The executor options of ``kn-lens sweep`` on an argparse parser (for scripts that run
    their heavy steps through a sweep); read them back with :func:`sweep_overrides`. ``exclude``:
    options (by field name, e.g. ``"threads"``) the parser already has for its own use."""
    bad = sorted(set(exclude) - set(_ARGS))
    if bad:
        raise ConfigError(f"add_sweep_arguments: unknown option(s) {bad}; choose from {_ARGS}")

    def add(name: str, **kw) -> None:
        if name not in exclude:
            parser.add_argument("--" + name.replace("_", "-"), default=None, **kw)

    add("backend", choices=list(BACKENDS), help="where items are computed (default inprocess)")
    add("workers", type=int, help="worker processes / Ray actors")
    add("shard", metavar="I/N", help="only shard I of N of the items (a fixed partition by key: "
        "run I = 0..N-1 anywhere, e.g. one per machine)")
    add("address", help="ray: the cluster to join (e.g. auto or ray://host:10001)")
    add("device", help="where workers load the model (cpu, cuda)")
    add("threads", type=int, help="torch threads per worker")
    add("cpus_per_worker", type=float)
    add("gpus_per_worker", type=float)


def sweep_overrides(args, *, exclude: Sequence[str] = ()) -> dict:
    """The SweepConfig fields set on the command line (:func:`add_sweep_arguments`), but those in
    ``exclude`` (options the parser has with another meaning); a parser's own ``--threads`` /
    ``--device`` are read too (the script's are the workers'), a threads of 0 (torch's default)
    counting as unset."""
    out = {k: getattr(args, k) for k in _ARGS
           if k not in exclude and getattr(args, k, None) is not None}
    if out.get("threads") == 0:
        del out["threads"]
    return out

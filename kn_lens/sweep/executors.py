"""Executors: where a sweep's items are computed. All three give the same results.

- :class:`InProcess`: in the calling process, one item after another (default);
- :class:`Pool`: a local pool of worker processes (``spawn``ed; each loads the model once and
  keeps it; with ``device="cuda"`` and several GPUs, worker i uses GPU i mod count);
- :class:`RayExecutor`: Ray actors (each loads the model once and is fed items one after another),
  on a local Ray or a cluster (``address``).

The executors only compute: each item comes back to the sweep's driver as an :class:`Outcome`
(the result, or the error the item raised) and the driver alone writes to the store. A worker
that dies while computing an item (killed, out of memory, a crash in native code) is replaced by
a new one; the item it held is retried (``max_retries`` times) and the items queued behind it
are resubmitted without counting an attempt against them. With ``prefetch`` > 1 the item it held
is inferred as the oldest one without a result: a worker killed right after finishing an item can
take that item's reply with it (``os._exit`` does not flush it), and then the finished item is
charged the attempt and the one that crashed is resubmitted free; ``prefetch=1`` makes the charge
exact (one item in flight per worker), at one hand-over latency per item.
"""
from __future__ import annotations

import gc
import importlib
import os
import pickle
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from kn_lens.errors import ConfigError, KnLensError, OptionalDependencyError

__all__ = ["Outcome", "Crash", "InProcess", "Pool", "RayExecutor", "make_executor", "import_ray"]


@dataclass(frozen=True)
class Outcome:
    """What a worker hands back for one item."""

    key: str
    result: Any
    seconds: float  # the item's compute time (model loading excluded)
    worker: str
    fingerprint: str | None  # weights fingerprint of the worker's model
    error: str | None = None  # "Type: message" when the item raised
    load_seconds: float = 0.0  # model loading done for this item (first item of a worker)


@dataclass(frozen=True)
class Crash:
    """The worker computing ``item`` died; ``queued`` items it held were not started."""

    item: Any
    reason: str
    queued: tuple = ()


def _resolve(path: str):
    module, _, fn = path.partition(":")
    return getattr(importlib.import_module(module), fn)


def _device_of(device: str, index: int) -> str:
    """``cuda`` with several GPUs visible spreads workers over them."""
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{index % torch.cuda.device_count()}"
    return device


class Worker:
    """What one worker holds: the model it loaded last (one at a time) and its fingerprint."""

    def __init__(self, device: str = "cpu", threads: int | None = None,
                 imports: Sequence[str] = (), worker_id: str = "", model=None, preload=None,
                 partial: str | Path | None = None):
        # partial: where an item's long optimisations keep their state (the store's
        # ``partial/<item key>``, kn_lens.edit.optimise.resumable): a killed item resumes
        self.partial = None if partial is None else Path(partial)
        if threads:
            torch.set_num_threads(int(threads))
        for m in imports:
            importlib.import_module(m)
        self.device = device
        node = os.uname().nodename
        self.id = worker_id if ":" in worker_id else f"{node}:{worker_id or os.getpid()}"
        self._spec = None
        self._model = None
        self._fp = None
        self._load_errors: dict = {}  # spec -> why it could not be loaded (not retried per item)
        if model is not None:  # a live model (in-process)
            from kn_lens.sweep.modelspec import ModelSpec, weights_fingerprint

            self._spec, self._model = ModelSpec.from_model(model), model
            self._fp = weights_fingerprint(model)
        elif preload is not None:  # the sweep's first model, loaded while the worker starts
            try:
                self.model(preload)
            except Exception:  # reported by the first item that needs it
                self._model = self._spec = None

    def model(self, spec):
        if spec in self._load_errors:
            raise self._load_errors[spec]
        if self._spec is None or spec.identity_hash() != self._spec.identity_hash():
            from kn_lens.sweep.modelspec import weights_fingerprint

            self._model = self._spec = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            try:
                self._model = spec.load(self.device)
            except Exception as exc:
                self._load_errors[spec] = exc
                raise
            self._spec = spec
            self._fp = weights_fingerprint(self._model)
        return self._model

    def run(self, item) -> Outcome:
        from kn_lens.hooks import active_hook_count

        t0 = time.perf_counter()
        model = None
        if item.needs_model:
            try:
                model = self.model(item.model)
            except Exception as exc:  # a model that cannot be loaded: every item says why
                return Outcome(item.key, None, 0.0, self.id, None,
                               f"model {item.model.label} could not be loaded: "
                               f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
        t1 = time.perf_counter()
        hooks_before = 0 if model is None else active_hook_count(model)
        try:
            if self.partial is None:
                result = _resolve(item.runner)(model, item)
            else:
                from kn_lens.edit.optimise import resumable

                with resumable(self.partial / item.key):
                    result = _resolve(item.runner)(model, item)
                try:  # each optimisation removed its state when it completed
                    (self.partial / item.key).rmdir()
                except OSError:  # never created, or not empty
                    pass
            error = None
        except Exception as exc:
            result, error = None, f"{type(exc).__name__}: {exc}"
        finally:
            if model is not None and active_hook_count(model) > hooks_before:
                model.reset_hooks(including_permanent=False)  # never keep a hooked model
        return Outcome(item.key, result, time.perf_counter() - t1, self.id,
                       self._fp if model is not None else None, error, t1 - t0)


# --------------------------------------------------------------------------- in-process


class InProcess:
    """Items computed in this process, in order (``model``: a live model to use for its spec)."""

    name = "inprocess"

    def __init__(self, *, device: str = "cpu", threads: int | None = None,
                 imports: Sequence[str] = (), model=None, preload=None, partial=None, **_):
        self._threads_before = torch.get_num_threads()
        self._threads = threads
        self.worker = Worker(device, threads, imports, f"{os.uname().nodename}:{os.getpid()}",
                             model=model, preload=preload, partial=partial)
        self._queue: deque = deque()

    @property
    def capacity(self) -> int:
        return 1

    def submit(self, item) -> None:
        self._queue.append(item)

    def wait(self) -> list:
        item = self._queue.popleft()
        return [(item, self.worker.run(item))]

    def close(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads_before)


# --------------------------------------------------------------------------- local pool


def _pool_main(conn, device: str, threads: int | None, imports: Sequence[str], worker_id: str,
               sys_path: Sequence[str], preload, partial=None
               ) -> None:  # pragma: no cover - runs in the worker
    import sys

    for p in reversed(sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    worker = Worker(device, threads, imports, worker_id, preload=preload, partial=partial)
    conn.send_bytes(_dumps("ready"))
    while True:
        try:
            item = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if item is None:
            break
        out = worker.run(item)
        try:
            data = _dumps(out)
        except Exception as exc:  # the result cannot be pickled
            data = _dumps(Outcome(out.key, None, out.seconds, out.worker, out.fingerprint,
                                  f"the result cannot be sent back: {type(exc).__name__}: {exc}"))
        conn.send_bytes(data)


def _dumps(obj) -> bytes:
    """Plain pickling (tensors inline): multiprocessing's own pickler would move every tensor
    through a shared-memory file, which costs far more than copying small results."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class _Slot:
    def __init__(self):
        self.proc = None
        self.conn = None
        self.queue: deque = deque()  # items sent, in order; the first one is being computed
        self.ready = False  # the worker has started (imported kn_lens, torch, ...)


class Pool:
    """A pool of ``workers`` local processes (started with ``spawn``; ``prefetch`` items queued
    per worker)."""

    name = "pool"

    def __init__(self, *, workers: int = 2, device: str = "cpu", threads: int | None = 1,
                 imports: Sequence[str] = (), prefetch: int = 2, preload=None, partial=None,
                 **_):
        import multiprocessing as mp
        import sys

        self._ctx = mp.get_context("spawn")
        self.workers, self.device, self.threads = workers, device, threads
        self.imports, self.prefetch = tuple(imports), max(1, int(prefetch))
        self.preload, self.partial = preload, partial
        # the driver's import path, so that workers import the same kn_lens
        pkg_parent = str(Path(__file__).resolve().parents[2])
        self._sys_path = [pkg_parent] + [p for p in sys.path if p and p != pkg_parent]
        self._slots = [_Slot() for _ in range(workers)]
        self._started = 0
        for i in range(workers):
            self._start(i)
        try:
            for s in self._slots:  # every worker has imported what it needs
                while not s.ready:
                    if s.conn.poll(0.1):
                        s.ready = pickle.loads(s.conn.recv_bytes()) == "ready"
                    elif not s.proc.is_alive():
                        self._startup_failed(s)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _startup_failed(s: "_Slot"):
        raise KnLensError(
            f"a pool worker process exited with code {s.proc.exitcode} while starting, before "
            "computing anything (its error is printed above). When a script starts a sweep with "
            "the pool backend, guard the script's code with `if __name__ == '__main__':` "
            "(workers are spawned and import the main module); check that SweepConfig.imports "
            "are importable")

    def _start(self, i: int, preload: bool = True) -> None:
        slot = self._slots[i]
        parent, child = self._ctx.Pipe(duplex=True)
        self._started += 1
        wid = f"pool{i}.{self._started}"
        env_threads = str(self.threads or 1)
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = env_threads  # inherited by the spawned interpreter
        try:
            proc = self._ctx.Process(target=_pool_main, name=f"kn-lens-{wid}", daemon=True,
                                     args=(child, _device_of(self.device, i), self.threads,
                                           self.imports, wid, self._sys_path,
                                           self.preload if preload else None, self.partial))
            proc.start()
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old
        child.close()
        slot.proc, slot.conn, slot.queue, slot.ready = proc, parent, deque(), False

    @property
    def capacity(self) -> int:
        return self.workers * self.prefetch

    def submit(self, item) -> None:
        i = min(range(self.workers), key=lambda j: len(self._slots[j].queue))
        slot = self._slots[i]
        if not slot.queue and not slot.proc.is_alive():  # died while idle: replace it
            slot.conn.close()
            self._start(i, preload=False)
            slot = self._slots[i]
        slot.queue.append(item)
        try:
            slot.conn.send_bytes(_dumps(item))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker died: wait() reports the crash and the item is resubmitted

    def wait(self) -> list:
        from multiprocessing.connection import wait

        busy = [s for s in self._slots if s.queue]
        if not busy:
            return []
        waitables = {}
        for s in busy:
            waitables[s.conn] = s
            waitables[s.proc.sentinel] = s
        ready = wait(list(waitables))
        out, dead = [], []
        for obj in ready:
            s = waitables[obj]
            if s in dead:
                continue
            eof = False
            try:
                while s.conn.poll():
                    o = pickle.loads(s.conn.recv_bytes())
                    if isinstance(o, str) and o == "ready":
                        s.ready = True
                    else:
                        out.append((s.queue.popleft(), o))
            except (EOFError, OSError):  # the worker is gone (or going): reap it
                eof = True
                s.proc.join(timeout=5)
                if s.proc.is_alive():
                    s.proc.kill()
                    s.proc.join(timeout=5)
            if (eof or not s.proc.is_alive()) and s.queue:
                dead.append(s)
        for s in dead:
            i = self._slots.index(s)
            s.proc.join(timeout=5)
            code = s.proc.exitcode
            if not s.ready:
                self._startup_failed(s)
            items = list(s.queue)
            s.conn.close()
            out.append((items[0], Crash(items[0], f"worker process exited with code {code}",
                                        tuple(items[1:]))))
            self._start(i, preload=False)  # a replacement loads its model when an item needs it
        return out

    def close(self) -> None:
        slots = [s for s in self._slots if s.proc is not None]
        for s in slots:
            try:
                s.conn.send_bytes(_dumps(None))
            except (OSError, BrokenPipeError):
                pass
        for s in slots:
            s.proc.join(timeout=10)
            if s.proc.is_alive():
                s.proc.terminate()
                s.proc.join(timeout=5)
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join(timeout=5)
            s.conn.close()


# --------------------------------------------------------------------------- Ray


def import_ray():
    """``import ray``, or a typed error naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise OptionalDependencyError(
            "the ray backend needs Ray, which is not installed: pip install 'kn-lens[ray]' "
            "(or pip install 'ray>=2.60'); without Ray use --backend pool, or --shard i/n on "
            "several machines") from exc
    return ray


class _RayWorker:  # wrapped by ray.remote in RayExecutor
    def __init__(self, device, threads, imports, worker_id, preload=None, partial=None):
        self.worker = Worker(device, threads, imports, worker_id, preload=preload,
                             partial=partial)

    def ready(self) -> str:
        return self.worker.id

    def pid(self) -> int:
        return os.getpid()

    def run(self, item) -> Outcome:
        return self.worker.run(item)


class RayExecutor:
    """Ray actors, ``workers`` of them (``cpus_per_worker`` / ``gpus_per_worker`` resources
    each), fed ``prefetch`` items at a time. Uses the running Ray when there is one, else
    connects to ``address`` (or starts a local Ray, dashboard off, usage statistics off unless
    set, stopped again at the end). A dead actor is replaced by a new one."""

    name = "ray"

    def __init__(self, *, workers: int = 2, device: str = "cpu", threads: int | None = 1,
                 imports: Sequence[str] = (), prefetch: int = 2, address: str | None = None,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 start_timeout: float = 600.0, preload=None, partial=None, **_):
        ray = import_ray()
        self.ray = ray
        self._started_ray = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kw: dict = {"include_dashboard": False, "log_to_driver": True}
            if address:
                kw["address"] = address
            ray.init(**kw)
            self._started_ray = True
        self.workers, self.prefetch = workers, max(1, int(prefetch))
        pkg_parent = str(Path(__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)
        env = {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads or 1)}
        self._cls = ray.remote(_RayWorker).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0,
            max_task_retries=0, runtime_env={"env_vars": env})
        self._args = (device, threads, tuple(imports), preload, partial)
        self._n = 0
        self._actors: list = [None] * workers
        self._queues: list[deque] = [deque() for _ in range(workers)]
        self._refs: dict = {}  # ref -> slot
        for i in range(workers):
            self._spawn(i)
        ready = [a.ready.remote() for a in self._actors]
        done, pending = ray.wait(ready, num_returns=len(ready), timeout=start_timeout)
        if pending:
            resources = ray.cluster_resources()
            self.close()
            raise KnLensError(
                f"Ray could not start {len(pending)} of {workers} workers within {start_timeout:.0f} s "
                f"(each needs {cpus_per_worker} CPU(s) and {gpus_per_worker} GPU(s); the cluster "
                f"has {resources}): ask for fewer workers or resources")
        try:
            ray.get(done)
        except ray.exceptions.RayError as exc:
            self.close()
            raise KnLensError(f"a Ray worker failed to start: {str(exc).splitlines()[0][:500]} "
                              "(is kn-lens installed on every node, and are SweepConfig.imports "
                              "importable there?)") from exc

    def _spawn(self, i: int, preload: bool = True) -> None:
        self._n += 1
        device, threads, imports, spec, partial = self._args
        self._actors[i] = self._cls.remote(device, threads, imports, f"ray{i}.{self._n}",
                                           spec if preload else None, partial)

    @property
    def capacity(self) -> int:
        return self.workers * self.prefetch

    def submit(self, item) -> None:
        i = min(range(self.workers), key=lambda j: len(self._queues[j]))
        ref = self._actors[i].run.remote(item)
        self._queues[i].append((ref, item))
        self._refs[ref] = i

    def wait(self) -> list:
        ray = self.ray
        if not self._refs:
            return []
        ready, _ = ray.wait(list(self._refs), num_returns=1)
        out = []
        slot = self._refs[ready[0]]
        q = self._queues[slot]
        # results come in submission order per actor: collect the finished ones
        while q:
            ref, item = q[0]
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                break
            try:
                res = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as exc:
                items = [it for _, it in q]
                for r, _ in q:
                    self._refs.pop(r, None)
                q.clear()
                self.ray.kill(self._actors[slot], no_restart=True)
                self._spawn(slot, preload=False)  # loads its model when an item needs it
                out.append((items[0], Crash(items[0], f"Ray worker died: {type(exc).__name__}: "
                                                      f"{str(exc).splitlines()[0][:300]}",
                                            tuple(items[1:]))))
                break
            except ray.exceptions.RayTaskError as exc:  # e.g. the result could not be pickled
                res = Outcome(item.key, None, 0.0, f"ray{slot}", None,
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:500]}")
            q.popleft()
            self._refs.pop(ref, None)
            out.append((item, res))
        return out

    def close(self) -> None:
        for a in self._actors:
            if a is not None:
                try:
                    self.ray.kill(a, no_restart=True)
                except Exception:
                    pass
        self._actors = [None] * self.workers
        if self._started_ray:
            self.ray.shutdown()


def make_executor(config, model=None, preload=None, partial=None):
    """The executor ``config.backend`` names (see :class:`kn_lens.sweep.SweepConfig`);
    ``preload``: a ModelSpec workers load while they start; ``partial``: the folder where
    items keep the state of long optimisations (:class:`Worker`)."""
    kw = dict(workers=config.workers, device=config.device, threads=config.threads,
              imports=config.imports, prefetch=config.prefetch, preload=preload,
              partial=partial)
    if config.backend == "inprocess":
        return InProcess(model=model, **kw)
    if model is not None:
        raise ConfigError(f"the {config.backend} backend loads the model in each worker: pass "
                          "items built from a ModelSpec and no live model")
    if config.backend == "pool":
        return Pool(**kw)
    if config.backend == "ray":
        return RayExecutor(address=config.address, cpus_per_worker=config.cpus_per_worker,
                           gpus_per_worker=config.gpus_per_worker, **kw)
    raise ConfigError(f"unknown backend {config.backend!r}")

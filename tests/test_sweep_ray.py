"""kn_lens.sweep on Ray: one local Ray for the module (2 CPUs, dashboard and usage statistics
off). Ray and in-process give identical results on a tiny model; a worker that dies mid-item is
replaced and the item retried; a finished sweep resumes with nothing to compute. Ray comes from
the test extra (``pip install -e '.[test]'``)."""
from __future__ import annotations

import os

import pytest
import torch

import ray  # the test extra installs it: a missing Ray fails here rather than skipping

from kn_lens import testing
from kn_lens.datasets import builtin_dataset
from kn_lens.locate import IGConfig
from kn_lens.sweep import (ModelSpec, ResultStore, SweepConfig, WorkItem, fact_queries,
                           locate_items, sweep)

SPEC = ModelSpec(name="tiny-gpt2", seed=5)
testing.register_test_kinds()


@pytest.fixture(scope="module")
def local_ray():
    old = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
    else:
        os.environ["RAY_USAGE_STATS_ENABLED"] = old


def test_ray_gives_the_inprocess_results_and_retries_a_dead_worker(local_ray, tmp_path):
    ds = builtin_dataset()
    facts = ds.filter(relations=["country_capital", "landmark_city"], limit_per_relation=2).facts
    queries = fact_queries(SPEC, ds, facts, templates=[0, 1])
    items = (locate_items(SPEC, queries, "contribution")
             + locate_items(SPEC, queries[:3], "ig", IGConfig(steps=4)))
    # its worker process dies (os._exit) on the first attempt, as a killed or crashed worker
    crash = WorkItem("test.probe", "probe",
                     testing.ProbeJob(value=6, crash_marker=str(tmp_path / "crashed")), SPEC)
    ref = sweep(items, tmp_path / "inprocess", config=SweepConfig(threads=1), progress=False)

    # prefetch=1: one item in flight per worker, so the crash is charged to the item that
    # crashed (with more, a reply lost with the dying process can shift it: executors' doc)
    res = sweep(items + [crash], tmp_path / "ray",
                config=SweepConfig(backend="ray", workers=2, prefetch=1), progress=False)
    assert res.complete and res.computed == len(items) + 1
    assert res.retries == 1 and (tmp_path / "crashed").exists()
    for a, b in zip(ref.results(), res.results()):  # bit for bit
        assert torch.equal(a.scores, b.scores)
        assert (a.per_token is None) == (b.per_token is None)
        assert a.per_token is None or torch.equal(a.per_token, b.per_token)
    with ResultStore(tmp_path / "ray") as st:
        assert st.load(crash)["square"] == 36 and st.record(crash).attempts == 2
        workers = {r.worker for r in st.query()}
        assert len(workers) >= 2 and all(":ray" in w for w in workers)
        assert not st.claims()

    again = sweep(items + [crash], tmp_path / "ray", config=SweepConfig(backend="ray", workers=2),
                  progress=False)
    assert again.computed == 0 and again.stored_before == len(items) + 1

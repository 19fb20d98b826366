"""kn_lens.sweep without Ray: keys, the store and its index, claims, resuming a killed sweep, two
sweeps sharing a store, the process pool (same results, a dead worker retried), shards, sweep
files and the CLI. Tiny random models only."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kn_lens import testing
from kn_lens.datasets import builtin_dataset
from kn_lens.errors import ConfigError, OptionalDependencyError, StoreError
from kn_lens.locate import ContributionConfig, IGConfig, locate
from kn_lens.sweep import (ModelSpec, ResultStore, SweepConfig, WorkItem, analysis_items,
                           canonical, edit_items, fact_queries, locate_items, parse_shard,
                           shard_of, sweep)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(name="tiny-llama", seed=3)
testing.register_test_kinds()


@pytest.fixture(scope="module")
def ds():
    return builtin_dataset()


@pytest.fixture(scope="module")
def facts(ds):
    return ds.filter(relations=["country_capital", "city_country"], limit_per_relation=2).facts


@pytest.fixture(scope="module")
def queries(ds, facts):
    return fact_queries(SPEC, ds, facts, templates=[0, 1])


@pytest.fixture(scope="module")
def model():
    return SPEC.load()


def probes(n, spec=SPEC, **kw):
    return [WorkItem("test.probe", "probe", testing.ProbeJob(value=i, **kw), spec) for i in range(n)]


def quiet(**kw):
    return dict(progress=False, **kw)


def same_scores(a, b) -> bool:
    return torch.equal(a.scores, b.scores) and (
        (a.per_token is None and b.per_token is None) or torch.equal(a.per_token, b.per_token))


# --------------------------------------------------------------------------- keys and specs


def test_key_holds_everything_that_determines_the_result(queries):
    q0, q1 = queries[0], queries[1]
    base = locate_items(SPEC, [q0], "ig", IGConfig(steps=4))[0]
    assert base.key == locate_items(SPEC, [q0], "ig", IGConfig(steps=4))[0].key
    # the default config is spelled out: None and the explicit default are the same item
    assert locate_items(SPEC, [q0], "ig")[0].key == locate_items(SPEC, [q0], "ig", IGConfig())[0].key
    others = [
        locate_items(SPEC, [q1], "ig", IGConfig(steps=4))[0],  # another template
        locate_items(SPEC, [q0], "ig", IGConfig(steps=5))[0],  # a config field
        locate_items(SPEC, [q0], "ig_eos", IGConfig(steps=4))[0],  # another method
        locate_items(dataclasses.replace(SPEC, seed=4), [q0], "ig", IGConfig(steps=4))[0],
        locate_items(SPEC, [dataclasses.replace(q0, answer_ids=q0.answer_ids[:1])], "ig",
                     IGConfig(steps=4))[0],  # the answer's token ids
        locate_items(SPEC, [q0], "ig", IGConfig(steps=4), store_dtype="float16")[0],
    ]
    assert len({base.key, *(o.key for o in others)}) == len(others) + 1
    doc = json.loads(base.key_json)
    assert doc["model"]["seed"] == 3 and doc["config"]["steps"] == 4
    assert doc["input"]["prompt"] == q0.prompt and doc["input"]["answer_ids"] == list(q0.answer_ids)
    assert doc["method_version"] == 1 and doc["kind"] == "locate"


def test_items_are_validated():
    with pytest.raises(ConfigError, match="unknown item kind"):
        WorkItem("no-such-kind", "x", 1, SPEC)
    with pytest.raises(ConfigError, match="method 'nope' is unknown"):
        WorkItem("test.probe", "nope", testing.ProbeJob(value=1), SPEC)
    with pytest.raises(ConfigError, match="takes a ProbeJob"):
        WorkItem("test.probe", "probe", 3, SPEC)
    with pytest.raises(ConfigError, match="takes a IGConfig"):
        WorkItem("locate", "ig", None, SPEC, ContributionConfig())
    with pytest.raises(ConfigError, match="cannot build a result key"):
        canonical(object())
    with pytest.raises(ConfigError, match="tiny"):
        ModelSpec(name="smollm2-135m", tiny={"n_layers": 2})
    with pytest.raises(ConfigError, match="unknown size"):
        ModelSpec(name="tiny-gpt2", tiny={"n_heads": 2})


def test_model_spec_identity_view_and_round_trip(ds, facts, model):
    from kn_lens.facts import queries_for_fact

    # the driver builds queries from the tokenizer alone; they equal the loaded model's
    view = SPEC.tokenizer_view()
    for f in facts:
        assert queries_for_fact(view, f, ds.relation_of(f)) == queries_for_fact(
            model, f, ds.relation_of(f))
    # a model from kn_lens.testing describes itself; its identity spells out every size
    spec = ModelSpec.from_model(testing.tiny_gpt2(seed=2, n_layers=2))
    assert spec.identity() == ModelSpec(name="tiny-gpt2", seed=2, tiny={"n_layers": 2}).identity()
    assert ModelSpec.from_model(model) == SPEC
    assert ModelSpec(name="tiny-gpt2").identity_hash() != ModelSpec(name="tiny-llama").identity_hash()
    with pytest.raises(Exception, match="unknown model"):
        ModelSpec(name="no-such-model-anywhere").identity()


# --------------------------------------------------------------------------- in-process + store


def test_inprocess_sweep_stores_once_and_loads_back(tmp_path, queries, model):
    items = (locate_items(SPEC, queries, "contribution")
             + locate_items(SPEC, queries[:2], "ig", IGConfig(steps=4))
             + locate_items(SPEC, queries[:2], "ig", IGConfig(steps=4), store_dtype="float16")
             + analysis_items(SPEC, queries[:1], "synapses"))
    hooks_before = len(model.hook_dict)
    res = sweep(items, tmp_path / "st", config=SweepConfig(threads=1), **quiet())
    assert res.complete and res.computed == len(items) and res.stored_before == 0
    assert len(model.hook_dict) == hooks_before
    # the stored results are what the library computes
    got = res.results()
    for it, r in zip(items[:len(queries)], got):
        (direct,) = locate(model, [it.payload], method="contribution", progress=False)
        assert same_scores(r, direct)
    ig32, ig16 = got[len(queries)], got[len(queries) + 2]
    assert ig16.extras["store_dtype"] == "float16"
    assert torch.allclose(ig16.scores, ig32.scores, atol=1e-3 * float(ig32.scores.abs().max()))
    assert type(got[-1]).__name__ == "Synapses"
    # a second sweep computes nothing; the index answers queries
    again = sweep(items, tmp_path / "st", **quiet())
    assert again.computed == 0 and again.stored_before == len(items)
    st = ResultStore(tmp_path / "st")
    assert len(st) == len(items)
    rows = st.query(kind="locate", method="ig", relation="country_capital", template=1)
    assert len(rows) == 2 and all(r.subject for r in rows)  # float32 and float16 items
    assert {r.key for r in st.query(method=["contribution", "synapses"])} == \
        {it.key for it in items if it.method in ("contribution", "synapses")}
    rec, val = next(st.results(key=items[0].key))
    assert rec.key_dict["input"]["prompt"] == items[0].payload.prompt and same_scores(val, got[0])
    assert st.sql("SELECT COUNT(*) FROM items WHERE kind='analysis'") == [(1,)]
    with pytest.raises(ConfigError):
        st.query(colour="red")
    with pytest.raises(KeyError):
        st.load("0" * 32)
    # the files alone rebuild the index
    st.close()
    for f in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / "st" / f).unlink(missing_ok=True)
    st = ResultStore(tmp_path / "st")
    assert len(st) == 0 and st.reindex() == len(items) and len(st) == len(items)
    assert not list((tmp_path / "st").rglob("*.tmp"))
    st.close()


def test_failed_items_are_recorded_and_tried_again(tmp_path):
    items = probes(3) + [WorkItem("test.probe", "probe", testing.ProbeJob(value=9, fail=True), SPEC)]
    res = sweep(items, tmp_path, **quiet())
    assert res.computed == 3 and len(res.failed) == 1 and not res.complete
    assert "fails on purpose" in res.failed[0][1]
    with ResultStore(tmp_path) as st:
        (row,) = st.query(status="failed")
        assert row.error.startswith("InvalidFactError") and row.key == items[-1].key
        assert items[-1] not in st
    again = sweep(items, tmp_path, **quiet())
    assert again.computed == 0 and again.stored_before == 3 and len(again.failed) == 1
    with pytest.raises(Exception, match="fails on purpose"):
        sweep(items, tmp_path, config=SweepConfig(fail_fast=True), **quiet())


def test_sweep_results_loads_in_order_or_says_what_is_missing(tmp_path):
    from kn_lens.errors import InvalidFactError, SweepIncompleteError
    from kn_lens.sweep import SkippedItem, sweep_results

    bad = WorkItem("test.probe", "probe", testing.ProbeJob(value=9, fail=True), SPEC)
    items = probes(3)[::-1] + [bad]
    seen = []
    with pytest.raises(SweepIncompleteError, match="1 failed .*fails on purpose") as e:
        sweep_results(items, tmp_path, on_result=lambda it, r: seen.append(r["value"]),
                      **quiet())
    assert e.value.missing == (bad.key,) and sorted(seen) == [0, 1, 2]
    out = sweep_results(items, tmp_path, skip=(InvalidFactError,), **quiet())
    assert [r["value"] for r in out[:3]] == [2, 1, 0]  # the items' order
    assert isinstance(out[3], SkippedItem) and out[3].error.startswith("InvalidFactError:")
    with pytest.raises(SweepIncompleteError, match="other shards") as e:
        sweep_results(probes(8), tmp_path / "s", config=SweepConfig(shard=(0, 2)), **quiet())
    assert 0 < len(e.value.missing) < 8 and e.value.result.shard == (0, 2)


def test_known_item(tmp_path, ds, facts, model):
    from kn_lens.datasets import known_facts
    from kn_lens.sweep import known_item, sweep_results

    item = known_item(model, facts, ds)
    assert [r.id for r in item.payload.relations] == ["country_capital", "city_country"]
    assert item.fact is None and known_item(SPEC, facts, ds).key == item.key
    (kf,) = sweep_results([item], tmp_path, model=model, **quiet())
    direct = known_facts(model, facts, ds)
    assert kf.facts == direct.facts and kf.known == direct.known and kf.ranks == direct.ranks
    with pytest.raises(ConfigError, match="no relation"):
        known_item(model, facts, [])


def test_edit_items(tmp_path, ds, facts):
    import warnings

    from kn_lens.datasets import build_edit_requests

    spec = ModelSpec(name="tiny-gpt2", seed=0, tiny={"n_ctx": 256})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reqs = build_edit_requests(ds, facts[:2], seed=0, n_neighbours=2, n_prefixes=1)
    items = edit_items(spec, reqs, "ft_l")
    res = sweep(items, tmp_path, **quiet())
    assert res.complete
    out = res.load(0)
    assert out.edit is not None and out.edit.method == "ft_l" and out.edit.n_params > 0
    (row,) = out.report.rows
    assert row.subject == reqs[0].fact.subject and "ES" in row.after["counterfact"]
    assert items[0].key != edit_items(spec, reqs, "ft_l", seed=1)[0].key


def test_claims_and_models(tmp_path):
    a, b = ResultStore(tmp_path, claim_ttl=60), ResultStore(tmp_path, claim_ttl=60)
    assert a.claim(["k1", "k2"]) == {"k1": "ok", "k2": "ok"}
    assert b.claim(["k1", "k3"]) == {"k1": "busy", "k3": "ok"}
    assert a.claim(["k1"]) == {"k1": "ok"}  # already ours
    a.release(["k1"])
    assert b.claim(["k1"]) == {"k1": "ok"}
    # a claim whose process is gone (same machine) is taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with b._tx() as c:
        c.execute("UPDATE claims SET pid=?, owner='someone-else' WHERE key='k3'", (dead.pid,))
    assert a.claim(["k3"]) == {"k3": "ok"}
    # ... and one without a heartbeat for longer than the ttl
    with a._tx() as c:
        c.execute("UPDATE claims SET heartbeat=heartbeat-1000 WHERE key='k2'")
    assert b.claim(["k2"]) == {"k2": "ok"}
    assert {c["key"] for c in a.claims()} == {"k1", "k2", "k3"}
    a.check_model("m1", '{"name": "x"}', "fp1", "w1")
    a.check_model("m1", '{"name": "x"}', "fp1", "w2")
    with pytest.raises(StoreError, match="differ"):
        b.check_model("m1", '{"name": "x"}', "fp2", "w3")
    a.close()
    b.close()


def test_a_modified_model_is_refused(tmp_path, queries):
    items = locate_items(SPEC, queries[:1], "contribution")
    sweep(items, tmp_path, **quiet())
    m = SPEC.load()
    with torch.no_grad():
        m.blocks[0].mlp.W_out.mul_(1.5)
    more = locate_items(SPEC, queries[1:2], "contribution")
    with pytest.raises(StoreError, match="weights"):
        sweep(more, tmp_path, model=m, **quiet())
    assert not ResultStore(tmp_path).has(more[0])


def test_shards_partition_the_items(tmp_path):
    items = probes(12)
    parts = [{it.key for it in items if shard_of(it.key, 3) == i} for i in range(3)]
    assert set().union(*parts) == {it.key for it in items} and sum(map(len, parts)) == 12
    total = 0
    for i in range(3):
        r = sweep(items, tmp_path, config=SweepConfig(shard=f"{i}/3"), **quiet())
        assert set(r.keys) == parts[i]
        total += r.computed
    assert total == 12 and len(ResultStore(tmp_path)) == 12
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "x", "1-2", (2, 1)):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="backend"):
        SweepConfig(backend="dask")
    with pytest.raises(ConfigError, match="one worker"):
        SweepConfig(workers=2)
    with pytest.raises(ConfigError, match="address"):
        SweepConfig(backend="pool", address="auto")
    assert SweepConfig(backend="pool", workers=2).threads == 1


def test_ray_missing_is_a_typed_error(monkeypatch, tmp_path):
    from kn_lens.sweep.executors import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(OptionalDependencyError, match=r"kn-lens\[ray\]"):
        import_ray()
    with pytest.raises(OptionalDependencyError):
        sweep(probes(1), tmp_path, config=SweepConfig(backend="ray"), **quiet())
    with ResultStore(tmp_path) as st:  # nothing stored, no claim left behind
        assert len(st) == 0 and not st.claims()


# --------------------------------------------------------------------------- processes


_RUNNER = textwrap.dedent("""
    import sys
    from kn_lens import testing
    from kn_lens.sweep import ModelSpec, SweepConfig, WorkItem, sweep
    testing.register_test_kinds()
    spec = ModelSpec(name="tiny-llama", seed=3)
    n, sleep, store = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    items = [WorkItem("test.probe", "probe", testing.ProbeJob(value=i, sleep=sleep), spec)
             for i in range(n)]
    if __name__ == "__main__":
        r = sweep(items, store, config=SweepConfig(claim_ttl=30), progress=False)
        print("RESULT", r.computed, r.stored_before, r.done_elsewhere, len(r.failed), flush=True)
""")


def _run_script(tmp_path, *args) -> subprocess.Popen:
    script = tmp_path / "run_sweep.py"
    script.write_text(_RUNNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc) -> list[int]:
    out, err = proc.communicate(timeout=300)
    line = [l for l in out.splitlines() if l.startswith("RESULT")]
    assert proc.returncode == 0 and line, err[-2000:]
    return [int(x) for x in line[0].split()[1:]]


def test_a_killed_sweep_resumes_and_computes_only_the_missing_items(tmp_path):
    store = tmp_path / "st"
    n = 12
    proc = _run_script(tmp_path, n, 0.4, store)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until some, not all, items are stored
        if (store / "index.sqlite").exists():
            with ResultStore(store) as st:
                if len(st) >= 3:
                    break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with ResultStore(store) as st:
        before = {r.key: r.created for r in st.query()}
        assert 3 <= len(before) < n
        assert st.claims()  # the dead sweep's claim(s) are still there ...
    computed, stored_before, elsewhere, failed = _result(_run_script(tmp_path, n, 0.0, store))
    assert (computed, stored_before, elsewhere, failed) == (n - len(before), len(before), 0, 0)
    with ResultStore(store) as st:  # ... and were taken over; nothing stored before was redone
        rows = st.query()
        assert len(rows) == n and not st.claims()
        assert all(r.created == before[r.key] for r in rows if r.key in before)
        assert {st.load(r.key)["value"] for r in rows} == set(range(n))


def test_two_sweeps_sharing_a_store_divide_the_work(tmp_path):
    store = tmp_path / "st"
    n = 10
    ResultStore(store).close()
    a = _run_script(tmp_path, n, 0.3, store)
    b = _run_script(tmp_path, n, 0.3, store)
    ra, rb = _result(a), _result(b)
    assert ra[0] + rb[0] == n and ra[3] == rb[3] == 0  # each item computed once, by one of them
    assert ra[0] > 0 and rb[0] > 0  # both worked
    with ResultStore(store) as st:
        rows = st.query()
        assert len(rows) == n and all(r.attempts == 1 for r in rows)
        assert len({r.worker for r in rows}) == 2


def test_pool_gives_the_inprocess_results_and_retries_a_dead_worker(tmp_path, queries):
    items = (locate_items(SPEC, queries, "contribution")
             + locate_items(SPEC, queries[:2], "ig", IGConfig(steps=4)))
    crash = WorkItem("test.probe", "probe",
                     testing.ProbeJob(value=7, crash_marker=str(tmp_path / "crashed")), SPEC)
    ref = sweep(items, tmp_path / "a", config=SweepConfig(threads=1), **quiet())
    res = sweep(items + [crash], tmp_path / "b", config=SweepConfig(backend="pool", workers=2),
                **quiet())
    assert res.complete and res.computed == len(items) + 1 and res.retries == 1
    assert (tmp_path / "crashed").exists()
    for x, y in zip(ref.results(), res.results()):
        assert same_scores(x, y)
    with ResultStore(tmp_path / "b") as st:
        assert st.load(crash)["square"] == 49 and st.record(crash).attempts == 2
        assert len({r.worker for r in st.query()}) >= 2  # two workers, plus the replacement


# --------------------------------------------------------------------------- sweep files and CLI


def _spec_file(tmp_path, **over) -> Path:
    doc = {"out": "store", "model": {"name": "tiny-llama", "seed": 3},
           "facts": {"relations": ["country_capital"], "limit_per_relation": 3, "sample": 2,
                     "seed": 0},
           "templates": [0, 1], "locate": [{"method": "contribution"}],
           "analysis": [{"method": "synapses", "config": {"alpha": 0.3}}],
           "sweep": {"threads": 1}}
    doc.update(over)
    p = tmp_path / "sweep.json"
    p.write_text(json.dumps(doc))
    return p


def test_sweep_file_and_cli(tmp_path, capsys):
    from kn_lens.cli import main

    path = _spec_file(tmp_path)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "8 items (locate/contribution: 4, analysis/synapses: 4)" in capsys.readouterr().out
    assert main(["sweep", str(path)]) == 0
    assert "8 computed" in capsys.readouterr().out
    assert main(["sweep", str(path)]) == 0
    assert "0 computed, 8 already stored" in capsys.readouterr().out
    assert main(["sweep", "--list", str(tmp_path / "store"), "--method", "synapses"]) == 0
    out = capsys.readouterr().out
    assert "| analysis | synapses | tiny-llama(seed=3) | done | 4 |" in out and "4 row(s)" in out
    assert main(["sweep", str(path), "--shard", "0/2", "--out", str(tmp_path / "s0")]) == 0
    assert main(["sweep", str(path), "--shard", "1/2", "--out", str(tmp_path / "s1")]) == 0
    assert main(["sweep", "--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                 str(tmp_path / "merged")]) == 0
    assert "merged 8 item(s)" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize("over, message", [
    ({"locate": [{"method": "nope"}]}, "unknown locator 'nope'"),
    ({"locate": [{"method": "ig", "config": {"stepz": 3}}]}, "has no field"),
    ({"colour": 1}, "unknown key"),
    ({"facts": {"relations": ["no_such_relation"]}}, "facts.relations"),
    ({"sweep": {"backend": "dask"}}, "backend"),
    ({"templates": "some"}, "templates"),
])
def test_sweep_file_mistakes_are_reported_before_any_work(tmp_path, capsys, over, message):
    from kn_lens.cli import main

    assert main(["sweep", str(_spec_file(tmp_path, **over))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_weights_fingerprint():
    from kn_lens.sweep import weights_fingerprint

    big = torch.nn.Linear(1, 2**24 + 3, bias=False)  # float32 index rounding would overflow
    fp = weights_fingerprint(big)
    assert fp == weights_fingerprint(big)
    with torch.no_grad():
        big.weight[-1] += 1.0  # the last value is sampled
    assert weights_fingerprint(big) != fp
    assert weights_fingerprint(testing.tiny_gpt2(seed=0)) != weights_fingerprint(testing.tiny_gpt2(seed=1))


@pytest.mark.real_model
def test_real_model_spec_and_tokenizer_view(default_model, tmp_path, monkeypatch):
    """SmolLM2: the driver's tokenizer-only queries equal the loaded model's, a model from
    load_model() has the identity of its spec, and is used in-process without a second load."""
    from kn_lens.facts import queries_for_fact

    ds = builtin_dataset()
    facts = ds.filter(relations=["country_capital", "landmark_city"], limit_per_relation=2).facts
    spec = ModelSpec(name="smollm2-135m")
    view = spec.tokenizer_view()
    for f in facts:
        assert queries_for_fact(view, f, ds.relation_of(f)) == queries_for_fact(
            default_model, f, ds.relation_of(f))
    assert ModelSpec.from_model(default_model).identity() == spec.identity()
    items = locate_items(spec, fact_queries(view, ds, facts[:1], templates=[0]), "contribution")
    def no_second_load(self, device="cpu"):
        raise AssertionError("the live model should have been used")

    monkeypatch.setattr(ModelSpec, "load", no_second_load)
    res = sweep(items, tmp_path, model=default_model, progress=False)
    assert res.complete
    (direct,) = locate(default_model, [items[0].payload], method="contribution", progress=False)
    assert same_scores(res.load(0), direct)

"""autotune/: registry, pruning, the reference check, failures and crashes, strategies, the
atomic merging writer, and `kwb tune --interpret` end to end (Triton interpreter on CPU).

The fake tunables are module-level so that worker processes (spawned: they import this
module by name) can unpickle them.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
import time
import warnings

import pytest
import torch
from typer.testing import CliRunner

from autotune import lightning, strategies, tunable, writer
from autotune.cli import MEANINGLESS, app
from autotune.result import Result, config_key
from autotune.runner import Tuner, plan
from kernels import _config
from kernels.lightning_attn import forward, lightning_attn
from profiling import read_results
from reference.lightning_attn import lightning_attn_ref
from tests.helpers import TOLERANCE, assert_close
from tests.unit.test_config_lookup import launch_spy  # noqa: F401  (a fixture)

HAS_CUDA = torch.cuda.is_available()
MINIMAX_16K = {"B": 1, "T": 16384, "H": 64, "D": 128, "E": 128, "dtype": "bf16"}

# --------------------------------------------------------------------------- fake tunables

BEST = {"BLOCK": 8, "SPLIT": 1}
WRONG = {"BLOCK": 4, "SPLIT": 2}  # returns garbage at once: the fastest, if it were timed
RAISES = {"BLOCK": 16, "SPLIT": 2}
CRASHES = {"BLOCK": 2, "SPLIT": 1}  # kills its process
HANGS = {"BLOCK": 1, "SPLIT": 2}  # never answers


def fake_is_valid(config, shape):
    return config["BLOCK"] * config["SPLIT"] <= 32


def fake_inputs(shape, device):
    return torch.rand(shape["N"], device=device) + 0.5


def fake_run(x, config):
    """Sleeps 3 ms per step away from BEST, so wall-clock timing has a clear winner even on a
    busy 2-core machine (0.5 ms steps were misranked once under load)."""
    if config == WRONG:
        return x * 2
    if config == RAISES:
        raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
    time.sleep(0.003 * (abs(math.log2(config["BLOCK"]) - 3) + config["SPLIT"] - 1))
    return x.clone()


def fake_run_crashy(x, config):
    if config == CRASHES:
        os._exit(7)
    if config == HANGS:
        time.sleep(600)
    return fake_run(x, config)


def make_fake(name: str, run=fake_run) -> tunable.Tunable:
    return tunable.Tunable(
        name=name,
        space={"BLOCK": [1, 2, 4, 8, 16, 32], "SPLIT": [1, 2]},
        is_valid=fake_is_valid,
        bucket=dict,
        make_inputs=fake_inputs,
        run=run,
        reference=fake_reference,
        tolerance=fake_tolerance,
        bytes_moved=fake_bytes,
        default_config=fake_default,
        shape_sets={"tiny": [{"N": 64}]},
        parse_shape=tunable.parse_assignments,
    )


def fake_reference(x):
    return x.double()


def fake_tolerance(shape):
    return 1e-6


def fake_bytes(shape):
    return 8 * shape["N"]


def fake_default(shape):
    return {"BLOCK": 32, "SPLIT": 1}


FAKE = make_fake("fake")
FAKE_CRASHY = make_fake("fake_crashy", fake_run_crashy)


# --------------------------------------------------------------------------- registry, space

def test_registry(monkeypatch):
    tunable.names()  # import the built-ins first: registrations into the copy below are dropped
    monkeypatch.setattr(tunable, "_REGISTRY", dict(tunable._REGISTRY))
    assert "lightning_attn_fwd" in tunable.names()
    assert tunable.get("lightning_attn_fwd") is lightning.TUNABLE
    assert tunable.register(FAKE) is FAKE and tunable.get("fake") is FAKE
    assert tunable.register(FAKE) is FAKE  # the same object again is fine
    with pytest.raises(ValueError, match="already registered"):
        tunable.register(make_fake("fake"))
    with pytest.raises(KeyError, match="lightning_attn_fwd"):
        tunable.get("no_such_kernel")


def test_fake_space_pruning():
    assert len(FAKE.configs()) == 12
    candidates = FAKE.candidates({"N": 64})
    assert len(candidates) == 11 and {"BLOCK": 32, "SPLIT": 2} not in candidates


def test_lightning_pruning_before_compiling():
    t = lightning.TUNABLE
    assert len(t.configs()) == 3 * 4 * 2 * 5
    candidates = t.candidates(MINIMAX_16K)
    for c in candidates:
        assert 128 % c["BV"] == 0 and c["num_stages"] >= 2
        assert lightning.shared_memory_bytes(c, 128, 128, 2) <= lightning.SHARED_MEMORY_LIMIT
    # 3 stages of BT=128 with BV=16: 3*2*(128*128*2 + 128*16) + 4*128*128 + 2*128*16 = 278528 > 227 KB
    assert lightning.shared_memory_bytes({"BT": 128, "BV": 16, "num_stages": 3}, 128, 128, 2) == 278528
    assert {"BT": 128, "BV": 16, "num_warps": 4, "num_stages": 3} not in candidates
    assert {"BT": 128, "BV": 16, "num_warps": 4, "num_stages": 2} in candidates
    # BT in {32, 64}: 4 BV x 2 warps x stages 2-4; 5 stages: BT=32 every BV, BT=64 BV <= 64
    # (BV=128: 5*2*(64*128*2 + 64*128) + 4*64*64 + 2*64*128 = 278528 > 227 KB);
    # BT=128: BV 16/32 at 2 stages, 2 warps
    # (BV=64: 2*2*(128*128*2 + 128*64) + 4*128*128 + 2*128*64 = 245760 > 227 KB)
    assert len(candidates) == 2 * 4 * 2 * 3 + (4 + 3) * 2 + 2 * 2
    assert {"BT": 64, "BV": 64, "num_warps": 4, "num_stages": 5} in candidates
    assert lightning.shared_memory_bytes({"BT": 128, "BV": 64, "num_stages": 2}, 128, 128, 2) == 245760
    small_e = t.candidates({**MINIMAX_16K, "D": 32, "E": 32})
    assert {c["BV"] for c in small_e} == {16, 32}
    fp32 = t.candidates({**MINIMAX_16K, "dtype": "fp32"})  # 4-byte tiles: fewer fit
    assert len(fp32) < len(candidates)


def test_lightning_bucket_is_the_kernels_lookup_key():
    t = lightning.TUNABLE
    shape = t.parse_shape("T=3000,H=64,D=128")
    assert shape == {"B": 1, "T": 3000, "H": 64, "D": 128, "E": 128, "dtype": "bf16"}
    assert t.bucket(shape) == forward.bucket_key(128, 128, 3000, torch.bfloat16) == {
        "D": 128, "E": 128, "dtype": "bfloat16", "T": 4096}
    assert t.near == ("T",)
    assert t.default_config(shape) == forward.default_config(128, 128)
    assert [s["T"] for s in t.shapes("minimax")] == [2**p for p in range(10, 17)]
    assert {(s["H"], s["D"], s["E"], s["dtype"]) for s in t.shapes("minimax")} == {(64, 128, 128, "bf16")}
    assert len(t.shapes("T=64,H=2,D=16,E=32,dtype=fp32;T=8,H=1,D=16")) == 2
    for bad in ("T=64,H=2", "T=64,H=2,D=16,X=1", "T=64,H=2,D=16,dtype=int8", "T=0,H=1,D=16", "T64"):
        with pytest.raises(ValueError):
            t.parse_shape(bad)
    # the same bucket twice is tuned once (the first shape of a bucket is measured)
    assert [j.shape["T"] for j in plan(t, t.shapes("T=3000,H=64,D=128;T=4096,H=64,D=128;T=5000,H=64,D=128"))] == [3000, 5000]


def test_lightning_reference_check_on_interpreter():
    t = lightning.TUNABLE
    shape = t.shapes("small")[0]
    inputs = t.make_inputs(shape, "cpu")
    out = t.run(inputs, t.default_config(shape))
    assert_close("o", out, t.reference(inputs), t.tolerance(shape))


# --------------------------------------------------------------------------- runner

def results_by_config(bucket) -> dict:
    return {config_key(r.config): r for r in bucket.results}


def test_wrong_candidate_rejected_and_failing_candidate_skipped():
    tuner = Tuner(FAKE, device="cpu", isolate=False, rep_ms=10)
    run = tuner.tune(plan(FAKE, [{"N": 64}]), strategies.STRATEGIES["exhaustive"])
    (bucket,) = run.buckets
    by_config = results_by_config(bucket)
    wrong, raised = by_config[config_key(WRONG)], by_config[config_key(RAISES)]
    assert wrong.status == "wrong" and wrong.error.startswith("wrong: rel err 1.00e+00")
    assert wrong.median_ms is None  # never timed
    assert raised.status == "failed" and "RuntimeError: out of resource" in raised.error
    assert bucket.best.config == BEST
    assert bucket.runner_up.median_ms >= bucket.best.median_ms
    assert bucket.default.config == fake_default({}) and bucket.default.ok
    assert bucket.tried == 11 and {config_key(r.config) for r in bucket.failures} == {config_key(WRONG), config_key(RAISES)}
    entry = bucket.entry("exhaustive")
    assert entry["config"] == BEST and entry["default_ms"] == bucket.default.median_ms
    assert {f["error"].split(":")[0] for f in entry["failures"]} == {"wrong", "failed"}
    assert run.meta()["timing_meaningful"] is False and run.meta()["failures"] == 2


def test_crashing_and_hanging_candidates_restart_the_worker():
    tuner = Tuner(FAKE_CRASHY, device="cpu", isolate=True, rep_ms=10, timeout_s=3)
    run = tuner.tune(plan(FAKE_CRASHY, [{"N": 64}]), strategies.STRATEGIES["exhaustive"])
    (bucket,) = run.buckets
    by_config = results_by_config(bucket)
    crashed, hung = by_config[config_key(CRASHES)], by_config[config_key(HANGS)]
    assert crashed.status == "crashed" and "exited with code 7" in crashed.error
    assert hung.status == "crashed" and "no answer within 3 s" in hung.error
    assert run.worker_restarts == 2
    # every candidate after a crash was measured by a fresh worker
    assert [r.status for r in bucket.results].count("ok") == 11 - 4
    assert bucket.best.config == BEST


# --------------------------------------------------------------------------- strategies

def landscape_measure(wrong_best: bool = False):
    """A fake ``measure`` over the lightning space: a smooth bowl around BT=64, BV=64, 8 warps,
    3 stages, multiplicative noise shrinking with the budget, two configs that always fail, and
    (optionally) a config faster than the true optimum whose output is wrong."""
    noise = random.Random(1)
    calls: list[tuple[dict, float]] = []

    def true_ms(c):
        return 1.0 + 0.06 * abs(math.log2(c["BT"] / 64)) + 0.1 * abs(math.log2(c["BV"] / 64)) \
            + 0.03 * (c["num_warps"] == 4) + 0.02 * abs(c["num_stages"] - 3)

    def measure(configs, rep_ms):
        out = []
        for c in configs:
            calls.append((c, rep_ms))
            if c["BV"] == 128 and c["num_stages"] == 4:
                out.append(Result(c, "failed", rep_ms, error="failed: OutOfResources"))
            elif wrong_best and c == {"BT": 32, "BV": 16, "num_warps": 4, "num_stages": 2}:
                out.append(Result(c, "wrong", rep_ms, rel_err=0.7, error="wrong: rel err 7e-01 > 1e-02"))
            else:
                ms = true_ms(c) * (1 + noise.gauss(0, 0.01) * (100 / rep_ms) ** 0.5)
                out.append(Result(c, "ok", rep_ms, ms, ms, ms, 10, 1e-3))
        return out

    return measure, calls, true_ms


OPTIMUM = {"BT": 64, "BV": 64, "num_warps": 8, "num_stages": 3}


@pytest.mark.parametrize("name", list(strategies.STRATEGIES))
def test_strategies_on_a_synthetic_landscape(name):
    strategy = strategies.STRATEGIES[name]
    candidates = lightning.TUNABLE.candidates(MINIMAX_16K)
    measure, calls, true_ms = landscape_measure()
    default = forward.default_config(128, 128)
    final = strategy.search(candidates, measure, rep_ms=100, seeds=[default], rng=random.Random(0))
    best = min((r for r in final if r.ok), key=lambda r: r.median_ms)
    assert all(r.rep_ms == 100 for r in final)  # the choice is made at the full budget
    assert len(calls) == strategy.planned(len(candidates))
    if name == "local":
        assert len(calls) <= 0.25 * len(candidates)
        assert true_ms(best.config) <= 1.03 * true_ms(OPTIMUM)
    else:
        assert best.config == OPTIMUM
    if name == "halving":
        budgets = sorted({rep for _, rep in calls})
        assert budgets == [100 / 27, 100 / 9, 100 / 3, 100]
        assert sum(rep for _, rep in calls) < len(candidates) * 100  # less timing than exhaustive


@pytest.mark.parametrize("name", list(strategies.STRATEGIES))
def test_strategies_never_pick_a_wrong_config(name):
    candidates = lightning.TUNABLE.candidates(MINIMAX_16K)
    measure, _, _ = landscape_measure(wrong_best=True)
    seeds = [{"BT": 32, "BV": 16, "num_warps": 4, "num_stages": 2}]
    final = strategies.STRATEGIES[name].search(candidates, measure, rep_ms=100, seeds=seeds, rng=random.Random(0))
    assert all(r.ok or r.median_ms is None for r in final)
    assert min((r for r in final if r.ok), key=lambda r: r.median_ms).config != seeds[0]


def test_local_search_neighbours():
    values = {"BT": [32, 64, 128], "num_warps": [4, 8]}
    assert strategies.neighbours({"BT": 32, "num_warps": 4}, values) == [{"BT": 64, "num_warps": 4}, {"BT": 32, "num_warps": 8}]
    # a parameter of another variant of a union space is not this config's neighbour axis
    values["ROWS"] = [1, 2]
    assert {"BT": 32, "num_warps": 4, "ROWS": 1} not in strategies.neighbours({"BT": 32, "num_warps": 4}, values)


def test_local_search_warm_start_climbs_from_the_previous_winner():
    """From a previous bucket's winner at or next to the optimum, local search hill-climbs to
    it and stops at the first local optimum: no random draws, and from the optimum itself
    only the seeds and one ring of neighbours."""
    candidates = lightning.TUNABLE.candidates(MINIMAX_16K)
    values = {n: sorted({c[n] for c in candidates}) for n in candidates[0]}
    default = forward.default_config(128, 128)
    budget = strategies._local_budget(len(candidates))
    for previous in (OPTIMUM, {**OPTIMUM, "num_warps": 4}, {**OPTIMUM, "BT": 32}):
        measure, calls, true_ms = landscape_measure()
        final = strategies.local(candidates, measure, rep_ms=100, seeds=[previous, default], rng=random.Random(0))
        best = min((r for r in final if r.ok), key=lambda r: r.median_ms)
        assert true_ms(best.config) <= 1.03 * true_ms(OPTIMUM), previous  # within the noise of the optimum
        assert len(calls) <= budget
        # everything measured is a seed or a neighbour of something measured before it
        measured = [c for c, _ in calls]
        for i, c in enumerate(measured[2:], start=2):
            assert any(c in strategies.neighbours(m, values) for m in measured[:i]), c
    # without noise, from the optimum: the seeds and one ring of neighbours, then it stops
    _, _, true_ms = landscape_measure()
    calls = []

    def exact(configs, rep_ms):
        calls.extend(configs)
        return [Result(c, "ok", rep_ms, true_ms(c), true_ms(c), true_ms(c), 10, 1e-3) for c in configs]

    strategies.local(candidates, exact, rep_ms=100, seeds=[OPTIMUM, default], rng=random.Random(0))
    ring = [c for c in strategies.neighbours(OPTIMUM, values) if c in candidates]
    assert len(calls) == len({strategies.config_key(c) for c in [OPTIMUM, default, *ring]}) < budget


def test_decode_space_is_a_union_of_backends():
    from autotune import lightning_decode

    configs = lightning_decode.TUNABLE.configs()
    assert {c["backend"] for c in configs} == {"triton", "cupy"}
    assert all(("ROWS" in c) == (c["backend"] == "cupy") and ("num_warps" in c) == (c["backend"] == "triton") for c in configs)
    shape = {"B": 1, "H": 64, "D": 128, "E": 128, "dtype": "bf16"}
    kept = lightning_decode.TUNABLE.candidates(shape)
    assert kept and all(c["backend"] == "triton" for c in kept) == (not __import__("kernels.lightning_attn.decode_cuda", fromlist=["x"]).available())


# --------------------------------------------------------------------------- writer

def test_known_winners_seed_every_bucket(config_dir):
    """The config file's winners (ok or stale file) seed each bucket's search after the
    previous bucket's winner; ones that are not candidates of a bucket are left out; the
    default comes last, once."""
    good, other = {"BLOCK": 8, "SPLIT": 1}, {"BLOCK": 4, "SPLIT": 2}
    assert writer.known_winners("fake", slug="gpu") == []  # no file
    stale_meta = {**meta(), "triton": "0.0.0"}
    writer.write_configs("fake", [{"key": {"N": 64}, "config": good, "date": "x"},
                                  {"key": {"N": 128}, "config": other, "date": "x"},
                                  {"key": {"N": 256}, "config": good, "date": "x"}], stale_meta, slug="gpu")
    assert writer.known_winners("fake", slug="gpu") == [good, other]
    seen = []

    def spy(candidates, measure, *, rep_ms, seeds, rng):
        seen.append(list(seeds))
        return measure(list(seeds), rep_ms)

    jobs = plan(FAKE, [{"N": 64}, {"N": 128}])
    default = jobs[0].default
    unknown = {"BLOCK": 3, "SPLIT": 1}  # not a candidate: never seeded
    run = Tuner(FAKE, device="cpu", isolate=False, rep_ms=5).tune(
        jobs, strategies.Strategy("spy", spy, lambda n: 3, "spy"), known=[unknown, good, other, default])
    assert seen[0] == [good, other, default]
    first = run.buckets[0].best.config
    assert seen[1][0] == first and seen[1][-1] == default
    assert [config_key(c) for c in seen[1]] == list(dict.fromkeys(config_key(c) for c in [first, good, other, default]))


def test_winners_from_a_smaller_space_still_seed(config_dir):
    """A winner written before a tunable joined the space (here SPLIT) seeds the search with
    the default's value of it instead of silently dropping out (a cold search)."""
    seen = []

    def spy(candidates, measure, *, rep_ms, seeds, rng):
        seen.append(list(seeds))
        return measure(list(seeds), rep_ms)

    jobs = plan(FAKE, [{"N": 64}])
    Tuner(FAKE, device="cpu", isolate=False, rep_ms=5).tune(
        jobs, strategies.Strategy("spy", spy, lambda n: 3, "spy"), known=[{"BLOCK": 8}, {"BLOCK": 8, "GONE": 1}])
    assert seen == [[{"BLOCK": 8, "SPLIT": 1}, jobs[0].default]]


def test_confirmation_rounds_retime_the_finalists():
    """A search whose single timings misranked (it reports a slow config and one that fails
    as the fastest): the confirmation rounds re-time its three fastest and the default, drop
    the one that fails, and keep the truly fastest; without rounds the misranking stands."""
    slow = {"BLOCK": 16, "SPLIT": 1}  # sleeps 3 ms per call; BEST sleeps 0, the default 6

    def misranked(candidates, measure, *, rep_ms, seeds, rng):
        return [Result(slow, "ok", rep_ms, median_ms=0.1, iters=1), Result(RAISES, "ok", rep_ms, median_ms=0.2, iters=1),
                Result(BEST, "ok", rep_ms, median_ms=1.0, iters=1)]

    strategy = strategies.Strategy("misranked", misranked, lambda n: 3, "misranked")
    jobs = plan(FAKE, [{"N": 64}])
    (bucket,) = Tuner(FAKE, device="cpu", isolate=False, rep_ms=5, confirm_rounds=3).tune(jobs, strategy).buckets
    assert bucket.best.config == BEST and bucket.runner_up.config == slow
    counts = {key: sum(config_key(r.config) == key for r in bucket.results) for key in map(config_key, (BEST, slow, RAISES))}
    assert counts == {config_key(BEST): 3, config_key(slow): 3, config_key(RAISES): 3}
    default_rounds = [r for r in bucket.results if r.config == fake_default({})]
    assert len(default_rounds) == 4  # its full-budget measurement, then one per round
    assert bucket.default.median_ms == sorted(r.median_ms for r in default_rounds[1:])[1]  # the median round
    assert bucket.default.median_ms > bucket.runner_up.median_ms > bucket.best.median_ms

    (unconfirmed,) = Tuner(FAKE, device="cpu", isolate=False, rep_ms=5).tune(jobs, strategy).buckets
    assert unconfirmed.best.config == slow
    with pytest.raises(ValueError, match="confirm_rounds"):
        Tuner(FAKE, device="cpu", isolate=False, confirm_rounds=-1)


def entry(T: int, config: dict, date: str = "2026-01-01T00:00:00+00:00") -> dict:
    return {"key": {"D": 128, "E": 128, "dtype": "bfloat16", "T": T}, "config": config, "median_ms": 1.0, "date": date}


def meta() -> dict:
    return {"triton": __import__("triton").__version__, "strategy": "test"}


def test_write_then_lookup(config_dir):
    written = writer.write_configs("k", [entry(1024, {"BT": 32}), entry(4096, {"BT": 64})], meta(), slug="gpu")
    assert written.path == config_dir / "gpu" / "k.json" and written.entries == 2
    assert written.replaced.status == "missing"
    assert _config.read_config_file(written.path).status == "ok"
    key = {"D": 128, "E": 128, "dtype": "bfloat16", "T": 2048}
    assert _config.lookup("k", key, default={}, near=("T",), slug="gpu") == {"BT": 32}
    # --out-dir: same naming, another root
    other = writer.write_configs("k", [entry(1024, {"BT": 16})], meta(), slug="gpu", root=config_dir / "elsewhere")
    assert other.path == config_dir / "elsewhere" / "gpu" / "k.json"


def test_merge_keeps_other_buckets_and_the_newest_entry(config_dir):
    writer.write_configs("k", [entry(1024, {"BT": 32}), entry(2048, {"BT": 32})], meta(), slug="gpu")
    writer.write_configs("k", [entry(2048, {"BT": 128}, date="2026-02-01T00:00:00+00:00")], meta(), slug="gpu")
    writer.write_configs("k", [entry(2048, {"BT": 16}, date="2025-12-01T00:00:00+00:00")], meta(), slug="gpu")  # older
    found = _config.read_config_file(config_dir / "gpu" / "k.json")
    assert {e["key"]["T"]: e["config"]["BT"] for e in found.entries} == {1024: 32, 2048: 128}


def test_write_is_atomic(config_dir, monkeypatch):
    path = writer.write_configs("k", [entry(1024, {"BT": 32})], meta(), slug="gpu").path
    before = path.read_text()

    def dump_half_then_fail(data, f, **kwargs):
        f.write(json.dumps(data)[:20])
        raise OSError("disk full")

    monkeypatch.setattr(writer.json, "dump", dump_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        writer.write_configs("k", [entry(2048, {"BT": 64})], meta(), slug="gpu")
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["k.json", "k.json.lock"]  # no temp file left


@pytest.mark.parametrize("status", ["corrupt", "stale"])
def test_corrupt_or_stale_file_is_replaced(config_dir, status):
    path = config_dir / "gpu" / "k.json"
    path.parent.mkdir()
    path.write_text("{half a file" if status == "corrupt" else json.dumps(
        {"meta": {"triton": "2.0.0"}, "entries": [entry(1024, {"BT": 32})]}))
    old = path.read_text()
    written = writer.write_configs("k", [entry(4096, {"BT": 64})], meta(), slug="gpu")
    assert written.replaced.status == status and written.entries == 1
    assert [e["key"]["T"] for e in _config.read_config_file(path).entries] == [4096]
    # nothing lost: the replaced file is kept beside the new one, byte for byte
    assert written.kept == path.with_name(f"k.json.{status}") and written.kept.read_text() == old


def write_many(root: str, first_T: int, count: int, barrier) -> None:
    """One of two concurrent tuners: ``count`` writes of one bucket each (spawned)."""
    from pathlib import Path

    barrier.wait()
    for i in range(count):
        writer.write_configs("k", [entry(first_T + i, {"BT": first_T})], meta(), slug="gpu", root=Path(root))


def test_concurrent_writers_merge(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=write_many, args=(str(tmp_path), first, 20, barrier)) for first in (1000, 2000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    data = json.loads((tmp_path / "gpu" / "k.json").read_text())
    assert sorted(e["key"]["T"] for e in data["entries"]) == list(range(1000, 1020)) + list(range(2000, 2020))


# --------------------------------------------------------------------------- CLI

runner = CliRunner()
needs_no_gpu = pytest.mark.skipif(HAS_CUDA, reason="exercises the no-GPU path (interpreter)")


@needs_no_gpu
def test_cli_tune_interpret_end_to_end(config_dir, launch_spy):
    result = runner.invoke(app, ["tune", "lightning_attn_fwd", "--shapes", "small", "--interpret"])
    assert result.exit_code == 0, result.output
    assert MEANINGLESS in " ".join(result.output.split())
    path = config_dir / "cpu" / "lightning_attn_fwd.json"
    data = json.loads(path.read_text())
    assert data["meta"]["timing_meaningful"] is False and data["meta"]["strategy"] == "exhaustive"
    t = lightning.TUNABLE
    shapes = t.shapes("small")
    assert [e["key"] for e in data["entries"]] == sorted((t.bucket(s) for s in shapes), key=config_key)
    for e in data["entries"]:
        assert {"median_ms", "p20_ms", "p80_ms", "runner_up", "default_ms", "candidates_tried"} <= set(e)
        assert e["candidates_tried"] == len(t.candidates(e["shape"]))

    # the runtime finds these entries, and the kernel launches with them
    for shape in shapes:
        tuned = next(e["config"] for e in data["entries"] if e["key"] == t.bucket(shape))
        assert _config.lookup(t.name, t.bucket(shape), default=t.default_config(shape), near=t.near) == tuned
        inputs = t.make_inputs(shape, "cpu")
        q, k, v, slopes = (inputs[n] for n in ("q", "k", "v", "slopes"))
        o, _ = lightning_attn(q, k, v, slopes, scale=inputs["scale"])
        assert launch_spy[-1] == tuned
        assert_close("o", o, lightning_attn_ref(q, k, v, slopes, scale=inputs["scale"])[0], TOLERANCE[torch.bfloat16])

    info = runner.invoke(app, ["info"])
    assert info.exit_code == 0, info.output
    assert "lightning_attn_fwd.json" in info.output and " ok " in info.output
    assert "T=64" in info.output


@needs_no_gpu
def test_cli_tune_keeps_the_buckets_it_finished_when_killed(config_dir, monkeypatch):
    """Each bucket's winner is written when its bucket ends: a run interrupted in its second
    bucket leaves the first in the file (and nothing of the second)."""
    from autotune.runner import Tuner

    real = Tuner._tune_bucket
    calls = []

    def interrupted_in_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Tuner, "_tune_bucket", interrupted_in_the_second)
    shapes = "T=16,H=1,D=16;T=40,H=1,D=16"
    results = config_dir / "results"
    result = runner.invoke(app, ["tune", "lightning_attn_fwd", "--shapes", shapes, "--interpret", "--strategy", "local",
                                 "--results", str(results)])
    assert result.exit_code != 0 and len(calls) == 2, result.output  # click reports the interrupt as an abort
    data = json.loads((config_dir / "cpu" / "lightning_attn_fwd.json").read_text())
    first, second = (lightning.TUNABLE.bucket(lightning.TUNABLE.parse_shape(s)) for s in shapes.split(";"))
    assert [e["key"] for e in data["entries"]] == [first] != [second]
    assert data["meta"]["buckets"] == 1 and data["meta"]["strategy"] == "local"
    lines, bad = read_results(results / "lightning_attn_fwd-tune.jsonl")  # the first bucket's lines, kept too
    assert not bad and {r.extra["bucket"]["T"] for r in lines} == {first["T"]}
    assert sum(r.provider == "tuned" for r in lines) == 1


@needs_no_gpu
def test_cli_interpret_without_a_destination_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("KWB_CONFIG_DIR", raising=False)
    result = runner.invoke(app, ["tune", "lightning_attn_fwd", "--shapes", "T=16,H=1,D=16", "--interpret", "--strategy", "local"])
    assert result.exit_code == 0, result.output
    assert "not written" in result.output
    assert not (_config.PACKAGE_CONFIG_DIR / "cpu").exists()


@needs_no_gpu
def test_cli_refusals(config_dir):
    no_gpu = runner.invoke(app, ["tune", "lightning_attn_fwd"])
    assert no_gpu.exit_code == 2 and "needs a CUDA GPU" in no_gpu.output and "--interpret" in no_gpu.output
    too_big = runner.invoke(app, ["tune", "lightning_attn_fwd", "--interpret", "--shapes", "minimax"])
    assert too_big.exit_code != 0 and "tiny shapes only" in too_big.output
    unknown = runner.invoke(app, ["tune", "nope", "--interpret"])
    assert unknown.exit_code != 0 and "lightning_attn_fwd" in unknown.output
    bad_strategy = runner.invoke(app, ["tune", "lightning_attn_fwd", "--interpret", "--strategy", "magic"])
    assert bad_strategy.exit_code != 0 and "exhaustive" in bad_strategy.output


def test_cli_info_reports_a_corrupt_file(config_dir):
    path = _config.config_path("lightning_attn_fwd")
    path.parent.mkdir(parents=True)
    path.write_text("{corrupt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # info reports the file itself; lookups stay quiet
        result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "corrupt" in result.output and "config root" in result.output


def test_python_dash_m_autotune_is_the_same_program():
    result = subprocess.run([sys.executable, "-m", "autotune", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "tune" in result.stdout and "info" in result.stdout


def test_cli_info_model_lists_every_layer(config_dir):
    """`kwb info --model`: one prefill launch of lightning or SDPA per layer, the MoE GEMMs,
    with the file status; an unknown model name is refused with the known names."""
    import re

    result = runner.invoke(app, ["info", "--model", "tiny", "--seq-len", "100"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    from model import get_config, kernel_plan

    rows = kernel_plan("tiny", 1, 100)
    assert f"{len(rows)} launches" in result.output
    kinds = get_config("tiny").layer_kinds
    for layer, kind in enumerate(kinds):
        assert re.search(rf"│ {layer} +│ {kind}", result.output), f"layer {layer} ({kind}) missing"
    assert "lightning_attn_fwd" in result.output and "grouped_gemm" in result.output and "missing" in result.output
    bad = runner.invoke(app, ["info", "--model", "nope"])
    assert bad.exit_code == 2 and "tiny" in bad.output
    ep = runner.invoke(app, ["info", "--model", "tiny", "--ep", "2"], env={"COLUMNS": "250"})
    assert ep.exit_code == 0 and "experts over 2 ranks" in ep.output and "moe_ffn_ep" in ep.output, ep.output
    bad_ep = runner.invoke(app, ["info", "--model", "tiny", "--ep", "3"])
    assert bad_ep.exit_code == 2 and "ep_size" in bad_ep.output

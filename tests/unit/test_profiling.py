"""profiling/: slugs, floors, the results schema and its JSONL files, CPU fallbacks."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from profiling import (
    CEILINGS,
    SCHEMA_VERSION,
    Record,
    TelemetrySampler,
    append_records,
    bench,
    bench_fixed,
    ceilings_for,
    floor,
    gpu_identity,
    make_rotation,
    read_results,
    slugify,
    telemetry,
)


def needs_gpu(test):
    """Mark ``test`` as a GPU test, skipped with a reason where there is none."""
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    return pytest.mark.gpu(test)


no_gpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")


def make_record(**overrides) -> Record:
    fields = dict(
        kernel="lightning_attn_fwd",
        provider="ours",
        mode="fwd",
        shape={"B": 1, "T": 4096, "H": 8, "D": 128},
        dtype="bf16",
        config={"BT": 64, "num_warps": 4},
        median_ms=1.25,
        p20_ms=1.2,
        p80_ms=1.3,
        floor_ms=0.9,
        bytes=1 << 30,
        flops=1 << 40,
        x_name="T",
        x_value=4096,
        gpu={"name": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3", "driver": "580.65.06"},
    )
    fields.update(overrides)
    return Record(**fields)


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA H200", "nvidia-h200"),
        ("  NVIDIA  A100-SXM4-40GB ", "nvidia-a100-sxm4-40gb"),
        ("Tesla V100 (PCIe) / 16GB", "tesla-v100-pcie-16gb"),
    ],
)
def test_slugify(name: str, slug: str) -> None:
    assert slugify(name) == slug


def test_ceilings_lookup() -> None:
    assert ceilings_for("nvidia-h100-80gb-hbm3") == CEILINGS["nvidia-h100-80gb-hbm3"]
    assert ceilings_for("some-unknown-gpu") is None
    assert ceilings_for(None) is None


def test_floor_memory_and_compute_bound() -> None:
    ceilings = {"copy_tb_s": 2.0, "bf16_tflop_s": 500.0}
    # 4e9 bytes at 2 TB/s = 2 ms against 5e11 FLOPs at 500 TFLOP/s = 1 ms: memory-bound.
    mem = floor(4_000_000_000, 500_000_000_000, ceilings)
    assert mem.bytes_ms == pytest.approx(2.0)
    assert mem.flops_ms == pytest.approx(1.0)
    assert (mem.floor_ms, mem.bound) == (pytest.approx(2.0), "memory")
    # 1e9 bytes = 0.5 ms against 2e12 FLOPs = 4 ms: compute-bound.
    comp = floor(1_000_000_000, 2_000_000_000_000, ceilings)
    assert comp.bytes_ms == pytest.approx(0.5)
    assert comp.flops_ms == pytest.approx(4.0)
    assert (comp.floor_ms, comp.bound) == (pytest.approx(4.0), "compute")
    assert (comp.bytes, comp.flops) == (1_000_000_000, 2_000_000_000_000)


def test_record_round_trip() -> None:
    record = make_record(extra={"note": "x"}, telemetry={"samples": 3})
    line = record.to_json()
    assert "\n" not in line
    back = Record.from_dict(json.loads(line))
    assert back == record
    assert back.schema == SCHEMA_VERSION
    assert back.date.endswith("+00:00")


def test_record_refuses_nan() -> None:
    with pytest.raises(ValueError, match="'median_ms'"):
        make_record(median_ms=float("nan"))


@pytest.mark.parametrize(
    "change, field",
    [
        ({"drop": "median_ms"}, "median_ms"),
        ({"drop": "kernel"}, "kernel"),
        ({"set": ("median_ms", "fast")}, "median_ms"),
        ({"set": ("shape", [1, 2])}, "shape"),
        ({"set": ("bytes", 1.5)}, "bytes"),
        ({"set": ("x_value", True)}, "x_value"),
        ({"set": ("date", "yesterday")}, "date"),
        ({"set": ("schema", SCHEMA_VERSION + 1)}, "schema"),
        ({"set": ("surprise", 1)}, "surprise"),
    ],
)
def test_from_dict_names_the_field(change: dict, field: str) -> None:
    d = asdict(make_record())
    if "drop" in change:
        del d[change["drop"]]
    else:
        key, value = change["set"]
        d[key] = value
    with pytest.raises(ValueError, match=f"'{field}'"):
        Record.from_dict(d)


def test_append_and_read_round_trip(tmp_path) -> None:
    path = tmp_path / "new" / "dir" / "bench.jsonl"
    first = [make_record(x_value=t) for t in (1024, 2048)]
    assert append_records(first, path) == 2
    assert append_records([make_record(provider="fla")], path) == 1
    assert append_records([], path) == 0
    records, problems = read_results(path)
    assert problems == []
    assert records == [*first, make_record(provider="fla", date=records[2].date)]


def test_read_results_reports_bad_lines_and_keeps_good_ones(tmp_path) -> None:
    good = make_record()
    missing = asdict(make_record())
    del missing["p80_ms"]
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join([good.to_json(), "{not json", "", "   ", json.dumps(missing), good.to_json(), "[1, 2]"])
        + "\n"
    )
    records, problems = read_results(path)
    assert records == [good, good]
    assert len(problems) == 3
    assert problems[0].startswith(f"{path}:2: malformed JSON")
    assert problems[1].startswith(f"{path}:5: ") and "'p80_ms'" in problems[1]
    assert problems[2].startswith(f"{path}:7: ")


def test_read_results_folder(tmp_path) -> None:
    assert read_results(tmp_path) == ([], [])
    append_records([make_record(kernel="b")], tmp_path / "b.jsonl")
    append_records([make_record(kernel="a")], tmp_path / "sub" / "a.jsonl")
    (tmp_path / "notes.txt").write_text("not results")
    records, problems = read_results(tmp_path)
    assert problems == []
    assert [r.kernel for r in records] == ["b", "a"]  # sorted paths: b.jsonl < sub/a.jsonl


@no_gpu_only
def test_no_gpu_fallbacks() -> None:
    assert gpu_identity() is None
    assert telemetry() == {}


@no_gpu_only
def test_sampler_without_gpu_is_empty_and_stops() -> None:
    with TelemetrySampler(interval_s=0.001) as sampler:
        pass
    assert sampler.summary() == {}
    assert not sampler.running


def test_sampler_stops_on_exception() -> None:
    with pytest.raises(KeyError):
        with TelemetrySampler(interval_s=0.001) as sampler:
            raise KeyError("boom")
    assert not sampler.running


@no_gpu_only
def test_bench_needs_cuda() -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        bench(lambda i: None)
    with pytest.raises(RuntimeError, match="CUDA"):
        bench_fixed(lambda i: None, warmup=1, iters=5)


@pytest.mark.parametrize(
    "gpu_ms, host_ms, expected",
    [
        (10.0, 0.05, 100),  # a GEMM: GPU-bound, 100 calls fill 1 s
        (0.0076, 0.1, 10_000),  # a decode step issued in 0.1 ms: host-bound
        (0.0, 0.0, 10_000_000),  # nothing measurable: bounded by the 1e-4 ms floor
    ],
)
def test_warmup_iters_fill_the_warmup_time(gpu_ms: float, host_ms: float, expected: int) -> None:
    from profiling.timer import warmup_iters

    assert warmup_iters(1000.0, gpu_ms, host_ms) == expected


@pytest.mark.parametrize(
    "bytes_per_set, l2_bytes, max_sets, expected",
    [
        (10, 50, 16, 11),  # 11 * 10 = 110 > 2 * 50
        (25, 50, 16, 5),  # 4 * 25 = 100 is not more than 100
        (1000, 50, 16, 1),  # one set already exceeds it
        (1, 50, 16, 16),  # capped
    ],
)
def test_make_rotation_count(bytes_per_set: int, l2_bytes: int, max_sets: int, expected: int) -> None:
    calls = []
    sets = make_rotation(lambda: calls.append(1) or len(calls), bytes_per_set, l2_bytes=l2_bytes, max_sets=max_sets)
    assert sets == list(range(1, expected + 1))


@needs_gpu
def test_gpu_identity_and_telemetry() -> None:
    info = gpu_identity()
    assert info is not None and info.slug == slugify(info.name) and info.sm_count
    sample = telemetry()
    assert sample["sm_clock_mhz"] > 0 and isinstance(sample["throttle_reasons"], list)
    with TelemetrySampler(interval_s=0.01) as sampler:
        bench(lambda i: torch.empty(1 << 20, device="cuda").fill_(1.0), rep_ms=50)
    summary = sampler.summary()
    assert summary["samples"] >= 1
    assert summary["sm_clock_mhz"]["min"] <= summary["sm_clock_mhz"]["median"] <= summary["sm_clock_mhz"]["max"]


@needs_gpu
def test_bench_times_a_matmul() -> None:
    sets = make_rotation(lambda: torch.randn(2048, 2048, device="cuda"), 2 * 2048 * 2048 * 4)
    seen = []
    timing = bench(lambda i: seen.append(i) or sets[i % len(sets)] @ sets[(i + 1) % len(sets)])
    assert timing.n >= 5 and 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert seen == list(range(len(seen)))  # indices keep counting through warm-up and timing
    fixed = bench_fixed(lambda i: sets[0] @ sets[1], warmup=3, iters=7)
    assert fixed.n == 7 and fixed.spread >= 0



def test_save_records_appends_to_the_kernels_file_and_refuses_mixed_kernels(tmp_path):
    from profiling import read_results, save_records

    path = save_records([make_record(), make_record(median_ms=2.0)], tmp_path)
    assert path == tmp_path / "lightning_attn_fwd.jsonl"
    save_records([make_record(median_ms=3.0)], tmp_path)
    records, bad = read_results(path)
    assert not bad and [r.median_ms for r in records] == [1.25, 2.0, 3.0]
    with pytest.raises(ValueError, match="one kernel"):
        save_records([make_record(), make_record(kernel="other")], tmp_path)


def test_source_hash_changes_with_the_source(tmp_path):
    from profiling import source_hash

    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    first = source_hash(a, b)
    assert len(first) == 12 and source_hash(a, b) == first
    a.write_text("x = 2\n")
    assert source_hash(a, b) != first

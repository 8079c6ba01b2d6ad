"""Results for the dashboards: loading, grouping, and the derived metrics.

Everything comes from JSON lines in the one schema (:mod:`profiling.results`). A folder is
read as every ``*.jsonl`` below it except under ``raw/`` (non-schema device logs); a bad line
is skipped and reported as ``file:line: reason``, never raised.

Two kinds of lines matter here:

- measurements (``mode`` fwd, bwd, decode, ...): one per provider and shape, with ``bytes``,
  ``flops`` and ``floor_ms`` where known: the roofline, speed-up, per-GPU and telemetry views;
- tuning lines (``mode == "tune"``): ``provider == "candidate"`` for every timed config of a
  bucket (``extra.bucket``, ``extra.strategy``) and ``provider == "tuned"`` for the bucket's
  winner (``extra``: candidates_valid, candidates_tried, bucket_wall_s, default_config, ...).

The derived metrics are small functions with their formula written out, so a number in a
hover can be checked by hand.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence, TypeVar

from profiling.floors import CEILINGS
from profiling.floors import floor as floor_of
from profiling.results import Record, read_results

T = TypeVar("T")

RAW_FOLDER = "raw"  # results/raw/: device logs kept for traceability, not in the schema
OURS = "ours"
TUNE_MODE = "tune"
CANDIDATE, TUNED = "candidate", "tuned"
NO_GPU = "no-gpu"  # the slug shown for lines written without a GPU (``gpu == {}``)
# Clock-event reasons that do not mean the measurement ran slowed down.
BENIGN_REASONS = frozenset({"gpu_idle", "applications_clocks_setting", "display_clock_setting"})
_DTYPE_NAMES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "double": "fp64",
}
_SHAPE_ORDER = ("B", "T", "H", "D", "E", "M", "N", "K")


# ---------------------------------------------------------------- derived metrics
def achieved_gb_s(bytes_moved: int, ms: float) -> float:
    """Achieved bandwidth in GB/s: bytes / time = ``bytes / (ms * 1e-3) / 1e9``."""
    return bytes_moved / (ms * 1e-3) / 1e9


def achieved_tflop_s(flops: int, ms: float) -> float:
    """Achieved compute rate in TFLOP/s: FLOPs / time = ``flops / (ms * 1e-3) / 1e12``."""
    return flops / (ms * 1e-3) / 1e12


def arithmetic_intensity(flops: int, bytes_moved: int) -> float:
    """FLOP per byte moved: ``flops / bytes``."""
    return flops / bytes_moved


def fraction_of_floor(median_ms: float, floor_ms: float) -> float:
    """Time as a multiple of the floor: ``median_ms / floor_ms`` (1 = at the floor, never below)."""
    return median_ms / floor_ms


def speedup(peer_ms: float, ours_ms: float) -> float:
    """Speed-up of ours over a peer on the same shape: ``peer_ms / ours_ms`` (> 1: ours is faster)."""
    return peer_ms / ours_ms


def roof_tflop_s(intensity: float, ceilings: Mapping[str, Any]) -> float:
    """The roofline at ``intensity`` FLOP/byte: ``min(copy_tb_s * intensity, bf16_tflop_s)``.

    TB/s times FLOP/byte is TFLOP/s, so the bandwidth slope and the compute roof share a unit.
    """
    return min(ceilings["copy_tb_s"] * intensity, ceilings["bf16_tflop_s"])


def ridge_intensity(ceilings: Mapping[str, Any]) -> float:
    """Where the slope meets the roof: ``bf16_tflop_s / copy_tb_s`` FLOP/byte."""
    return ceilings["bf16_tflop_s"] / ceilings["copy_tb_s"]


def floor_ms(record: Record, ceilings: Mapping[str, Any] | None = None) -> float | None:
    """The record's ``floor_ms``; else max(bytes / bandwidth, flops / compute) under ``ceilings``."""
    if record.floor_ms is not None:
        return record.floor_ms
    if ceilings and record.bytes is not None and record.flops is not None:
        return floor_of(record.bytes, record.flops, ceilings).floor_ms
    return None


# ---------------------------------------------------------------- labels
def canonical_dtype(name: str) -> str:
    """Short dtype name, so ``"bfloat16"`` (benchmarks) and ``"bf16"`` (tuning) group together."""
    name = name.removeprefix("torch.")
    return _DTYPE_NAMES.get(name, name)


def gpu_slug(record: Record) -> str:
    """The GPU slug of the line, or :data:`NO_GPU` when it was written without one."""
    return str(record.gpu.get("slug") or NO_GPU)


def _ordered(mapping: Mapping[str, Any]) -> list[tuple[str, Any]]:
    known = [(k, mapping[k]) for k in _SHAPE_ORDER if k in mapping]
    rest = sorted((k, v) for k, v in mapping.items() if k not in _SHAPE_ORDER and k != "dtype")
    tail = [("dtype", canonical_dtype(str(mapping["dtype"])))] if "dtype" in mapping else []
    return known + rest + tail


def shape_label(shape: Mapping[str, Any], skip: Iterable[str] = ("dtype",)) -> str:
    """``"B=1 T=4096 H=64 D=128 E=128"``: dims in a fixed order, ``skip`` left out."""
    skipped = set(skip)
    return " ".join(f"{k}={v}" for k, v in _ordered(shape) if k not in skipped)


def config_label(config: Mapping[str, Any]) -> str:
    """``"BT=64 BV=64 num_warps=4 num_stages=3"``, or ``"-"`` for a provider without one."""
    return " ".join(f"{k}={v}" for k, v in config.items()) or "-"


def _bucket_items(bucket: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """A bucket's fields in the tuner's order (e.g. D, E, T), dtype last and short."""
    items = [(k, v) for k, v in bucket.items() if k != "dtype"]
    return items + ([("dtype", canonical_dtype(str(bucket["dtype"])))] if "dtype" in bucket else [])


def bucket_label(bucket: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    """A tuning bucket as ``"D=128 E=128 T=1024 bf16"`` (the tuner's field order, dtype last)."""
    skipped = set(skip)
    parts = [str(v) if k == "dtype" else f"{k}={v}" for k, v in _bucket_items(bucket) if k not in skipped]
    return " ".join(parts) or "-"


def bucket_sort_key(bucket: Mapping[str, Any]) -> tuple:
    """Buckets sort field by field in the tuner's order, numbers numerically."""
    return tuple((k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))) for k, v in _bucket_items(bucket))


def constant_fields(dicts: Sequence[Mapping[str, Any]]) -> set[str]:
    """Keys whose value is the same in every dict (left out of labels that tell them apart)."""
    if len(dicts) < 2:
        return set()
    first = dicts[0]
    return {k for k in first if all(k in d and d[k] == first[k] for d in dicts)}


def freeze(mapping: Mapping[str, Any]) -> str:
    """A hashable, order-free key for a dict (shape, bucket, config)."""
    return json.dumps(mapping, sort_keys=True)


# ---------------------------------------------------------------- loading
@dataclass(frozen=True)
class Results:
    """What :func:`load_results` found: records, the problems of skipped lines, files read."""

    source: Path
    files: tuple[Path, ...]
    records: tuple[Record, ...]
    problems: tuple[str, ...]
    gpu: str | None = None  # the slug filter applied, if any

    @property
    def measurements(self) -> list[Record]:
        """Benchmark lines (every mode but ``tune``)."""
        return [r for r in self.records if r.mode != TUNE_MODE]

    @property
    def tuning(self) -> list[Record]:
        """Autotuner lines (``mode == "tune"``)."""
        return [r for r in self.records if r.mode == TUNE_MODE]


def result_files(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file; else every ``*.jsonl`` below it, outside ``raw/``, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(f for f in path.rglob("*.jsonl") if RAW_FOLDER not in f.relative_to(path).parts[:-1])


def _empty_lines(file: Path) -> list[str]:
    """``file:line: empty line`` for each blank line (read_results skips them without a word;
    in an append-only file one means a write went wrong)."""
    with file.open("rb") as lines:
        return [f"{file}:{n}: empty line" for n, raw in enumerate(lines, start=1) if not raw.strip()]


def _line_number(problem: str, file: Path) -> int:
    number = problem[len(f"{file}:"):].split(":", 1)[0]
    return int(number) if number.isdigit() else 0


def load_results(path: str | Path, gpu: str | None = None) -> Results:
    """Read every results file under ``path``; with ``gpu``, keep only lines of that GPU slug.

    Problems are ``file:line: reason`` for every skipped line, malformed or empty, in file order.
    """
    path = Path(path)
    files = result_files(path)
    records: list[Record] = []
    problems: list[str] = [] if path.exists() else [f"{path}: no such file or folder"]
    for file in files:
        found, bad = read_results(file)
        records.extend(found)
        problems.extend(sorted(bad + _empty_lines(file), key=lambda p: _line_number(p, file)))
    if gpu is not None:
        records = [r for r in records if gpu_slug(r) == gpu]
    return Results(path, tuple(files), tuple(records), tuple(problems), gpu)


# ---------------------------------------------------------------- grouping
def group_by(items: Iterable[T], key: Callable[[T], Hashable]) -> dict[Any, list[T]]:
    """Items grouped by ``key``, groups in order of first appearance, items in input order."""
    groups: dict[Any, list[T]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return dict(groups)


@dataclass(frozen=True, order=True)
class Selection:
    """One kernel, dtype and GPU: what the dashboards' dropdowns switch between."""

    kernel: str
    dtype: str
    gpu: str

    @property
    def label(self) -> str:
        return f"{self.kernel} · {self.dtype} · {self.gpu}"


def selection_of(record: Record) -> Selection:
    return Selection(record.kernel, canonical_dtype(record.dtype), gpu_slug(record))


def selections(records: Iterable[Record]) -> list[Selection]:
    """The distinct (kernel, dtype, GPU) of ``records``, sorted."""
    return sorted({selection_of(r) for r in records})


def select(
    records: Iterable[Record], kernel: str | None = None, dtype: str | None = None, gpu: str | None = None
) -> list[Record]:
    """Records of one kernel / dtype / GPU slug (None: any); dtype compares canonical names."""
    return [
        r
        for r in records
        if (kernel is None or r.kernel == kernel)
        and (dtype is None or canonical_dtype(r.dtype) == canonical_dtype(dtype))
        and (gpu is None or gpu_slug(r) == gpu)
    ]


def measurement_key(record: Record) -> tuple:
    """What makes two lines measurements of the same thing: kernel, provider, mode, dtype, GPU, shape."""
    shape = {k: v for k, v in record.shape.items() if k != "dtype"}
    return (record.kernel, record.provider, record.mode, canonical_dtype(record.dtype), gpu_slug(record), freeze(shape))


def latest(records: Iterable[Record]) -> list[Record]:
    """One record per :func:`measurement_key`: the newest by date (a later line wins a tie)."""
    newest: dict[tuple, Record] = {}
    for r in records:
        key = measurement_key(r)
        if key not in newest or r.date >= newest[key].date:
            newest[key] = r
    return list(newest.values())


def provider_order(providers: Iterable[str]) -> list[str]:
    """``ours`` first, then the peers alphabetically."""
    return sorted(set(providers), key=lambda p: (p != OURS, p))


def series_key(record: Record) -> str:
    """The shape without its swept dim (``x_name``) and dtype: points of one line over x."""
    return shape_label(record.shape, skip=(record.x_name, "dtype"))


@dataclass(frozen=True)
class Speedup:
    """Ours against one peer on the same kernel, mode, dtype, GPU and shape."""

    peer: str
    ours: Record
    theirs: Record

    @property
    def value(self) -> float:
        return speedup(self.theirs.median_ms, self.ours.median_ms)


def speedups(records: Iterable[Record]) -> list[Speedup]:
    """Every (ours, peer) pair on the same shape, from the newest line of each measurement."""
    def same_work(r: Record) -> tuple:  # the measurement key without the provider
        kernel, _, *rest = measurement_key(r)
        return (kernel, *rest)

    newest = latest(records)
    ours = {same_work(r): r for r in newest if r.provider == OURS}
    pairs = []
    for r in newest:
        mine = ours.get(same_work(r))
        if r.provider != OURS and mine is not None:
            pairs.append(Speedup(r.provider, mine, r))
    return sorted(pairs, key=lambda s: (s.peer, s.ours.x_value))


# ---------------------------------------------------------------- telemetry
@dataclass(frozen=True)
class Stat:
    """Minimum, median and maximum of one telemetry field over a measurement."""

    min: float
    median: float
    max: float


def telemetry_stat(telemetry: Mapping[str, Any], name: str) -> Stat | None:
    """``telemetry[name]`` as a :class:`Stat`: a sampled summary ``{min, median, max}``, or one
    reading (a number; then min = median = max); None when absent."""
    value = telemetry.get(name)
    if isinstance(value, Mapping) and all(isinstance(value.get(k), (int, float)) for k in ("min", "median", "max")):
        return Stat(float(value["min"]), float(value["median"]), float(value["max"]))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return Stat(float(value), float(value), float(value))
    return None


def throttle_reasons(telemetry: Mapping[str, Any]) -> list[str]:
    """Clock-event reasons seen during the measurement (NVML names, e.g. ``sw_power_cap``)."""
    reasons = telemetry.get("throttle_reasons") or []
    return [str(r) for r in reasons] if isinstance(reasons, list) else [str(reasons)]


def throttled(telemetry: Mapping[str, Any]) -> bool:
    """True when a reason other than idle / application clocks slowed the clocks."""
    return any(r not in BENIGN_REASONS for r in throttle_reasons(telemetry))


def telemetry_samples(telemetry: Mapping[str, Any]) -> int:
    """How many readings the summary is over (1 for a single reading, 0 for none)."""
    if isinstance(telemetry.get("samples"), int):
        return telemetry["samples"]
    return 1 if telemetry_stat(telemetry, "sm_clock_mhz") or telemetry_stat(telemetry, "power_w") else 0


# ---------------------------------------------------------------- tuning
def bucket_of(record: Record) -> dict:
    """The tuning bucket of a ``tune`` line (``extra.bucket``); its shape when absent."""
    bucket = record.extra.get("bucket")
    return dict(bucket) if isinstance(bucket, Mapping) else dict(record.shape)


def timing_meaningful(record: Record) -> bool:
    """False for lines the tuner marked meaningless (Triton interpreter on the CPU)."""
    return record.extra.get("timing_meaningful") is not False


def strategy_of(record: Record) -> str:
    return str(record.extra.get("strategy", "?"))


@dataclass
class BucketTuning:
    """Every tuning line of one kernel, GPU, bucket and strategy."""

    kernel: str
    gpu: str
    bucket: dict
    strategy: str
    candidates: list[Record]
    winner: Record | None  # the newest ``tuned`` line

    @property
    def configs_timed(self) -> int:
        """Distinct configs with a timing (re-runs of a strategy count a config once)."""
        return len({freeze(c.config) for c in self.candidates})


def tuning_runs(records: Iterable[Record]) -> list[BucketTuning]:
    """Tuning lines grouped by (kernel, GPU, bucket, strategy), sorted in that order."""
    groups = group_by(
        (r for r in records if r.mode == TUNE_MODE),
        lambda r: (r.kernel, gpu_slug(r), freeze(bucket_of(r)), strategy_of(r)),
    )
    runs = []
    for (kernel, gpu, bucket, strategy), lines in groups.items():
        winners = [r for r in lines if r.provider == TUNED]
        runs.append(
            BucketTuning(
                kernel, gpu, json.loads(bucket), strategy,
                [r for r in lines if r.provider == CANDIDATE],
                max(winners, key=lambda r: r.date) if winners else None,
            )
        )
    return sorted(runs, key=lambda t: (t.kernel, t.gpu, bucket_sort_key(t.bucket), t.strategy))


def numeric_config_axes(candidates: Iterable[Record]) -> list[str]:
    """Config fields with numeric values in every candidate, in first-seen order."""
    axes: dict[str, bool] = {}
    for c in candidates:
        for k, v in c.config.items():
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            axes[k] = axes.get(k, True) and ok
    return [k for k, ok in axes.items() if ok]


def pick_axes(candidates: Sequence[Record], x_axis: str = "BT", y_axis: str = "BV") -> tuple[str, str] | None:
    """``(x_axis, y_axis)`` when the candidates have both; else the first two numeric fields."""
    axes = numeric_config_axes(candidates)
    if x_axis in axes and y_axis in axes and x_axis != y_axis:
        return x_axis, y_axis
    return (axes[0], axes[1]) if len(axes) >= 2 else None


@dataclass(frozen=True)
class Grid:
    """Median time over two config axes, every other config field reduced by min.

    ``ms[j][i]`` is at ``xs[i]``, ``ys[j]`` (None: no valid candidate there); ``best[j][i]`` is
    the config that gave it and ``count[j][i]`` how many timings were reduced into it.
    """

    x_axis: str
    y_axis: str
    xs: list
    ys: list
    ms: list[list[float | None]]
    best: list[list[dict | None]]
    count: list[list[int]]

    @property
    def min_ms(self) -> float | None:
        values = [v for row in self.ms for v in row if v is not None]
        return min(values) if values else None


def config_grid(candidates: Sequence[Record], x_axis: str, y_axis: str) -> Grid:
    """The :class:`Grid` of ``candidates`` over ``x_axis`` x ``y_axis`` (reduced by min)."""
    usable = [c for c in candidates if x_axis in c.config and y_axis in c.config]
    xs = sorted({c.config[x_axis] for c in usable})
    ys = sorted({c.config[y_axis] for c in usable})
    ms: list[list[float | None]] = [[None] * len(xs) for _ in ys]
    best: list[list[dict | None]] = [[None] * len(xs) for _ in ys]
    count = [[0] * len(xs) for _ in ys]
    for c in usable:
        i, j = xs.index(c.config[x_axis]), ys.index(c.config[y_axis])
        count[j][i] += 1
        if ms[j][i] is None or c.median_ms < ms[j][i]:
            ms[j][i], best[j][i] = c.median_ms, dict(c.config)
    return Grid(x_axis, y_axis, xs, ys, ms, best, count)


def config_winners(configs_root: Path | None, kernel: str, gpu: str) -> tuple[dict[str, dict], str]:
    """Entries of ``<configs_root>/<gpu>/<kernel>.json`` keyed by :func:`freeze` of their bucket.

    Returns ``(entries, note)``: the note names the file and its status. A stale file (tuned
    under another triton) still shows its winners; a missing or corrupt one gives none.
    """
    from kernels._config import PACKAGE_CONFIG_DIR, read_config_file

    path = (configs_root or PACKAGE_CONFIG_DIR) / gpu / f"{kernel}.json"
    found = read_config_file(path)
    if found.status not in ("ok", "stale"):
        return {}, f"{path}: {found.status}" + (f" ({found.problem})" if found.problem else "")
    return {freeze(e["key"]): e for e in found.entries}, f"{path}"


# ---------------------------------------------------------------- header facts
def gpus(records: Iterable[Record]) -> dict[str, dict]:
    """GPU slug -> ``{"name", "drivers", "records"}`` over ``records``."""
    out: dict[str, dict] = {}
    for r in records:
        entry = out.setdefault(gpu_slug(r), {"name": r.gpu.get("name", "no GPU"), "drivers": set(), "records": 0})
        entry["records"] += 1
        if r.gpu.get("driver"):
            entry["drivers"].add(str(r.gpu["driver"]))
    return out


def versions(records: Iterable[Record], names: Sequence[str] = ("torch", "triton", "cuda", "python")) -> dict[str, list[str]]:
    """Package -> the distinct versions the records were measured with (sorted)."""
    seen: dict[str, set[str]] = {name: set() for name in names}
    for r in records:
        for name in names:
            if r.versions.get(name) is not None:
                seen[name].add(str(r.versions[name]))
    return {name: sorted(values) for name, values in seen.items() if values}


def date_range(records: Iterable[Record]) -> tuple[str, str] | None:
    """Earliest and latest ``date`` (ISO strings compare in time order within one time zone)."""
    dates = sorted(r.date for r in records)
    return (dates[0], dates[-1]) if dates else None


def ceilings_for_gpu(slug: str, table: Mapping[str, dict] = CEILINGS) -> dict | None:
    """Measured ceilings (``copy_tb_s``, ``bf16_tflop_s``) of a GPU slug, or None."""
    return table.get(slug)

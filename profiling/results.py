"""The one results schema: one JSON line per measurement, appended under ``results/``.

Every benchmark writes :class:`Record` lines through :func:`append_records` and the
dashboards read them back through :func:`read_results`. A line looks like::

    {"kernel": "lightning_attn_fwd", "provider": "ours", "mode": "fwd",
     "shape": {"B": 1, "T": 16384, "H": 64, "D": 128}, "dtype": "bf16",
     "config": {"BT": 64, "num_warps": 4}, "median_ms": 1.21, "p20_ms": 1.2, "p80_ms": 1.23,
     "floor_ms": 0.93, "bytes": 2818572288, "flops": 1099511627776,
     "x_name": "T", "x_value": 16384,
     "gpu": {"name": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3", "driver": "580.65.06"},
     "versions": {"torch": "2.11.0", ...}, "telemetry": {"samples": 40, "power_w": {...}, ...},
     "date": "2025-01-01T12:00:00+00:00", "extra": {}, "schema": 1}

Every field is present in a stored line; changing the fields means bumping ``SCHEMA_VERSION``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from profiling import floors, gpu
from profiling.timer import Timing

SCHEMA_VERSION = 1


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_date(v: Any) -> bool:
    try:
        datetime.fromisoformat(v)
    except (TypeError, ValueError):
        return False
    return True


_IS: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
    "a finite number": _is_number,
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "an ISO-8601 date": _is_date,
}
_FIELD_KINDS = {
    "kernel": "a string",
    "provider": "a string",
    "mode": "a string",
    "shape": "an object",
    "dtype": "a string",
    "config": "an object",
    "median_ms": "a finite number",
    "p20_ms": "a finite number",
    "p80_ms": "a finite number",
    "floor_ms": "a finite number or null",
    "bytes": "an integer or null",
    "flops": "an integer or null",
    "x_name": "a string",
    "x_value": "a finite number",
    "gpu": "an object",
    "versions": "an object",
    "telemetry": "an object",
    "date": "an ISO-8601 date",
    "extra": "an object",
    "schema": "an integer",
}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(kw_only=True)
class Record:
    """One measurement. Validated on construction: a bad field raises ValueError naming it."""

    kernel: str  # e.g. "lightning_attn_fwd"
    provider: str  # "ours", "fla", "sdpa", "torch_grouped_mm", "loop", "dense", "floor", ...
    mode: str  # "fwd", "bwd", "fwd+bwd", "decode", "tune"
    shape: dict
    dtype: str
    config: dict
    median_ms: float
    p20_ms: float
    p80_ms: float
    floor_ms: float | None = None
    bytes: int | None = None
    flops: int | None = None
    x_name: str  # the swept shape field, e.g. "T" (tokens; per rank under EP): a line over x drops it from its label
    x_value: float | int
    gpu: dict = field(default_factory=dict)  # name, slug, driver; {} without a GPU
    versions: dict = field(default_factory=dict)
    telemetry: dict = field(default_factory=dict)
    date: str = field(default_factory=_now)  # ISO-8601, UTC
    extra: dict = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for f in fields(self):
            kind = _FIELD_KINDS[f.name]
            base, _, null = kind.partition(" or ")
            value = getattr(self, f.name)
            if not ((null and value is None) or _IS[base](value)):
                raise ValueError(f"field {f.name!r} must be {kind}, got {value!r}")
        if self.schema != SCHEMA_VERSION:
            raise ValueError(f"field 'schema' is {self.schema}, this reader knows {SCHEMA_VERSION}")

    def to_json(self) -> str:
        """One line of JSON (no newline); NaN and infinity are refused."""
        return json.dumps(asdict(self), allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Record:
        """Rebuild a record from a parsed line; ValueError names a missing, unknown or bad field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in d]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(map(repr, missing))}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
        return cls(**d)


def append_records(records: Iterable[Record], path: str | Path) -> int:
    """Append ``records`` as JSON lines to ``path`` (parents created); returns how many.

    All lines go out in one ``O_APPEND`` write, then fsync, so concurrent appenders never
    interleave partial lines.
    """
    lines = [record.to_json() + "\n" for record in records]
    if not lines:
        return 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = memoryview("".join(lines).encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # one write in practice; the loop only covers a short write
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(lines)


def save_records(records: list[Record], results_dir: str | Path = "results") -> Path:
    """Append ``records`` (all of one kernel) to ``<results_dir>/<kernel>.jsonl``; returns the file."""
    kernels = {r.kernel for r in records}
    if len(kernels) != 1:
        raise ValueError(f"save_records takes the records of one kernel, got {sorted(kernels)}")
    path = Path(results_dir) / f"{kernels.pop()}.jsonl"
    append_records(records, path)
    return path


def source_hash(*files: str | Path) -> str:
    """12 hex digits identifying the kernel sources a number was measured with (the device
    machine gets the tree without .git, so a commit id is not available there)."""
    digest = hashlib.sha1()
    for path in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def read_results(path: str | Path) -> tuple[list[Record], list[str]]:
    """Records from a ``.jsonl`` file, or from every ``*.jsonl`` under a folder (sorted).

    Blank lines are skipped. A malformed or invalid line is skipped and reported as
    ``"{file}:{lineno}: {reason}"`` in the second list; bad lines never raise.
    """
    path = Path(path)
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    records: list[Record] = []
    problems: list[str] = []
    for file in files:
        with file.open("rb") as lines:
            for lineno, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                try:
                    records.append(Record.from_dict(json.loads(raw)))
                except UnicodeDecodeError as e:
                    problems.append(f"{file}:{lineno}: not UTF-8: {e.reason}")
                except json.JSONDecodeError as e:
                    problems.append(f"{file}:{lineno}: malformed JSON: {e.msg} at column {e.colno}")
                except ValueError as e:
                    problems.append(f"{file}:{lineno}: {e}")
    return records, problems


def record_from_timing(
    timing: Timing,
    *,
    kernel: str,
    provider: str,
    mode: str,
    shape: dict,
    dtype: str,
    config: dict,
    x_name: str,
    x_value: float | int,
    bytes: int | None = None,
    flops: int | None = None,
    ceilings: dict | None = None,
    telemetry: dict | None = None,
    extra: dict | None = None,
    device_index: int = 0,
) -> Record:
    """A :class:`Record` for ``timing`` with GPU identity and versions filled in.

    ``floor_ms`` is set when ``bytes`` and ``flops`` are both given and ceilings are known:
    ``ceilings``, else this GPU's entry in :data:`profiling.floors.CEILINGS`. ``telemetry``
    is typically a :meth:`TelemetrySampler.summary`; None takes one reading now.
    """
    identity = gpu.gpu_identity(device_index)
    ceilings = ceilings or floors.ceilings_for(identity.slug if identity else None)
    floor_ms = None
    if ceilings and bytes is not None and flops is not None:
        floor_ms = floors.floor(bytes, flops, ceilings).floor_ms
    return Record(
        kernel=kernel,
        provider=provider,
        mode=mode,
        shape=shape,
        dtype=dtype,
        config=config,
        median_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        floor_ms=floor_ms,
        bytes=bytes,
        flops=flops,
        x_name=x_name,
        x_value=x_value,
        gpu={"name": identity.name, "slug": identity.slug, "driver": identity.driver} if identity else {},
        versions=gpu.versions(),
        telemetry=gpu.telemetry(device_index) if telemetry is None else telemetry,
        extra={**(extra or {}), "iters": timing.n, **({"host_ms": timing.host_ms} if timing.host_ms is not None else {})},
    )

"""GPU identity and telemetry, CUDA-event timers, roofline floors and the results schema.

Imports nothing from the rest of the workbench: ``kernels``, ``autotune``, ``model`` and
``dashboards`` build on it.
"""
from profiling.floors import CEILINGS, Floor, ceilings_for, floor, measure_ceilings
from profiling.gpu import GpuInfo, TelemetrySampler, gpu_identity, slugify, telemetry, versions
from profiling.results import (
    SCHEMA_VERSION,
    Record,
    append_records,
    read_results,
    record_from_timing,
    save_records,
    source_hash,
)
from profiling.timer import Timing, bench, bench_fixed, make_rotation

__all__ = [
    "CEILINGS",
    "SCHEMA_VERSION",
    "Floor",
    "GpuInfo",
    "Record",
    "TelemetrySampler",
    "Timing",
    "append_records",
    "bench",
    "bench_fixed",
    "ceilings_for",
    "floor",
    "gpu_identity",
    "make_rotation",
    "measure_ceilings",
    "read_results",
    "record_from_timing",
    "save_records",
    "slugify",
    "source_hash",
    "telemetry",
    "versions",
]

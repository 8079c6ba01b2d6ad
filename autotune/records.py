"""A tuning run as results lines (``profiling.results`` schema), for the dashboards.

One ``mode="tune"`` line per timed candidate (``provider="candidate"``; the heatmaps read
these) and one per bucket (``provider="tuned"``: the winner, with the strategy, candidates
tried, the bucket's wall time and the run's wall time when the bucket ended (``kwb tune``
appends each bucket's lines as soon as it ends), and the default config's time; the strategy
comparison reads these). Wrong, failed and crashed candidates have no time and stay in the
config file's ``failures``.
"""
from __future__ import annotations

from autotune.runner import TuneRun
from autotune.tunable import Tunable
from profiling import Record, Timing, record_from_timing


def _record(tunable: Tunable, run: TuneRun, shape: dict, result, provider: str, extra: dict) -> Record:
    timing = Timing(result.median_ms, result.p20_ms, result.p80_ms, result.iters)
    return record_from_timing(
        timing, kernel=tunable.name, provider=provider, mode="tune", shape=dict(shape),
        dtype=str(shape.get("dtype", "")), config=dict(result.config), x_name="T", x_value=shape.get("T", 0),
        bytes=tunable.bytes_moved(shape), extra={"strategy": run.strategy, "rep_ms": result.rep_ms, **extra},
    )


def tune_records(tunable: Tunable, run: TuneRun) -> list[Record]:
    """Every timed candidate and every bucket's winner of ``run``."""
    records = []
    for bucket in run.buckets:
        shape, key = bucket.job.shape, bucket.job.key
        for result in bucket.results:
            if result.ok:
                records.append(_record(tunable, run, shape, result, "candidate", {"bucket": key}))
        if bucket.best is not None:
            records.append(_record(tunable, run, shape, bucket.best, "tuned", {
                "bucket": key, "candidates_valid": len(bucket.job.candidates), "candidates_tried": bucket.tried,
                "bucket_wall_s": round(bucket.wall_s, 3), "run_wall_s": round(run.wall_s, 3),
                "default_config": bucket.default.config, "default_ms": bucket.default.median_ms,
                "timing_meaningful": run.timing_meaningful,
            }))
    return records

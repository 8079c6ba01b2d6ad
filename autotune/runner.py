"""Tuning a kernel over shape buckets: plan, search each bucket, and summarise for the writer.

``plan`` turns shapes into one :class:`Job` per bucket (the first shape of a bucket is the
one measured) with the valid candidates and the default config. :class:`Tuner` runs a
strategy on each job through a backend (:mod:`autotune.worker`), samples NVML telemetry
around each bucket, and measures the default config with the full budget so every bucket
reports its speed-up over what the kernel launches untuned (the default then competes with
the strategy's final candidates). With ``confirm_rounds``, the strategy's fastest few and the
default are then timed again in that many interleaved rounds, and each is judged by its
median round: on an H100 at its power cap one measurement can be off by 5%, enough to crown
the wrong one of two close configs (session 7: for moe_ffn's up projection at 16K tokens the
tuner timed its winner at 13.42 ms and the runner-up at 13.92; a later 5-round probe had them
at 13.39 and 12.68 ms). Buckets are tuned in the order given; each one seeds the
next with its winner, and the winners already in the kernel's config file (``known``) seed
every bucket (strategies that search locally start there).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from autotune.result import Result, config_key, ranked
from autotune.strategies import Strategy
from autotune.tunable import Config, Shape, Tunable
from autotune.worker import InProcess, Isolated
from profiling import TelemetrySampler, gpu_identity, versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Job:
    """One bucket to tune: the shape measured, its key, valid candidates, the default config."""

    shape: Shape
    key: dict
    candidates: list[Config]
    default: Config


def plan(tunable: Tunable, shapes: list[Shape]) -> list[Job]:
    """One job per distinct bucket of ``shapes``, in order (later shapes of a bucket are dropped)."""
    jobs: dict[tuple, Job] = {}
    for shape in shapes:
        key = tunable.bucket(shape)
        if config_key(key) not in jobs:
            jobs[config_key(key)] = Job(shape, key, tunable.candidates(shape), tunable.default_config(shape))
    return list(jobs.values())


@dataclass
class BucketResult:
    """Everything measured for one job, and the choice made from it."""

    job: Job
    best: Result | None  # None when no candidate passed the reference check
    runner_up: Result | None
    default: Result  # the default config, with the full budget
    results: list[Result]  # every measurement, in order
    wall_s: float
    telemetry: dict
    date: str = field(default_factory=_now)

    @property
    def tried(self) -> int:
        """Distinct configs measured (the default included)."""
        return len({config_key(r.config) for r in self.results})

    @property
    def failures(self) -> list[Result]:
        """Configs that were wrong, failed or crashed, each once."""
        out: dict[tuple, Result] = {}
        for r in self.results:
            if not r.ok:
                out.setdefault(config_key(r.config), r)
        return list(out.values())

    def entry(self, strategy: str) -> dict:
        """The config-file entry of this bucket (see ``kernels/_config.py`` for the format)."""
        if self.best is None:
            raise ValueError(f"bucket {self.job.key} has no winner to write")
        return {
            "key": self.job.key,
            "config": self.best.config,
            "median_ms": self.best.median_ms,
            "p20_ms": self.best.p20_ms,
            "p80_ms": self.best.p80_ms,
            "runner_up": None if self.runner_up is None else {
                "config": self.runner_up.config, "median_ms": self.runner_up.median_ms,
            },
            "default_config": self.default.config,
            "default_ms": self.default.median_ms,
            "shape": self.job.shape,
            "candidates_valid": len(self.job.candidates),
            "candidates_tried": self.tried,
            "failures": [{"config": r.config, "error": r.error} for r in self.failures],
            "strategy": strategy,
            "tune_s": round(self.wall_s, 3),
            "date": self.date,
            "telemetry": self.telemetry,
        }


@dataclass
class TuneRun:
    """One ``kwb tune`` of one kernel: its buckets and the file-level metadata."""

    kernel: str
    strategy: str
    device: str
    timing_meaningful: bool
    rep_ms: float
    buckets: list[BucketResult]
    wall_s: float
    worker_restarts: int
    telemetry: dict

    def entries(self) -> list[dict]:
        """Config-file entries of the buckets that have a winner."""
        return [b.entry(self.strategy) for b in self.buckets if b.best is not None]

    def meta(self) -> dict:
        """The ``meta`` block of the config file."""
        gpu = gpu_identity() if self.device.startswith("cuda") else None
        v = versions()
        return {
            "gpu": gpu.name if gpu else None,
            "device": self.device if self.timing_meaningful else f"{self.device} (Triton interpreter)",
            "driver": v["driver"],
            "torch": v["torch"],
            "triton": v["triton"],
            "cuda": v["cuda"],
            "python": v["python"],
            "date": _now(),
            "strategy": self.strategy,
            "timing_meaningful": self.timing_meaningful,
            "rep_ms": self.rep_ms,
            "buckets": len(self.buckets),
            "candidates_tried": sum(b.tried for b in self.buckets),
            "failures": sum(len(b.failures) for b in self.buckets),
            "buckets_without_winner": [b.job.key for b in self.buckets if b.best is None],
            "worker_restarts": self.worker_restarts,
            "wall_s": round(self.wall_s, 3),
            "telemetry": self.telemetry,
        }


class Reporter(Protocol):
    """Progress callbacks (the CLI draws a progress bar from them)."""

    def bucket_started(self, job: Job, planned: int) -> None: ...

    def measured(self, result: Result, best: Result | None) -> None: ...

    def bucket_finished(self, bucket: BucketResult) -> None: ...


class SilentReporter:
    def bucket_started(self, job: Job, planned: int) -> None:
        pass

    def measured(self, result: Result, best: Result | None) -> None:
        pass

    def bucket_finished(self, bucket: BucketResult) -> None:
        pass


def _seeds(previous: Config | None, known: list[Config], job: Job) -> list[Config]:
    """The previous bucket's winner, the known winners that are candidates of ``job``, and the
    default last, without repeats.

    A winner tuned before a tunable joined the space lacks it and takes the default's value
    (what the runtime launches it with), so a grown space still starts warm."""
    valid = {config_key(c) for c in job.candidates}
    completed = [{**job.default, **c} for c in known]
    seeds: dict[tuple, Config] = {}
    for config in ([previous] if previous else []) + [c for c in completed if config_key(c) in valid]:
        seeds.setdefault(config_key(config), config)
    seeds.pop(config_key(job.default), None)
    return [*seeds.values(), job.default]


class Tuner:
    """Tunes one kernel on one device.

    ``isolate`` measures in worker processes (:class:`~autotune.worker.Isolated`), which a
    GPU needs; without it everything runs in this process (the interpreter, tests).
    ``rep_ms`` is the full timing budget of one candidate; strategies spend fractions of it.
    """

    def __init__(
        self,
        tunable: Tunable,
        *,
        device: str,
        isolate: bool,
        rep_ms: float = 100.0,
        timeout_s: float = 300.0,
        seed: int = 0,
        confirm_rounds: int = 0,
        confirm_top: int = 3,
    ) -> None:
        if confirm_rounds < 0 or confirm_top < 1:
            raise ValueError(f"confirm_rounds must be >= 0 and confirm_top >= 1, got {confirm_rounds}, {confirm_top}")
        self.tunable = tunable
        self.device = device
        self.isolate = isolate
        self.rep_ms = rep_ms
        self.timeout_s = timeout_s
        self.seed = seed
        self.confirm_rounds = confirm_rounds
        self.confirm_top = confirm_top

    @property
    def timing_meaningful(self) -> bool:
        """Compiled kernels on a GPU; not the interpreter, not the CPU."""
        return self.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1"

    def tune(
        self, jobs: list[Job], strategy: Strategy, reporter: Reporter | None = None, known: list[Config] = ()
    ) -> TuneRun:
        """Tune every job. ``known``: configs that won other buckets before (e.g. the config
        file's winners, :func:`autotune.writer.known_winners`); each bucket's search starts
        from the previous bucket's winner, those of them that are valid candidates here, and
        the default. Without them a warm search stops at the first local optimum around the
        previous winner and can stay on the default (session 5: the E=8 MoE buckets)."""
        reporter = reporter or SilentReporter()
        rng = random.Random(self.seed)
        backend = (
            Isolated(self.tunable, self.device, timeout_s=self.timeout_s)
            if self.isolate
            else InProcess(self.tunable, self.device)
        )
        start = time.perf_counter()
        buckets: list[BucketResult] = []
        previous: Config | None = None
        with backend, TelemetrySampler() as sampler:
            for job in jobs:
                seeds = _seeds(previous, known, job)
                bucket = self._tune_bucket(backend, job, strategy, seeds, rng, reporter)
                buckets.append(bucket)
                previous = bucket.best.config if bucket.best else previous
        return TuneRun(
            kernel=self.tunable.name,
            strategy=strategy.name,
            device=self.device,
            timing_meaningful=self.timing_meaningful,
            rep_ms=self.rep_ms,
            buckets=buckets,
            wall_s=time.perf_counter() - start,
            worker_restarts=backend.restarts,
            telemetry=sampler.summary(),
        )

    def _tune_bucket(
        self,
        backend: InProcess | Isolated,
        job: Job,
        strategy: Strategy,
        seeds: list[Config],
        rng: random.Random,
        reporter: Reporter,
    ) -> BucketResult:
        results: list[Result] = []

        def measure(configs: list[Config], rep_ms: float) -> list[Result]:
            out = []
            for config in configs:
                result = backend.evaluate(job.shape, config, rep_ms)
                results.append(result)
                out.append(result)
                reporter.measured(result, next(iter(ranked(results)), None))
            return out

        confirming = self.confirm_rounds * (self.confirm_top + 1)
        reporter.bucket_started(job, strategy.planned(len(job.candidates)) + confirming)
        start = time.perf_counter()
        with TelemetrySampler() as sampler:
            final = strategy.search(job.candidates, measure, rep_ms=self.rep_ms, seeds=seeds, rng=rng)
            default_key = config_key(job.default)
            default = next((r for r in final if config_key(r.config) == default_key), None)
            if default is None:  # measured with the full budget too, so it competes
                default = measure([job.default], self.rep_ms)[0]
                final = final + [default]
            if self.confirm_rounds:
                final, default = self._confirm(final, default, measure)
        top = ranked(final)
        bucket = BucketResult(
            job=job,
            best=top[0] if top else None,
            runner_up=top[1] if len(top) > 1 else None,
            default=default,
            results=results,
            wall_s=time.perf_counter() - start,
            telemetry=sampler.summary(),
        )
        reporter.bucket_finished(bucket)
        return bucket

    def _confirm(self, final: list[Result], default: Result, measure) -> tuple[list[Result], Result]:
        """Time the ``confirm_top`` fastest of ``final`` and the default again, in
        ``confirm_rounds`` interleaved rounds at the full budget. Each is represented by its
        median round (that round's own median and spread); one that is not ok in every round
        drops out. Returns the new finalists and the default's result."""
        finalists: dict[tuple, Config] = {}
        for r in ranked(final)[: self.confirm_top] + ([default] if default.ok else []):
            finalists.setdefault(config_key(r.config), r.config)
        if len(finalists) < 2:  # nothing to choose between
            return final, default
        rounds: dict[tuple, list[Result]] = {key: [] for key in finalists}
        for _ in range(self.confirm_rounds):
            for key, config in finalists.items():
                rounds[key] += measure([config], self.rep_ms)
        confirmed = {
            key: sorted(results, key=lambda r: r.median_ms)[len(results) // 2]
            for key, results in rounds.items() if all(r.ok for r in results)
        }
        if not confirmed:
            return final, default
        return list(confirmed.values()), confirmed.get(config_key(default.config), default)

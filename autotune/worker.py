"""Measuring one candidate: check it against the reference, then time it; in-process or isolated.

:class:`Evaluator` does the work for one tunable on one device. It builds the inputs of a
shape (enough rotated sets to exceed L2 on a GPU) and the reference output once, then for
each config: one launch compared with the reference (a config whose output misses it is
``"wrong"`` and never timed), then the timing, :func:`profiling.bench` on CUDA or wall-clock
time elsewhere (the Triton interpreter: meaningless numbers, but the same pipeline).

Backends hand configs to an evaluator:

- :class:`InProcess` calls it directly (the interpreter; tests).
- :class:`Isolated` runs it in a spawned worker process. A compiled candidate can corrupt the
  CUDA context (triton 3.6 on H100 compiled BT=64, BV=32, num_warps=8, num_stages=1 of the
  lightning forward into an out-of-bounds shared-memory read), after which every launch in
  that process fails. When the worker dies, stops answering, or finds its CUDA context
  broken after an exception, the candidate is recorded as ``"crashed"`` and the next
  candidate starts a fresh worker. Workers compile into a private Triton cache for the run,
  so every strategy pays its compiles and a corrupt binary never outlives the run.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Callable, Iterator

import numpy as np
import torch

from autotune.result import Result
from autotune.tunable import Config, Shape, Tunable
from profiling import Timing, bench, make_rotation

_WALL_MAX_ITERS = 1000
_ERROR_CHARS = 400


def rel_error(out: Any, expected: Any) -> float:
    """``||out - expected|| / ||expected||`` in float64, the max over tuples; inf on NaN/inf."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(expected):
            raise ValueError(f"output has {type(out).__name__} where the reference has {len(expected)} tensors")
        return max((rel_error(o, e) for o, e in zip(out, expected)), default=0.0)
    if out.shape != expected.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != reference shape {tuple(expected.shape)}")
    diff2 = ref2 = 0.0
    for a, b in float64_chunks(out, expected):
        if not torch.isfinite(a).all():
            return math.inf
        diff2 += (a - b).square().sum().item()
        ref2 += b.square().sum().item()
    return math.sqrt(diff2) / math.sqrt(ref2) if ref2 > 0 else math.sqrt(diff2)


FLOAT64_CHUNK = 1 << 24  # elements: a [32, 6144, 18432] weight gradient in float64 at once
# (29 GB, for each side) would not fit beside the tensors being compared on an 80 GB GPU


def float64_chunks(out: torch.Tensor, expected: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching slices of both tensors, flattened, FLOAT64_CHUNK elements at a time, in float64."""
    a, b = out.detach().reshape(-1), expected.detach().reshape(-1)
    for i in range(0, a.numel(), FLOAT64_CHUNK):
        yield a[i:i + FLOAT64_CHUNK].to(torch.float64), b[i:i + FLOAT64_CHUNK].to(torch.float64)


def wall_bench(fn: Callable[[int], object], rep_ms: float) -> Timing:
    """Wall-clock times of ``fn(i)`` repeated for about ``rep_ms`` (at least once)."""
    times: list[float] = []
    while not times or (sum(times) < rep_ms and len(times) < _WALL_MAX_ITERS):
        start = time.perf_counter()
        fn(len(times))
        times.append((time.perf_counter() - start) * 1e3)
    median, p20, p80 = np.quantile(times, [0.5, 0.2, 0.8])
    return Timing(float(median), float(p20), float(p80), len(times))


def _describe(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 3] + "..."


def _cuda_usable() -> bool:
    """Whether this process can still run CUDA work (false after an illegal address, etc.)."""
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2
    except Exception:
        return False


class Evaluator:
    """Checks and times configs of ``tunable`` on ``device``; inputs and reference once per shape."""

    def __init__(self, tunable: Tunable, device: str) -> None:
        self.tunable = tunable
        self.device = device
        self._cuda = device.startswith("cuda")
        self._shape: Shape | None = None
        self._sets: list[Any] = []
        self._expected: Any = None

    def _prepare(self, shape: Shape) -> None:
        if shape == self._shape:
            return
        self._shape, self._sets, self._expected = None, [], None  # free the last shape first
        tunable = self.tunable
        self._sets = make_rotation(
            lambda: tunable.make_inputs(shape, self.device),
            tunable.bytes_moved(shape),
            l2_bytes=None if self._cuda else 0,
        )
        self._expected = tunable.reference(self._sets[0])
        self._shape = shape

    def _failure(self, config: Config, rep_ms: float, stage: str, exc: Exception) -> Result:
        status = "crashed" if self._cuda and not _cuda_usable() else "failed"
        return Result(config, status, rep_ms, error=f"{status}: {stage}: {_describe(exc)}")

    @torch.no_grad()
    def evaluate(self, shape: Shape, config: Config, rep_ms: float) -> Result:
        """Reference check of one launch, then ~``rep_ms`` of timed launches on rotated inputs."""
        try:
            self._prepare(shape)
        except Exception as exc:
            return self._failure(config, rep_ms, "inputs/reference", exc)
        run, sets = self.tunable.run, self._sets
        try:
            if self.tunable.reset is not None:
                self.tunable.reset(sets[0])
            err = rel_error(run(sets[0], config), self._expected)
        except Exception as exc:
            return self._failure(config, rep_ms, "launch", exc)
        tolerance = self.tunable.tolerance(shape)
        if not err <= tolerance:
            return Result(config, "wrong", rep_ms, rel_err=err, error=f"wrong: rel err {err:.2e} > {tolerance:.0e}")
        call = lambda i: run(sets[i % len(sets)], config)  # noqa: E731
        try:
            timing = bench(call, warmup_ms=rep_ms / 4, rep_ms=rep_ms) if self._cuda else wall_bench(call, rep_ms)
        except Exception as exc:
            return self._failure(config, rep_ms, "timing", exc)
        return Result(config, "ok", rep_ms, timing.median_ms, timing.p20_ms, timing.p80_ms, timing.n, err)


class InProcess:
    """Evaluates in this process: for the interpreter, where nothing can corrupt a GPU."""

    def __init__(self, tunable: Tunable, device: str) -> None:
        self._evaluator = Evaluator(tunable, device)
        self.restarts = 0

    def evaluate(self, shape: Shape, config: Config, rep_ms: float) -> Result:
        return self._evaluator.evaluate(shape, config, rep_ms)

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _worker_main(conn: Connection, device: str, env: dict[str, str]) -> None:
    """Worker loop: receive the tunable, then ``(shape, config, rep_ms)`` until None."""
    os.environ.update(env)  # before the first compile: triton reads TRITON_CACHE_DIR when it compiles
    try:
        evaluator = Evaluator(conn.recv(), device)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send("ready")
    try:
        while (request := conn.recv()) is not None:
            result = evaluator.evaluate(*request)
            conn.send(result)
            if result.status == "crashed":
                os._exit(3)  # the CUDA context is unusable; skip teardown that would touch it
    except EOFError:  # the parent went away
        return


class Isolated:
    """Evaluates in a spawned worker process, started on demand and restarted after a crash."""

    STARTUP_TIMEOUT_S = 300.0

    def __init__(self, tunable: Tunable, device: str, *, timeout_s: float = 300.0) -> None:
        self.tunable = tunable
        self.device = device
        self.timeout_s = timeout_s
        self.restarts = 0  # workers lost to crashes and timeouts
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._cache_dir: str | None = None

    def __enter__(self) -> Isolated:
        self._cache_dir = tempfile.mkdtemp(prefix="kwb-triton-cache-")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
        self._stop(kill=False)
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)

    def _start(self) -> None:
        if self._cache_dir is None:
            raise RuntimeError("use Isolated as a context manager (`with Isolated(...) as backend:`)")
        conn, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self.device, {"TRITON_CACHE_DIR": self._cache_dir}),
            name=f"kwb-tune-{self.tunable.name}",
            daemon=True,
        )
        proc.start()
        child.close()  # only the worker holds its end: its death reads as EOF here
        self._proc, self._conn = proc, conn
        conn.send(self.tunable)
        reply = conn.recv() if conn.poll(self.STARTUP_TIMEOUT_S) else ("error", "no answer")
        if reply != "ready":
            self._stop(kill=True)
            raise RuntimeError(f"the tuning worker for {self.tunable.name} failed to start:\n{reply[1]}")

    def _stop(self, *, kill: bool) -> int | None:
        """Close the pipe and reap the worker (killing it if asked); its exit code."""
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return None
        if kill and proc.is_alive():
            proc.kill()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        return proc.exitcode

    def evaluate(self, shape: Shape, config: Config, rep_ms: float) -> Result:
        if self._proc is None:
            self._start()
        assert self._conn is not None
        try:
            self._conn.send((shape, config, rep_ms))
            if not self._conn.poll(self.timeout_s):
                self._stop(kill=True)
                self.restarts += 1
                return Result(config, "crashed", rep_ms, error=f"crashed: no answer within {self.timeout_s:.0f} s; worker killed")
            result = self._conn.recv()
        except (EOFError, OSError):
            code = self._stop(kill=True)
            self.restarts += 1
            return Result(config, "crashed", rep_ms, error=f"crashed: worker exited with code {code}")
        if result.status == "crashed":  # the worker exits after answering
            self._stop(kill=False)
            self.restarts += 1
        return result

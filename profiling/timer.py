"""CUDA-event timers and input rotation.

Each iteration is timed on its own pair of CUDA events and the timing reports the median and
the 20th/80th percentiles. Before each timed call the GPU is given a short spin
(``torch.cuda._sleep``, twice the host's time per call) so the host enqueues the events and
the call while the GPU is still busy: the events then bracket GPU work only, not the host's
launch overhead. Without it, a call whose host side (argument checks, Triton's launcher)
outlasts the previous kernel is timed with that host time in it (seen on an H100: the
lightning forward at T=16K timed 0.57 ms through the public API against 0.48 ms for the
kernel). The host's own time per call is reported separately as ``host_ms``. ``fn(i)`` receives the iteration index so the caller can rotate
through input sets that together exceed L2 (see :func:`make_rotation`)::

    sets = make_rotation(lambda: make_inputs(shape), bytes_per_set)
    timing = bench(lambda i: kernel(*sets[i % len(sets)]))

:func:`bench` picks its iteration count from a first timing, so it may differ between
processes; distributed code, where every rank must run the same number of iterations, uses
:func:`bench_fixed`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch

T = TypeVar("T")

_MIN_ITERS = 5
_MAX_ITERS = 10_000  # bounds event allocation for calls of a few microseconds


@dataclass(frozen=True)
class Timing:
    """Per-iteration times in milliseconds over ``n`` timed iterations."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    host_ms: float | None = None  # the host's time to issue one call (not in the GPU times)

    @property
    def spread(self) -> float:
        """Inter-quintile range relative to the median: ``(p80 - p20) / median``."""
        return (self.p80_ms - self.p20_ms) / self.median_ms


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{what} needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})"
        )


_SLEEP_HZ = 2.0e9  # cycles per second assumed for the spin; at a lower clock it only lasts longer


def _host_ms(fn: Callable[[int], object], first: int, iters: int) -> float:
    """Median host time to issue ``fn(i)`` (no synchronisation: launch overhead only)."""
    times = []
    for k in range(iters):
        start = time.perf_counter()
        fn(first + k)
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return float(np.median(times))


def _time_each(fn: Callable[[int], object], first: int, iters: int, host_ms: float) -> list[float]:
    """Milliseconds of ``fn(first)``, ..., ``fn(first + iters - 1)``, one event pair each,
    each call preceded by a GPU spin that outlasts the host's time to issue it."""
    spin_cycles = int(min(2 * host_ms, 20.0) * 1e-3 * _SLEEP_HZ)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for k in range(iters):
        torch.cuda._sleep(spin_cycles)
        starts[k].record()
        fn(first + k)
        ends[k].record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def _summarise(times_ms: list[float], host_ms: float) -> Timing:
    median, p20, p80 = np.quantile(times_ms, [0.5, 0.2, 0.8])
    return Timing(float(median), float(p20), float(p80), len(times_ms), host_ms)


def bench(fn: Callable[[int], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Time ``fn(i)`` on the current CUDA stream: warm up ~``warmup_ms``, then time ~``rep_ms``.

    The per-call time is estimated from a first call plus five timed ones; the warm-up and
    timed counts follow from it (at least 5 timed iterations). Iteration indices keep counting
    through warm-up and timing, so a rotation ``sets[i % len(sets)]`` never restarts.
    """
    _require_cuda("bench")
    fn(0)  # compile / autotune / allocate before estimating
    torch.cuda.synchronize()
    host_ms = _host_ms(fn, 1, _MIN_ITERS)
    first = 1 + _MIN_ITERS
    estimate_ms = max(float(np.median(_time_each(fn, first, _MIN_ITERS, host_ms))), 1e-4)
    first += _MIN_ITERS
    warmup = warmup_iters(warmup_ms, estimate_ms, host_ms)
    for i in range(first, first + warmup):
        fn(i)
    iters = min(max(int(rep_ms / estimate_ms), _MIN_ITERS), _MAX_ITERS)
    return _summarise(_time_each(fn, first + warmup, iters, host_ms), host_ms)


def warmup_iters(warmup_ms: float, gpu_ms: float, host_ms: float) -> int:
    """Calls that fill ~``warmup_ms``: each takes the longer of its GPU time and the host's
    time to issue it (a 7 us decode step issued in 0.1 ms would otherwise be called 14x too
    often for a 1 s warm-up)."""
    return int(warmup_ms / max(gpu_ms, host_ms, 1e-4))


def bench_fixed(fn: Callable[[int], object], *, warmup: int, iters: int) -> Timing:
    """Time ``fn(i)`` with fixed counts: ``warmup`` untimed calls, then ``iters`` timed ones.

    For distributed code, where every rank must issue the same collectives.
    """
    _require_cuda("bench_fixed")
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    host_ms = _host_ms(fn, warmup, 1)
    return _summarise(_time_each(fn, warmup + 1, iters, host_ms), host_ms)


def make_rotation(
    make_inputs: Callable[[], T],
    bytes_per_set: int,
    *,
    l2_bytes: int | None = None,
    max_sets: int = 16,
) -> list[T]:
    """Enough input sets from ``make_inputs()`` that together they exceed twice the L2 cache.

    ``l2_bytes`` defaults to the current CUDA device's L2 size. At least 1 set, at most
    ``max_sets``.
    """
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set must be positive, got {bytes_per_set}")
    if l2_bytes is None:
        _require_cuda("make_rotation without l2_bytes")
        l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    n_sets = max(1, min(2 * l2_bytes // bytes_per_set + 1, max_sets))
    return [make_inputs() for _ in range(n_sets)]

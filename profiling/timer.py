"""CUDA-event timers and input rotation.

Each iteration is timed on its own pair of CUDA events and the timing reports the median and
the 20th/80th percentiles. ``fn(i)`` receives the iteration index so the caller can rotate
through input sets that together exceed L2 (see :func:`make_rotation`)::

    sets = make_rotation(lambda: make_inputs(shape), bytes_per_set)
    timing = bench(lambda i: kernel(*sets[i % len(sets)]))

:func:`bench` picks its iteration count from a first timing, so it may differ between
processes; distributed code, where every rank must run the same number of iterations, uses
:func:`bench_fixed`.
"""
from __future__ import annotations

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


def _time_each(fn: Callable[[int], object], first: int, iters: int) -> list[float]:
    """Milliseconds of ``fn(first)``, ..., ``fn(first + iters - 1)``, one event pair each."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for k in range(iters):
        starts[k].record()
        fn(first + k)
        ends[k].record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def _summarise(times_ms: list[float]) -> Timing:
    median, p20, p80 = np.quantile(times_ms, [0.5, 0.2, 0.8])
    return Timing(float(median), float(p20), float(p80), len(times_ms))


def bench(fn: Callable[[int], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Time ``fn(i)`` on the current CUDA stream: warm up ~``warmup_ms``, then time ~``rep_ms``.

    The per-call time is estimated from a first call plus five timed ones; the warm-up and
    timed counts follow from it (at least 5 timed iterations). Iteration indices keep counting
    through warm-up and timing, so a rotation ``sets[i % len(sets)]`` never restarts.
    """
    _require_cuda("bench")
    fn(0)  # compile / autotune / allocate before estimating
    torch.cuda.synchronize()
    estimate_ms = max(float(np.median(_time_each(fn, 1, _MIN_ITERS))), 1e-4)
    first = 1 + _MIN_ITERS
    warmup = int(warmup_ms / estimate_ms)
    for i in range(first, first + warmup):
        fn(i)
    iters = min(max(int(rep_ms / estimate_ms), _MIN_ITERS), _MAX_ITERS)
    return _summarise(_time_each(fn, first + warmup, iters))


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
    return _summarise(_time_each(fn, warmup, iters))


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

"""The outcome of measuring one candidate config, shared by the runner and the strategies."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from autotune.tunable import Config

STATUSES = ("ok", "wrong", "failed", "crashed")


@dataclass(frozen=True)
class Result:
    """One candidate, measured once with a timing budget of ``rep_ms``.

    ``status`` is ``"ok"`` (checked against the reference, then timed), ``"wrong"`` (its
    output missed the reference: never timed, never wins), ``"failed"`` (compile error, out
    of resources, any exception in the launch) or ``"crashed"`` (the worker process died or
    its CUDA context broke). ``error`` repeats the status with the reason, e.g.
    ``"wrong: rel err 3.1e-01 > 1e-02"``.
    """

    config: Config
    status: str
    rep_ms: float
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    iters: int = 0
    rel_err: float | None = None
    error: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if (self.status == "ok") != (self.median_ms is not None):
            raise ValueError(f"a result has a time exactly when its status is ok ({self.status}, {self.median_ms})")

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def config_key(config: Config) -> tuple:
    """A hashable form of ``config`` (order of the dict does not matter)."""
    return tuple(sorted(config.items()))


def ranked(results: Iterable[Result]) -> list[Result]:
    """The ok results, fastest median first."""
    return sorted((r for r in results if r.ok), key=lambda r: r.median_ms)

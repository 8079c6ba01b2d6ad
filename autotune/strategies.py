"""Search strategies: which candidates to measure, and with how much timing budget.

A strategy only sees a ``measure(configs, rep_ms) -> results`` callable (one
:class:`~autotune.result.Result` per config, in order), so it runs the same against the real
runner and against a fake landscape in tests. It returns the results its choice is made
from, all measured with the full ``rep_ms``: the runner takes the fastest ok one as the
winner and the next as the runner-up.

Cost model behind the cheaper strategies: every measured candidate pays a compile (once per
process, shared by all buckets of a head dim/dtype), a launch checked against the reference,
and a warm-up before its timed repetitions. Successive halving trims the timed part only;
random + local search measures a fixed fraction of the candidates and so trims all three.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from autotune.result import Result, config_key, ranked
from autotune.tunable import Config

Measure = Callable[[list[Config], float], list[Result]]


class Search(Protocol):
    def __call__(
        self, candidates: list[Config], measure: Measure, *, rep_ms: float, seeds: Sequence[Config], rng: random.Random
    ) -> list[Result]: ...


@dataclass(frozen=True)
class Strategy:
    name: str
    search: Search
    planned: Callable[[int], int]  # measurements it plans for n candidates (progress and ETA)
    summary: str


def exhaustive(
    candidates: list[Config], measure: Measure, *, rep_ms: float, seeds: Sequence[Config], rng: random.Random
) -> list[Result]:
    """Every candidate, once, with the full budget."""
    return measure(list(candidates), rep_ms)


HALVING_ETA = 3  # each rung keeps the best 1/ETA and gives them ETA times the budget
HALVING_FINAL = 3  # candidates in the last rung, which runs with the full budget


def _halving_rungs(n: int) -> list[int]:
    """Rung sizes for n candidates: n, ceil(n/3), ... down to at most HALVING_FINAL."""
    sizes = [n]
    while sizes[-1] > HALVING_FINAL:
        sizes.append(math.ceil(sizes[-1] / HALVING_ETA))
    return sizes


def halving(
    candidates: list[Config], measure: Measure, *, rep_ms: float, seeds: Sequence[Config], rng: random.Random
) -> list[Result]:
    """Successive halving: all candidates with ``rep_ms / 3^k``, the best third with three
    times that, ..., the last few with the full ``rep_ms``."""
    sizes = _halving_rungs(len(candidates))
    alive = list(candidates)
    for depth, keep in enumerate(sizes[1:]):
        results = measure(alive, rep_ms / HALVING_ETA ** (len(sizes) - 1 - depth))
        alive = [r.config for r in ranked(results)[:keep]]
        if not alive:
            return results
    return measure(alive, rep_ms)


LOCAL_FRACTION = 0.2  # of the candidates, measured by random + local search
LOCAL_MIN = 8


def _local_budget(n: int) -> int:
    return min(n, max(LOCAL_MIN, math.ceil(LOCAL_FRACTION * n)))


def neighbours(config: Config, values: dict[str, list]) -> list[Config]:
    """Configs that move one parameter of ``config`` one step along its sorted values
    (``values`` may name parameters that ``config`` lacks: another variant's)."""
    out = []
    for name, options in values.items():
        if name not in config:
            continue
        i = options.index(config[name])
        out += [{**config, name: options[j]} for j in (i - 1, i + 1) if 0 <= j < len(options)]
    return out


def local(
    candidates: list[Config], measure: Measure, *, rep_ms: float, seeds: Sequence[Config], rng: random.Random
) -> list[Result]:
    """Random sample plus local search, measuring at most ``max(8, 20%)`` of the candidates.

    ``seeds`` are the previous bucket's winner and the config file's winners (when there are
    any) followed by the default.
    Cold start (the default only): the seeds and a few random candidates, then repeatedly
    the unmeasured neighbours of the best so far; at a local optimum, fresh random
    candidates, until the budget is spent. Warm start (earlier winners): hill-climbing
    from the best of the seeds only, stopping at the first local optimum: neighbouring buckets share
    their optimum or sit next to it, and the configs near it are already compiled, so a
    warm bucket costs a handful of measurements. Every measurement uses the full ``rep_ms``.
    """
    if not candidates:
        return []
    budget = _local_budget(len(candidates))
    pool = {config_key(c): c for c in candidates}
    names = {name: None for c in candidates for name in c}
    values = {name: sorted({c[name] for c in candidates if name in c}, key=lambda x: (isinstance(x, str), x)) for name in names}
    draws = max(2, budget // 4)
    seen: set[tuple] = set()
    results: list[Result] = []

    def take(configs: list[Config]) -> bool:
        fresh = []
        for config in configs:
            key = config_key(config)
            if key in pool and key not in seen and len(seen) < budget:
                seen.add(key)
                fresh.append(pool[key])
        results.extend(measure(fresh, rep_ms) if fresh else [])
        return bool(fresh)

    def draw() -> list[Config]:
        unseen = [c for key, c in pool.items() if key not in seen]
        return rng.sample(unseen, min(draws, len(unseen)))

    warm = len(seeds) > 1
    take(list(seeds) + ([] if warm else draw()))
    while len(seen) < budget:
        best = ranked(results)
        if not (best and take(neighbours(best[0].config, values))):
            if warm and best:
                break  # a local optimum next to the previous bucket's
            take(draw())
    return results


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("exhaustive", exhaustive, lambda n: n, "every valid candidate with the full budget"),
        Strategy("halving", halving, lambda n: sum(_halving_rungs(n)), "successive halving, keep 1/3 per rung"),
        Strategy("local", local, _local_budget, "random sample + local search over 20% of the candidates"),
    )
}

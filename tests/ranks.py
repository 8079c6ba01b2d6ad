"""Spawning one process per rank for the distributed tests, with a wall-clock limit.

A worker ``fn(rank, port, case) -> dict`` runs in its own process; :func:`spawn_ranks` saves
what it returns to ``<outdir>/rank<r>.pt`` and, on any exception, the traceback to
``<outdir>/rank<r>.err``; the parent kills ranks still running at the limit and fails with
every rank's error.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, port: int, case: dict, outdir: str) -> None:
    try:
        torch.save(fn(rank, port, case), os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def spawn_ranks(fn: Callable[[int, int, dict], dict], case: dict, outdir, wall_s: float) -> list[dict]:
    """Run ``fn(rank, port, case)`` on ``case["W"]`` spawned ranks; their results, by rank."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, port, case, str(outdir)), daemon=True)
             for r in range(case["W"])]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wall_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = {r: open(os.path.join(outdir, f"rank{r}.err")).read()
              for r in range(case["W"]) if os.path.exists(os.path.join(outdir, f"rank{r}.err"))}
    assert not hung, f"ranks {hung} still running after {wall_s} s (killed); errors: {errors}"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}; errors: {errors}"
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(case["W"])]

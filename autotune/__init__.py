"""The autotuner: sweep a kernel's launch configs on this GPU, write the per-GPU config file.

- :mod:`autotune.tunable`: what a kernel registers (space, pruning, buckets, inputs, reference).
- :mod:`autotune.lightning`: the lightning attention forward kernel as a tunable.
- :mod:`autotune.strategies`: exhaustive, successive halving, random + local search.
- :mod:`autotune.worker`: checking and timing one candidate, isolated in a worker process.
- :mod:`autotune.runner`: tuning every shape bucket of a kernel, with telemetry.
- :mod:`autotune.writer`: the atomic, merging write of ``kernels/configs/<gpu>/<kernel>.json``.
- :mod:`autotune.cli`: ``kwb tune`` and ``kwb info`` (also ``python -m autotune``).

Importing this package imports no kernel (see :mod:`autotune.tunable`).
"""

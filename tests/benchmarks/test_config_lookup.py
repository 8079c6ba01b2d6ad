"""pytest-benchmark: the per-call cost of a cached tuned-config lookup (runs on any machine).

Every kernel call does one lookup, so it must stay in microseconds:
``pytest tests/benchmarks/test_config_lookup.py --benchmark-enable``.
"""
import warnings

from kernels import _config
from kernels.lightning_attn.forward import DEFAULT_CONFIG, KERNEL, bucket_key

import torch


def test_cached_lookup(benchmark):
    key = bucket_key(128, 128, 16384, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark(_config.lookup, KERNEL, key, default=DEFAULT_CONFIG, near=("T",), slug="nvidia-h100-80gb-hbm3")
    assert _config.lookup(KERNEL, key, default=DEFAULT_CONFIG, near=("T",), slug="nvidia-h100-80gb-hbm3")["BT"] > 0

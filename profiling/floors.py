"""Roofline floors: the time a kernel cannot beat on a given GPU.

Two numbers per GPU, both measured rather than taken from a datasheet: HBM bandwidth as a
large device-to-device copy (bytes read + written), and dense compute as a bf16 8192^3
``torch.mm``. A kernel's floor is the larger of its bytes over the first and its FLOPs over
the second.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from profiling.gpu import versions
from profiling.timer import _require_cuda, bench

CEILINGS: dict[str, dict] = {
    "nvidia-h100-80gb-hbm3": {
        "copy_tb_s": 3.02,
        "bf16_tflop_s": 708.0,
        "source": "DESIGN.md: device-to-device copy and bf16 8192^3 matmul, torch 2.11, triton 3.6, driver 580",
    },
    "nvidia-h200": {
        "copy_tb_s": 4.28,
        "bf16_tflop_s": 676.0,
        "source": "measure_ceilings() on one H200 of a 4-GPU host, 2026-11-27: 2 GiB device-to-device copy, "
                  "bf16 8192^3 torch.mm; torch 2.11.0+cu130, triton 3.6.0, driver 580.159.04",
    },
}

_COPY_BYTES = 2 * 2**30  # per buffer: far beyond L2, so every iteration goes to HBM
_MM_SIZE = 8192


def ceilings_for(slug: str | None) -> dict | None:
    """The measured ceilings of the GPU with this slug, or None when it has none."""
    return CEILINGS.get(slug) if slug else None


def measure_ceilings() -> dict:
    """Measure ``copy_tb_s`` and ``bf16_tflop_s`` on the current CUDA device (a few seconds)."""
    _require_cuda("measure_ceilings")
    src = torch.randint(0, 256, (_COPY_BYTES,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = bench(lambda i: dst.copy_(src))
    del src, dst

    a = torch.randn(_MM_SIZE, _MM_SIZE, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(_MM_SIZE, _MM_SIZE, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(a)
    mm = bench(lambda i: torch.mm(a, b, out=out))

    v = versions()
    return {
        "copy_tb_s": 2 * _COPY_BYTES / (copy.median_ms * 1e-3) / 1e12,
        "bf16_tflop_s": 2 * _MM_SIZE**3 / (mm.median_ms * 1e-3) / 1e12,
        "source": (
            f"measured {datetime.now(timezone.utc).date()} on {torch.cuda.get_device_name()}: "
            f"device-to-device copy of {_COPY_BYTES // 2**30} GiB and bf16 {_MM_SIZE}^3 torch.mm, "
            f"torch {v['torch']}, triton {v['triton']}, driver {v['driver']}"
        ),
    }


@dataclass(frozen=True)
class Floor:
    """Lower bound on a kernel's time: the larger of its memory time and its compute time."""

    bytes: int
    flops: int
    bytes_ms: float
    flops_ms: float
    floor_ms: float
    bound: str  # "memory" or "compute"


def floor(bytes: int, flops: int, ceilings: dict) -> Floor:
    """Floor of a kernel that must move ``bytes`` and compute ``flops`` under ``ceilings``."""
    bytes_ms = bytes / (ceilings["copy_tb_s"] * 1e12) * 1e3
    flops_ms = flops / (ceilings["bf16_tflop_s"] * 1e12) * 1e3
    bound = "memory" if bytes_ms >= flops_ms else "compute"
    return Floor(bytes, flops, bytes_ms, flops_ms, max(bytes_ms, flops_ms), bound)

"""Benchmarks as data: an operator is an input generator plus named providers (ours, the
peers, the floor), measured the same way and written as one results line each.

Lightning attention forward: ours vs fla's ``chunk_simple_gla`` computing the same function
(``g_gamma = -slopes``), vs causal SDPA (FlashAttention) on the same q, k, v, and vs the HBM
floor: read q, k, v once and write o once, at the measured copy rate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from kernels.lightning_attn import lightning_attn, minimax_slopes
from kernels.lightning_attn.forward import KERNEL, bucket_key, default_config
from kernels import _config
from reference.lightning_attn import lightning_attn_chunked_ref
from profiling import Record, TelemetrySampler, append_records, bench, make_rotation, record_from_timing

LIGHTNING_FWD_SHAPES = [
    {"B": 1, "T": 4096, "H": 64, "D": 128, "E": 128},
    {"B": 1, "T": 16384, "H": 64, "D": 128, "E": 128},
    {"B": 1, "T": 65536, "H": 64, "D": 128, "E": 128},
    {"B": 8, "T": 4096, "H": 64, "D": 128, "E": 128},
]


def shape_id(shape: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in shape.items())


def lightning_fwd_bytes(shape: dict, itemsize: int = 2) -> int:
    """q, k, v read once and o written once."""
    B, T, H, D, E = (shape[k] for k in "BTHDE")
    return B * T * H * (2 * D + 2 * E) * itemsize


def lightning_fwd_flops(shape: dict) -> int:
    """The recurrence's own work: k^T v into the state and q S out of it, 2*D*E each per token."""
    B, T, H, D, E = (shape[k] for k in "BTHDE")
    return 4 * B * T * H * D * E


def _fla_fwd() -> Callable | None:
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return lambda q, k, v, s: chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0)


def _sdpa_fwd(q, k, v, s):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )


def kernel_source_hash() -> str:
    """Identifies the kernel version a number was measured with (the tree travels without .git)."""
    import hashlib
    import kernels.lightning_attn.forward as forward

    return hashlib.sha1(Path(forward.__file__).read_bytes()).hexdigest()[:12]


def lightning_fwd_providers() -> dict[str, Callable | None]:
    """name -> fn(q, k, v, slopes); None where the peer is not installed."""
    return {
        "ours": lambda q, k, v, s: lightning_attn(q, k, v, s),
        "fla": _fla_fwd(),
        "sdpa": _sdpa_fwd,
    }


class LightningFwdCase:
    """One (shape, provider) case: rotated inputs over 2x L2 and ``call(i)`` on set i."""

    def __init__(self, shape: dict, provider: str, *, dtype: torch.dtype = torch.bfloat16,
                 layer: int = 3, num_layers: int = 8):
        self.shape, self.provider, self.dtype = shape, provider, dtype
        self.fn = lightning_fwd_providers()[provider]
        self.extra = {"layer": layer, "num_layers": num_layers, "kernel_source": kernel_source_hash()}
        if self.fn is None:
            return
        B, T, H, D, E = (shape[k] for k in "BTHDE")
        self.slopes = minimax_slopes(H, layer, num_layers).cuda()

        def make():
            return (
                torch.randn(B, T, H, D, device="cuda", dtype=dtype),
                torch.randn(B, T, H, D, device="cuda", dtype=dtype),
                torch.randn(B, T, H, E, device="cuda", dtype=dtype),
            )

        self.sets = make_rotation(make, lightning_fwd_bytes(shape, dtype.itemsize), max_sets=8)
        self.extra["rotation_sets"] = len(self.sets)

    @property
    def available(self) -> bool:
        return self.fn is not None

    def call(self, i: int):
        return self.fn(*self.sets[i % len(self.sets)], self.slopes)

    def check(self) -> float | None:
        """Relative error vs the float64 reference (None for SDPA, another function)."""
        if self.provider == "sdpa":
            return None
        out = self.call(0)
        out = out[0] if isinstance(out, tuple) else out
        ref, _ = lightning_attn_chunked_ref(*self.sets[0], self.slopes)
        return ((out.double() - ref).norm() / ref.norm()).item()

    def measure(self) -> Record:
        """Check, then time (CUDA events, median/p20/p80) under a telemetry sampler."""
        err = self.check()
        if err is not None:
            self.extra["rel_err_vs_ref"] = err
        with TelemetrySampler() as sampler:
            timing = bench(self.call)
        B, T, H, D, E = (self.shape[k] for k in "BTHDE")
        config = {}
        if self.provider == "ours":
            config = _config.lookup(KERNEL, bucket_key(D, E, T, self.dtype), default=default_config(D, E), near=("T",))
        return record_from_timing(
            timing, kernel=KERNEL, provider=self.provider, mode="fwd", shape=self.shape,
            dtype=str(self.dtype).removeprefix("torch."), config=config, x_name="T", x_value=T,
            bytes=lightning_fwd_bytes(self.shape, self.dtype.itemsize), flops=lightning_fwd_flops(self.shape),
            telemetry=sampler.summary(), extra=dict(self.extra),
        )


def save(records: list[Record], results_dir: str | Path = "results") -> Path:
    """Append to ``<results_dir>/<kernel>.jsonl``; returns the file."""
    path = Path(results_dir) / f"{records[0].kernel}.jsonl"
    append_records(records, path)
    return path

"""Comparison helpers shared by the tests (tolerances from DESIGN.md, by dtype)."""
from __future__ import annotations

import torch

from autotune.worker import float64_chunks, rel_error

# relative Frobenius error bounds: fp32 arithmetic, tf32 matrix units, bf16/fp16 operands
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return max(((a - b).abs().max().item() for a, b in float64_chunks(out, ref)), default=0.0)


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Fail with the tensor's name, relative error and max-abs error; NaN never passes."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} (max abs {max_abs_error(out, ref):.3e})"


def strided_copy(x: torch.Tensor) -> torch.Tensor:
    """x's values with a gap after each head's columns: not TMA-viewable, so kernels read it
    through pointer loads."""
    padded = torch.full((*x.shape[:-1], x.shape[-1] + 16), float("nan"), dtype=x.dtype, device=x.device)
    padded[..., : x.shape[-1]] = x
    return padded[..., : x.shape[-1]]

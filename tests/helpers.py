"""Comparison helpers shared by the tests (tolerances from DESIGN.md, by dtype)."""
from __future__ import annotations

import torch

# relative Frobenius error bounds: fp32 arithmetic, tf32 matrix units, bf16/fp16 operands
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out has NaN or inf)."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Fail with the tensor's name, relative error and max-abs error; NaN never passes."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_error(out, ref)
    max_abs = (out.detach().double() - ref.detach().double()).abs().max().item() if out.numel() else 0.0
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} (max abs {max_abs:.3e})"

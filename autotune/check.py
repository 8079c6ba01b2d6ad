"""``kwb check``: every kernel against its reference on fresh random inputs, as a table.

Without a GPU the kernels run through the Triton interpreter on small shapes; with one they
run compiled, on the same shapes plus larger ones.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class CheckResult:
    kernel: str
    case: str
    dtype: str
    rel_err: float
    tol: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tol  # NaN compares False: never passes


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double().to(out.device)
    return float("nan") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


def _lightning_fwd_cases(device: str) -> list[tuple[str, Callable[[], tuple[float, float]], torch.dtype]]:
    from kernels.lightning_attn import lightning_attn, minimax_slopes
    from reference.lightning_attn import lightning_attn_chunked_ref, lightning_attn_ref

    def case(B, T, H, D, E, dtype, layer, varlen=False):
        def run():
            q, k, v = (torch.randn(B, T, H, d, device=device).to(dtype) for d in (D, D, E))
            s = minimax_slopes(H, layer, 8).to(device)
            cu = None
            N = B
            if varlen:
                cu = torch.tensor([0, 0, 1, T // 3, T], device=device, dtype=torch.int32)
                N = 4
            h0 = torch.randn(N, H, D, E, device=device)
            o, ht = lightning_attn(q, k, v, s, scale=0.5, initial_state=h0, output_final_state=True, cu_seqlens=cu)
            if varlen or device == "cpu":
                ro, rh = lightning_attn_ref(*(x.cpu() for x in (q, k, v, s)), scale=0.5, initial_state=h0.cpu(),
                                            cu_seqlens=None if cu is None else cu.cpu())
            else:
                ro, rh = lightning_attn_chunked_ref(q, k, v, s, scale=0.5, initial_state=h0)
            return _rel(o, ro), _rel(ht, rh)

        name = f"B{B} T{T} H{H} D{D} E{E} layer{layer}" + (" varlen" if varlen else "")
        return name, run, dtype

    cases = [case(2, 77, 2, 32, 64, torch.float32, 0), case(1, 100, 2, 64, 64, torch.bfloat16, 7),
             case(1, 50, 2, 16, 16, torch.float16, 3), case(1, 60, 2, 32, 32, torch.float32, 1, varlen=True)]
    if device == "cuda":
        cases += [case(1, 16384, 64, 128, 128, torch.bfloat16, 3), case(8, 4096, 64, 128, 128, torch.bfloat16, 0)]
    return cases


def run_checks() -> list[CheckResult]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for name, run, dtype in _lightning_fwd_cases(device):
        start = time.perf_counter()
        errors = run()
        worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)
        results.append(CheckResult("lightning_attn_fwd", name, str(dtype).removeprefix("torch."),
                                   worst, TOLERANCE[dtype], time.perf_counter() - start))
    return results


def mode() -> str:
    if torch.cuda.is_available():
        return f"compiled on {torch.cuda.get_device_name()}"
    return "Triton interpreter (no GPU)" if os.environ.get("TRITON_INTERPRET") == "1" else "no GPU"

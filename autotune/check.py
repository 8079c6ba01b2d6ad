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
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float("nan") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


Case = tuple[str, str, Callable[[], tuple[float, ...]], torch.dtype]  # kernel, name, run, dtype


def _lightning_cases(device: str) -> list[Case]:
    """Forward (o, final state), backward (dq, dk, dv, dh0) and decode (o, state) checks."""
    from kernels.lightning_attn import lightning_attn, lightning_decode, minimax_slopes
    from reference.lightning_attn import lightning_attn_chunked_ref, lightning_attn_ref, lightning_decode_ref

    def inputs(B, T, H, D, E, dtype, layer, N):
        q, k, v = (torch.randn(B, T, H, d, device=device).to(dtype) for d in (D, D, E))
        return q, k, v, minimax_slopes(H, layer, 8).to(device), torch.randn(N, H, D, E, device=device)

    def forward(B, T, H, D, E, dtype, layer, varlen=False):
        def run():
            cu = torch.tensor([0, 0, 1, T // 3, T], device=device, dtype=torch.int32) if varlen else None
            q, k, v, s, h0 = inputs(B, T, H, D, E, dtype, layer, 4 if varlen else B)
            o, ht = lightning_attn(q, k, v, s, scale=0.5, initial_state=h0, output_final_state=True, cu_seqlens=cu)
            if varlen or device == "cpu":
                ro, rh = lightning_attn_ref(*(x.cpu() for x in (q, k, v, s)), scale=0.5, initial_state=h0.cpu(),
                                            cu_seqlens=None if cu is None else cu.cpu())
            else:
                ro, rh = lightning_attn_chunked_ref(q, k, v, s, scale=0.5, initial_state=h0)
            return _rel(o, ro), _rel(ht, rh)

        name = f"B{B} T{T} H{H} D{D} E{E} layer{layer}" + (" varlen" if varlen else "")
        return "lightning_attn_fwd", name, run, dtype

    def backward(B, T, H, D, E, dtype, layer):
        def run():
            q, k, v, s, h0 = inputs(B, T, H, D, E, dtype, layer, B)
            leaves = [x.detach().requires_grad_() for x in (q, k, v, h0)]
            do, dht = torch.randn(B, T, H, E, device=device).to(dtype), torch.randn(B, H, D, E, device=device)
            o, ht = lightning_attn(*leaves[:3], s, scale=0.5, initial_state=leaves[3], output_final_state=True)
            got = torch.autograd.grad((o.float() * do.float()).sum() + (ht * dht).sum(), leaves)
            ref_leaves = [x.detach().cpu().double().requires_grad_() for x in leaves]
            ro, rh = lightning_attn_ref(*ref_leaves[:3], s.cpu(), scale=0.5, initial_state=ref_leaves[3])
            want = torch.autograd.grad((ro * do.cpu().double()).sum() + (rh * dht.cpu().double()).sum(), ref_leaves)
            return tuple(_rel(g, w) for g, w in zip(got, want))

        return "lightning_attn_bwd", f"B{B} T{T} H{H} D{D} E{E} layer{layer} dq dk dv dh0", run, dtype

    def decode(B, H, D, E, dtype, layer):
        def run():
            q, k, v, s, state = inputs(B, 1, H, D, E, dtype, layer, B)
            q, k, v = q[:, 0], k[:, 0], v[:, 0]
            ro, rs = lightning_decode_ref(q.cpu(), k.cpu(), v.cpu(), s.cpu(), state.cpu())
            o, new_state = lightning_decode(q, k, v, s, state)
            return _rel(o, ro), _rel(new_state, rs)

        return "lightning_decode", f"B{B} H{H} D{D} E{E} layer{layer}", run, dtype

    cases = [forward(2, 77, 2, 32, 64, torch.float32, 0), forward(1, 100, 2, 64, 64, torch.bfloat16, 7),
             forward(1, 50, 2, 16, 16, torch.float16, 3), forward(1, 60, 2, 32, 32, torch.float32, 1, varlen=True),
             backward(1, 45, 2, 32, 32, torch.float32, 0), backward(2, 70, 2, 16, 32, torch.bfloat16, 7),
             decode(3, 2, 32, 64, torch.float32, 0), decode(2, 4, 64, 64, torch.bfloat16, 5)]
    if device == "cuda":
        cases += [forward(1, 16384, 64, 128, 128, torch.bfloat16, 3), forward(8, 4096, 64, 128, 128, torch.bfloat16, 0),
                  backward(1, 2048, 8, 128, 128, torch.bfloat16, 3), decode(64, 64, 128, 128, torch.bfloat16, 3)]
    return cases


def _moe_cases(device: str) -> list[Case]:
    """Grouped GEMM (with an empty expert) and moe_ffn (output and all four gradients)."""
    from kernels.moe_gemm import grouped_gemm, moe_ffn
    from reference.moe import grouped_gemm_ref, moe_ffn_ref

    def gemm(counts, K, N, dtype):
        def run():
            offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
            x = torch.randn(int(offsets[-1]), K, device=device).to(dtype)
            w = (torch.randn(len(counts), K, N, device=device) * K**-0.5).to(dtype)
            return (_rel(grouped_gemm(x, w, offsets), grouped_gemm_ref(x, w, offsets)),)  # float64 where x lives

        return "grouped_gemm", f"E{len(counts)} rows {counts} K{K} N{N}", run, dtype

    def ffn(T, Hd, F, E, top_k, dtype):
        def run():
            leaves = [torch.randn(T, Hd, device=device).to(dtype), torch.randn(T, E, device=device),
                      (torch.randn(E, Hd, 2 * F, device=device) * Hd**-0.5).to(dtype),
                      (torch.randn(E, F, Hd, device=device) * F**-0.5).to(dtype)]
            leaves = [t.requires_grad_() for t in leaves]
            dout = torch.randn(T, Hd, device=device)
            out = moe_ffn(*leaves, top_k=top_k)
            got = torch.autograd.grad((out.float() * dout).sum(), leaves)
            ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
            ref = moe_ffn_ref(*ref_leaves, top_k)
            want = torch.autograd.grad((ref * dout.cpu().double()).sum(), ref_leaves)
            return (_rel(out, ref),) + tuple(_rel(g, w) for g, w in zip(got, want))

        return "moe_ffn", f"T{T} Hd{Hd} F{F} E{E} top{top_k} out dx dlogits dw1 dw2", run, dtype

    cases = [gemm([5, 0, 40, 19], 48, 40, torch.float32), gemm([33, 0, 0, 70], 64, 96, torch.bfloat16),
             ffn(24, 40, 24, 4, 2, torch.float32)]
    if device == "cuda":
        cases += [gemm([1024] * 31 + [0], 6144, 2048, torch.bfloat16)]
    return cases


def run_checks() -> list[CheckResult]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for kernel, name, run, dtype in _lightning_cases(device) + _moe_cases(device):
        start = time.perf_counter()
        errors = run()
        worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)
        results.append(CheckResult(kernel, name, str(dtype).removeprefix("torch."),
                                   worst, TOLERANCE[dtype], time.perf_counter() - start))
    return results


def mode() -> str:
    if torch.cuda.is_available():
        return f"compiled on {torch.cuda.get_device_name()}"
    return "Triton interpreter (no GPU)" if os.environ.get("TRITON_INTERPRET") == "1" else "no GPU"

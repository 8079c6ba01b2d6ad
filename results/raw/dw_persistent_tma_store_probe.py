"""Probe kernel (rejected, not in the tree): persistent dW with nested loops and TMA stores.

One program per SM takes output tiles p, p + P, ... numbered expert-major (GROUP_K-swizzled
(K tile, N tile) order inside an expert). Each tile: the committed kernel's row loop (TMA loads
for full BLOCK_M steps, masked pointer loads for the last partial one), then a TMA store of
the [BK, BN] tile into dW viewed as [E * K, N] (needs K % BLOCK_K == 0 so a tile stays in its
expert's rows). The store is asynchronous: its global write overlaps the next tile's loads
and MMAs, which a one-tile-per-program kernel with 1 program/SM (the 64 x 256 x 128 config,
147 KB of shared memory) cannot do.

Probe (session 9, 1 H100): the committed dW, torch._grouped_mm and this kernel at several configs,
E=32 up/down, 4K/16K tokens, random routing, bf16. Per shape: 1.5 s heat, then 3 interleaved
rounds of 100 ms warm-up + 300 ms timed. Outputs compared with the committed kernel's.
python results/raw/dw_persistent_tma_store_probe.py OUT.json
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _dw_ptma_kernel(
    a, b, a_desc, b_desc, c_desc, offsets,
    N, K, NUM_EXPERTS, NUM_PROGRAMS,
    stride_am, stride_ak, stride_bm, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    num_pid_k = (K + BLOCK_K - 1) // BLOCK_K
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    tiles_per_expert = num_pid_k * num_pid_n
    num_in_group = GROUP_K * num_pid_n
    for tile in range(tl.program_id(0), NUM_EXPERTS * tiles_per_expert, NUM_PROGRAMS):
        i_e = tile // tiles_per_expert
        pid = tile % tiles_per_expert
        first_k = (pid // num_in_group) * GROUP_K
        group_size = tl.minimum(num_pid_k - first_k, GROUP_K)
        i_k = first_k + (pid % num_in_group) % group_size
        i_n = (pid % num_in_group) // group_size
        row_start = tl.load(offsets + i_e - 1, mask=i_e > 0, other=0)
        row_end = tl.load(offsets + i_e)
        o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_k, m_n = o_k < K, o_n < N
        b_acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        tma_steps = (row_end - row_start) // BLOCK_M
        for i_m in range(0, tma_steps):
            row = row_start + i_m * BLOCK_M
            b_a = a_desc.load([row, i_k * BLOCK_K])
            b_b = b_desc.load([row, i_n * BLOCK_N])
            b_acc = tl.dot(tl.trans(b_a), b_b, b_acc, input_precision=DOT_PRECISION)
        for row in range(row_start + tma_steps * BLOCK_M, row_end, BLOCK_M):
            o_m = row + tl.arange(0, BLOCK_M)
            m_m = o_m < row_end
            o_am = o_m.to(tl.int64)
            b_at = tl.load(a + o_am[None, :] * stride_am + o_k[:, None] * stride_ak, mask=m_k[:, None] & m_m[None, :], other=0.0)
            b_b = tl.load(b + o_am[:, None] * stride_bm + o_n[None, :] * stride_bn, mask=m_m[:, None] & m_n[None, :], other=0.0)
            b_acc = tl.dot(b_at, b_b, b_acc, input_precision=DOT_PRECISION)
        c_desc.store([i_e * K + i_k * BLOCK_K, i_n * BLOCK_N], b_acc.to(c_desc.dtype))


def dw_ptma(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, config: dict, num_programs: int | None = None) -> torch.Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e]; bf16, rows 16-byte aligned, K % BLOCK_K == 0."""
    M, N = dy.shape
    K = x.shape[1]
    E = offsets.shape[0]
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    assert K % BK == 0 and x.dtype == dy.dtype == torch.bfloat16
    dw = torch.empty(E, K, N, dtype=dy.dtype, device=dy.device)
    a_desc = TensorDescriptor.from_tensor(x, [BM, BK])
    b_desc = TensorDescriptor.from_tensor(dy, [BM, BN])
    c_desc = TensorDescriptor.from_tensor(dw.view(E * K, N), [BK, BN])
    tiles = E * triton.cdiv(K, BK) * triton.cdiv(N, BN)
    if num_programs is None:
        sms = torch.cuda.get_device_properties(dy.device).multi_processor_count if dy.is_cuda else 4
        num_programs = sms * config.get("PROGRAMS_PER_SM", 1)
    P = min(num_programs, tiles)
    _dw_ptma_kernel[(P,)](
        x, dy, a_desc, b_desc, c_desc, offsets, N, K, E, P,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_K=config["GROUP_K"], DOT_PRECISION="tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return dw


# ---- the probe ----
import importlib
import json
import statistics
import sys
import time

import torch

from autotune.moe import BENCH_SHAPES, GroupedGemmCase, make_inputs_dw
from profiling import bench, versions

gg = importlib.import_module("kernels.moe_gemm.grouped_gemm")


def c(BM, BN, BK, G, w, s, pps=1):
    return {"BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK, "GROUP_K": G, "num_warps": w, "num_stages": s, "PROGRAMS_PER_SM": pps}


VARIANTS = {
    "p64x256x128s3": c(64, 256, 128, 8, 8, 3), "p64x256x128s2": c(64, 256, 128, 8, 8, 2),
    "p32x128x128s4": c(32, 128, 128, 1, 4, 4), "p32x128x128s4x2": c(32, 128, 128, 1, 4, 4, 2),
    "p64x128x128s3": c(64, 128, 128, 8, 4, 3), "p64x256x64s3": c(64, 256, 64, 8, 8, 3),
}
out = {"versions": versions(), "gpu": torch.cuda.get_device_name(), "rows": []}
for s in (s for s in BENCH_SHAPES if s["routing"] == "random"):
    tshape = {k: s[k] for k in ("E", "K", "N", "T", "top_k", "routing")} | {"dtype": "bf16"}
    inp = make_inputs_dw(tshape, "cuda")
    x, dy, off = inp["x"], inp["dy"], inp["offsets"]
    ref = gg.grouped_gemm_dw(x, dy, off)
    fns, check = {"committed": lambda i: gg.grouped_gemm_dw(x, dy, off)}, {}
    for name, cfg in VARIANTS.items():
        try:
            o = dw_ptma(x, dy, off, cfg)
            torch.cuda.synchronize()
            check[name] = {"bitwise": bool(torch.equal(o, ref)), "max_abs": float((o.float() - ref.float()).abs().max())}
            fns[name] = (lambda cfg: lambda i: dw_ptma(x, dy, off, cfg))(cfg)
        except Exception as e:  # noqa: BLE001
            check[name] = {"error": repr(e)[-300:]}
    tgm = GroupedGemmCase(s, "dw", "torch_grouped_mm")
    fns["torch_grouped_mm"] = tgm.call
    t0 = time.time()
    while time.time() - t0 < 1.5:
        fns["committed"](0)
    times = {k: [] for k in fns}
    for r in range(3):
        for k, fn in fns.items():
            times[k].append(bench(fn, warmup_ms=100, rep_ms=300).median_ms)
    flops = 2 * s["T"] * s["top_k"] * s["K"] * s["N"]
    row = {"proj": s["proj"], "T": s["T"], "check": check,
           "times": {k: {"median_ms": round(statistics.median(v), 4), "rounds": [round(q, 4) for q in v],
                         "tflops": round(flops / statistics.median(v) / 1e9, 1)} for k, v in times.items()}}
    out["rows"].append(row)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
    print(s["proj"], s["T"], json.dumps(check), flush=True)
    print("   ", " | ".join(f"{k} {v['median_ms']:.3f} ({v['tflops']})" for k, v in row["times"].items()), flush=True)
    del inp, x, dy, ref, tgm, fns
    torch.cuda.empty_cache()

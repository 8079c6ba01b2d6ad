"""Minimal Hopper warp-specialization check under triton 3.6 (session 10): does a plain TMA matmul
with tl.range(..., warp_specialize=True) run on an H100, or hang like our grouped GEMM did (session 8)?
Compiled for sm_90 on the CPU machine with triton 3.6: the inner-K-loop kernel specializes (4 warps
-> 12, setmaxnreg, 168 registers) only with a pointer-store epilogue (with a descriptor store the
NVGPUWarpSpecialization pass fails: "tensor descriptor block and tensor types must match"); the
persistent tile-loop kernel compiles without specializing (4 warps, no setmaxnreg), so the run below
times it without the flag only. Each variant runs in a subprocess with a 30 s limit.
Usage: python results/raw/warp_spec_min_probe.py [variant M N K]"""
import json, subprocess, sys, time
import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def mm_kernel(a_desc, b_desc, c_desc, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              WS: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pm = pid // num_n
    pn = pid % num_n
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES, warp_specialize=WS):
        a = a_desc.load([pm * BM, k * BK])
        b = b_desc.load([k * BK, pn * BN])
        acc = tl.dot(a, b, acc)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def mm_persistent(a_desc, b_desc, c_desc, M, N, K, NUM_SMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    start = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    num_tiles = tl.cdiv(M, BM) * num_n
    k_tiles = tl.cdiv(K, BK)
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=True, warp_specialize=WS, num_stages=STAGES):
        pm = tile // num_n
        pn = tile % num_n
        acc = tl.zeros((BM, BN), tl.float32)
        for k in range(k_tiles):
            a = a_desc.load([pm * BM, k * BK])
            b = b_desc.load([k * BK, pn * BN])
            acc = tl.dot(a, b, acc)
        c_desc.store([pm * BM, pn * BN], acc.to(tl.bfloat16))


def run(variant, M, N, K):
    torch.manual_seed(0)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    c = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    BM, BN, BK, STAGES, W = 128, 256, 64, 3, 8
    kind, ws = variant.split("-")
    ws = ws == "ws"
    if ws:
        W = 4  # WS: 4 warps per consumer group
    ad = TensorDescriptor.from_tensor(a, [BM, BK])
    bd = TensorDescriptor.from_tensor(b, [BK, BN])
    cd = TensorDescriptor.from_tensor(c, [BM, BN])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if kind == "plain":
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
        call = lambda: mm_kernel[grid](ad, bd, cd, c, M, N, K, BM, BN, BK, ws, STAGES, num_warps=W)
    else:
        grid = (sms,)
        call = lambda: mm_persistent[grid](ad, bd, cd, M, N, K, sms, BM, BN, BK, ws, STAGES, num_warps=W)
    t0 = time.time(); call(); torch.cuda.synchronize(); first = time.time() - t0
    ref = (a.float() @ b.float())
    err = ((c.float() - ref).abs().max() / ref.abs().max()).item()
    ms = triton.testing.do_bench(call, warmup=50, rep=300)
    dense = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300)
    fl = 2 * M * N * K
    print(json.dumps({"variant": variant, "M": M, "N": N, "K": K, "first_call_s": round(first, 2), "rel_err": err,
                      "ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 1), "torch_mm_ms": round(dense, 4),
                      "torch_mm_tflops": round(fl / dense / 1e9, 1), "n_regs": None}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1], *map(int, sys.argv[2:5]))
        sys.exit(0)
    print(json.dumps({"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name()}))
    hung = set()
    for shape, variants in (((8192, 8192, 8192), ("plain-no", "plain-ws")), ((32768, 6144, 1024), ("plain-no", "plain-ws")),
                            ((8192, 8192, 8192), ("persistent-no",))):
        for variant in variants:
            if variant in hung:
                continue
            try:
                p = subprocess.run([sys.executable, __file__, variant, *map(str, shape)], capture_output=True, text=True, timeout=30)
                print(p.stdout.strip() or json.dumps({"variant": variant, "shape": shape, "rc": p.returncode, "stderr": p.stderr[-600:]}), flush=True)
            except subprocess.TimeoutExpired:
                hung.add(variant)
                print(json.dumps({"variant": variant, "shape": shape, "hung": "no result in 30 s"}), flush=True)

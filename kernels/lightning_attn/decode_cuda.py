"""The decode step in CUDA C++, compiled at run time through CuPy (``backend="cupy"``).

The same step as the Triton kernel in :mod:`kernels.lightning_attn.decode`, per (b, h) with
``lambda = exp(-slopes[h])``: ``S <- lambda S + k^T v`` in place on the fp32 ``[D, E]``
state, ``o = scale * q S``. Written for the memory system, since that is all this step is:

- grid ``(E / BV, B * H)``: one block per (b, h, BV-wide slice of E), which it reads once
  and writes back once;
- ``BV / 4`` threads across the slice, each owning 4 adjacent columns (one 16-byte
  ``float4`` load and store per state row), times ``ROWS`` threads down D, each walking the
  rows ``r, r + ROWS, ...``; consecutive threads touch consecutive 16-byte words of a row;
- the partial sums of ``q S`` over each thread's rows meet in shared memory
  (``ROWS x BV`` floats) and the first row of threads writes o.

The tunables are ``BV`` and ``ROWS`` (``BV / 4 * ROWS`` threads per block). q, k, v may have
any strides; o and the state are contiguous. bf16 / fp16 are handled as raw 16-bit words
with PTX conversions, so the source needs no CUDA headers. No allocation, no host sync: the
launch goes to torch's current stream and can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools

import torch

try:
    import cupy
    import numpy as np
except ImportError:  # optional extra: `pip install -e .[cupy]`
    cupy = None

SOURCE = r"""
typedef unsigned short u16;

__device__ __forceinline__ float bf16_to_f32(u16 x) { return __uint_as_float(((unsigned int)x) << 16); }
__device__ __forceinline__ float fp16_to_f32(u16 x) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f; }
__device__ __forceinline__ u16 f32_to_bf16(float x) { u16 r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ __forceinline__ u16 f32_to_fp16(float x) { u16 r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }

// IO: 0 = float32, 1 = bfloat16, 2 = float16 (q, k, v and o); SL: the same codes, or 3 =
// float64, for the slopes
template <int IO> struct Io;
template <> struct Io<0> { typedef float T; __device__ static float load(T x) { return x; } __device__ static T store(float x) { return x; } };
template <> struct Io<1> { typedef u16 T; __device__ static float load(T x) { return bf16_to_f32(x); } __device__ static T store(float x) { return f32_to_bf16(x); } };
template <> struct Io<2> { typedef u16 T; __device__ static float load(T x) { return fp16_to_f32(x); } __device__ static T store(float x) { return f32_to_fp16(x); } };
template <> struct Io<3> { typedef double T; __device__ static float load(T x) { return (float)x; } __device__ static T store(float x) { return x; } };

template <int IO, int SL, int H, int D, int E, int BV, int ROWS>
__global__ void __launch_bounds__(BV / 4 * ROWS)
lightning_decode_step(
    const typename Io<IO>::T* __restrict__ q, const typename Io<IO>::T* __restrict__ k,
    const typename Io<IO>::T* __restrict__ v, typename Io<IO>::T* __restrict__ o,
    const typename Io<SL>::T* __restrict__ slopes, float* __restrict__ state, float scale,
    long long sqb, long long sqh, long long sqd, long long skb, long long skh, long long skd,
    long long svb, long long svh, long long sve, long long sslope)
{
    constexpr int COLS = BV / 4;                       // threads across the slice, 4 columns each
    __shared__ float partial[ROWS][BV];
    const int i_v = blockIdx.x, i_bh = blockIdx.y;
    const long long i_b = i_bh / H;
    const int i_h = i_bh % H;
    const int c = threadIdx.x % COLS, r = threadIdx.x / COLS;
    const int e0 = i_v * BV + 4 * c;                   // this thread's first column of E

    const float lam = __expf(-Io<SL>::load(slopes[i_h * sslope]));
    float vv[4];
    #pragma unroll
    for (int j = 0; j < 4; ++j) vv[j] = Io<IO>::load(v[i_b * svb + i_h * svh + (e0 + j) * sve]);

    float4* s = reinterpret_cast<float4*>(state + (long long)i_bh * D * E + e0);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    #pragma unroll 4
    for (int d = r; d < D; d += ROWS) {
        const float kd = Io<IO>::load(k[i_b * skb + i_h * skh + d * skd]);
        const float qd = Io<IO>::load(q[i_b * sqb + i_h * sqh + d * sqd]);
        float4 x = s[(long long)d * (E / 4)];
        x.x = lam * x.x + kd * vv[0];
        x.y = lam * x.y + kd * vv[1];
        x.z = lam * x.z + kd * vv[2];
        x.w = lam * x.w + kd * vv[3];
        s[(long long)d * (E / 4)] = x;
        acc[0] += qd * x.x; acc[1] += qd * x.y; acc[2] += qd * x.z; acc[3] += qd * x.w;
    }
    #pragma unroll
    for (int j = 0; j < 4; ++j) partial[r][4 * c + j] = acc[j];
    __syncthreads();
    if (r == 0) {
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            float sum = 0.f;
            #pragma unroll
            for (int rr = 0; rr < ROWS; ++rr) sum += partial[rr][4 * c + j];
            o[(long long)i_bh * E + e0 + j] = Io<IO>::store(sum * scale);
        }
    }
}
"""

IO_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def available() -> bool:
    """Whether the CuPy backend can run here (CuPy installed and a CUDA device present)."""
    return cupy is not None and torch.cuda.is_available()


def valid_config(config: dict, D: int, E: int) -> bool:
    """BV a power of two in 4..E dividing E; ROWS a power of two; 32..1024 threads; the
    shared partial sums (ROWS * BV floats) within 48 KiB."""
    BV, ROWS = config.get("BV"), config.get("ROWS")
    if not (isinstance(BV, int) and isinstance(ROWS, int) and BV >= 4 and ROWS >= 1):
        return False
    threads = BV // 4 * ROWS
    return (BV & (BV - 1) == 0 and ROWS & (ROWS - 1) == 0 and BV <= E and E % BV == 0 and ROWS <= D
            and 32 <= threads <= 1024 and ROWS * BV * 4 <= 48 * 1024)


@functools.lru_cache(maxsize=None)
def _kernel(io: int, sl: int, H: int, D: int, E: int, BV: int, ROWS: int):
    name = f"lightning_decode_step<{io}, {sl}, {H}, {D}, {E}, {BV}, {ROWS}>"
    module = cupy.RawModule(code=SOURCE, options=("--std=c++17",), name_expressions=[name])
    return module.get_function(name)


@functools.lru_cache(maxsize=None)
def _stream(ptr: int, device: int):
    return cupy.cuda.ExternalStream(ptr, device)


def decode_step(q, k, v, o, slopes, state, scale: float, config: dict) -> None:
    """Launch one step; inputs already checked by :func:`lightning_decode` (o ``[B, H, E]``
    contiguous, state contiguous fp32, ``config`` valid for D, E)."""
    B, H, D = q.shape
    E = v.shape[-1]
    BV, ROWS = config["BV"], config["ROWS"]
    kernel = _kernel(IO_CODES[q.dtype], IO_CODES[slopes.dtype], H, D, E, BV, ROWS)
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    ptr = lambda t: np.uint64(t.data_ptr())  # noqa: E731
    stride = lambda t: [np.int64(s) for s in t.stride()]  # noqa: E731
    args = (ptr(q), ptr(k), ptr(v), ptr(o), ptr(slopes), ptr(state), np.float32(scale),
            *stride(q), *stride(k), *stride(v), np.int64(slopes.stride(0)))
    with cupy.cuda.Device(device), _stream(torch.cuda.current_stream(device).cuda_stream, device):
        kernel((E // BV, B * H), (BV // 4 * ROWS,), args)

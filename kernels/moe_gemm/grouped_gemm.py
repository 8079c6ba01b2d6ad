"""Grouped GEMM kernels: one launch multiplies every expert's rows by that expert's weights.

Rows are grouped by expert: group e owns rows ``[offsets[e-1], offsets[e])`` of A (``offsets``
int32 ``[E]`` of group ends, ``offsets[-1] == M``; groups may be empty).

Forward / dX kernel (:func:`_grouped_gemm_kernel`), ``C[rows of e] = A[rows of e] @ B[e]``
with ``B[e]`` a ``[K, N]`` view given by strides: ``w[e]`` for the forward, ``w[e]^T`` (the
strides of w's last two dims swapped) for dX = dY @ W^T. No copy, no transposed kernel.

- Tile schedule. The M tiles of all experts are numbered one after the other: expert e has
  ``cdiv(count_e, BLOCK_M)`` of them. Each program reads the E group ends (E int32 loads),
  forms the per-expert tile counts and their cumulative sum in registers, and finds its
  expert as the number of experts whose tiles end at or before its tile index: the
  tile -> expert map costs no extra launch and no host sync. The grid is
  ``cdiv(M, BLOCK_M) + E - 1`` virtual M tiles (a bound on the true count, since splitting
  M rows into E groups adds at most E - 1 partial tiles; capped at M) times the N tiles,
  in GROUP_M-swizzled order (the matmul tutorial's L2 grouping, over virtual M tiles); a
  program past the true count finds "expert E" and returns at once. A tile never straddles
  two experts, so it reads one expert's weights.
- Fused gather (``HAS_GATHER``): row p of A is ``a[a_rows[p]]``, so moe_ffn's first GEMM
  reads the tokens of x in expert order without materialising ``x[row_to_token]``.
- Epilogues (``EPILOGUE``, a constexpr string):
  ``"none"``: store the fp32 accumulator in C's dtype.
  ``"swiglu"``: the program keeps two accumulators, ``gate = A @ B[:, n]`` and
  ``up = A @ B[:, F + n]`` (B is ``[K, 2F]``, gate columns then up columns; the kernel's
  N is F) and stores ``silu(gate) * up``; with ``STORE_PREACT`` also gate and up (in C's
  dtype, ``aux [M, 2F]``) for the backward.
  ``"swiglu_bwd"``: the accumulator is dh = dY @ W_down^T; the epilogue loads gate and up
  from ``aux`` and stores ``dgate = dh * up * silu'(gate)`` at column n and ``dup = dh *
  silu(gate)`` at column F + n of C ``[M, 2F]``.

Expert flags (the flags transport of ``moe_ffn_ep``, ``kernels/a2a_overlap/flags_exchange.py``):
with ``ready`` (int32 ``[E]``) a program of expert e spins (``ld.acquire``) until
``ready[e] != 0`` before its first load, so one launch over all experts starts each expert
as soon as its rows have arrived; with ``done`` (int32 ``[E]``) every program, after its
stores and a CTA barrier, adds its tile's element count to ``done[e]`` (release), which so
reaches ``rows_e * N`` (the caller keeps that below 2**31) when expert e's rows of C are
written, for a stream to wait on.
Whoever sets ``ready`` must not need an SM (a copy engine, a stream memory op): spinning
programs may hold every SM, and must be queued BEFORE the launch (the host may block in a
launch, e.g. loading a module, until the device is idle).

dW kernel (:func:`_grouped_gemm_dw_kernel`), ``C[e] = A[rows of e]^T @ B[rows of e]``
(``[K, N]`` per expert): an output tile (expert, K tile, N tile) loops over its expert's
rows in chunks of BLOCK_M. An expert with no rows runs no iteration and stores zeros.
By default one program computes one tile. With ``PROGRAMS_PER_SM`` = k > 0, k programs per
SM loop over the tiles, and each finished tile leaves through an asynchronous TMA store, so
its write overlaps the program's next tile. On an H100 that was 3-4% faster at 16K tokens
and 16-25% slower at 4K (session 9 probe); the tuner chooses per bucket.
When A and B allow it (:func:`tma_loadable`: 16-bit, rows 16-byte aligned) each
expert's full steps load through TMA descriptors and only its last partial step through
masked pointers: 1.04-1.16x faster than masked pointer loads throughout. A's rows are
contiguous: gathering them in the kernel (row indices loaded in the loop) measured
1.2-1.8x slower than a gather copy followed by this kernel, so moe_ffn's backward copies
``x[row_to_token]`` first. (H100, MiniMax shapes; docs/perf-notes.md, session 6.)

Loads: 16-bit operands whose rows are 16-byte aligned (:func:`tma_loadable`) load through
TMA descriptors (forward / dX: A unless gathered, B when its tiles stay inside one expert's
K rows; dW: each expert's full row steps); the rest is masked pointer arithmetic. Row and
expert offsets are int64; accumulation is fp32; fp32 inputs use IEEE dots.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import _config
from kernels._tma import tensor_descriptor

KERNEL = "grouped_gemm"
KERNEL_DX = "grouped_gemm_dx"
KERNEL_DW = "grouped_gemm_dw"
# moe_ffn's gathered up projection + SwiGLU has its own configs: its A rows are gathered
# (pointer loads), so it prefers other tiles than the contiguous forward, whose A loads
# through TMA (H100, 16K tokens: 128 x 256 x 32 at 4 stages 13.0-13.5 ms vs 14.1 ms for
# the forward's 128 x 256 x 64 at 3; results/raw/swiglu_probe_h100.json).
KERNEL_SWIGLU = "grouped_gemm_swiglu"

# Defaults used when no tuned file applies. NOT measured (no GPU time when written): the
# first config of the Triton matmul tutorial's CUDA autotune list (128 x 256 x 64, GROUP_M 8,
# 8 warps, 3 stages), with BLOCK_M 64 when experts average 64 rows or fewer (1K tokens, top-2,
# 32 experts), where a 128-row tile would be mostly masked. Tune: `kwb tune grouped_gemm`.
DEFAULT_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
# dW: a [BLOCK_K, BLOCK_N] tile of dW[e] per program, reducing over rows BLOCK_M at a time.
# NOT measured either: the forward default's 128 x 256 output tile and 64-deep reduction chunk.
# PROGRAMS_PER_SM 0 launches one program per output tile; k > 0 launches k programs per SM
# that loop over the tiles (persistent, TMA stores). Files tuned before the field existed
# mean 0.
DEFAULT_DW_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_K": 8, "num_warps": 8, "num_stages": 3,
                     "PROGRAMS_PER_SM": 0}
CONFIG_FIELDS = tuple(DEFAULT_CONFIG)
DW_CONFIG_FIELDS = tuple(DEFAULT_DW_CONFIG)
EPILOGUES = ("none", "swiglu", "swiglu_bwd")


def default_config(E: int, M: int) -> dict:
    """The documented fallback of the forward and dX kernels for M rows over E experts."""
    return {**DEFAULT_CONFIG, "BLOCK_M": 64 if M <= 64 * E else 128}


def default_dw_config(E: int, M: int) -> dict:
    """The documented fallback of the dW kernel."""
    return dict(DEFAULT_DW_CONFIG)


def bucket_key(E: int, N: int, K: int, M: int, dtype: torch.dtype) -> dict:
    """Shape bucket of a launch computing ``[M, K] @ [K, N]`` per group: E, N, K, dtype, and
    the TOTAL row count M (all experts, T * top_k in moe_ffn) rounded up to a power of two.

    Keys name the product each kernel computes: for dX of ``y = x @ w``, N is w's K and K is
    w's N; for dW, K and N are w's. SwiGLU forward launches use the weight's N (2F).
    """
    return {"E": E, "N": N, "K": K, "dtype": str(dtype).removeprefix("torch."), "M": triton.next_power_of_2(max(M, 1))}


def _pow2_at_least_16(n: object) -> bool:
    return isinstance(n, int) and n >= 16 and n & (n - 1) == 0


def valid_config(config: dict, *, swiglu: bool = False) -> bool:
    """Whether a forward/dX config may launch: every block a power of two >= 16 (tl.dot's
    minimum tile), GROUP_M >= 1, num_warps a power of two, and num_stages >= 2 (triton 3.6
    miscompiled one stage for the lightning forward on an H100; see forward.valid_config).
    A SwiGLU launch halves BLOCK_N (two accumulators), so it needs BLOCK_N >= 32."""
    try:
        return (
            all(_pow2_at_least_16(config[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            and config["GROUP_M"] >= 1 and config["num_stages"] >= 2
            and config["num_warps"] >= 1 and config["num_warps"] & (config["num_warps"] - 1) == 0
            and (not swiglu or config["BLOCK_N"] >= 32)
        )
    except (KeyError, TypeError):
        return False


def valid_swiglu_config(config: dict) -> bool:
    """Whether a ``grouped_gemm_swiglu`` config may launch (:func:`valid_config` with swiglu)."""
    return valid_config(config, swiglu=True)


def valid_dw_config(config: dict) -> bool:
    """Whether a dW config may launch (the same rules; GROUP_K groups the K tiles;
    PROGRAMS_PER_SM, 0 if absent, is an int >= 0)."""
    try:
        persistent = config.get("PROGRAMS_PER_SM", 0)
        return (
            all(_pow2_at_least_16(config[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            and config["GROUP_K"] >= 1 and config["num_stages"] >= 2
            and config["num_warps"] >= 1 and config["num_warps"] & (config["num_warps"] - 1) == 0
            and isinstance(persistent, int) and persistent >= 0
        )
    except (KeyError, TypeError, AttributeError):
        return False


@triton.jit
def _grouped_gemm_kernel(
    a, b, c, offsets, a_rows, aux, a_desc, b_desc, ready, done,
    N, K, NUM_PID_M,
    stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_cm, stride_cn,
    stride_xm, stride_xn,
    NUM_EXPERTS: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_GATHER: tl.constexpr, EPILOGUE: tl.constexpr, STORE_PREACT: tl.constexpr,
    EVEN_K: tl.constexpr, TMA_A: tl.constexpr, TMA_B: tl.constexpr, B_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WAIT: tl.constexpr, SIGNAL: tl.constexpr, PTX: tl.constexpr,
):
    # GROUP_M-swizzled program order over (virtual M tile, N tile)
    pid = tl.program_id(0)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(NUM_PID_M - first_m, GROUP_M)
    i_m = first_m + (pid % num_in_group) % group_size
    i_n = (pid % num_in_group) // group_size

    # tile -> expert: per-expert tile counts from the group ends, their running sum
    o_e = tl.arange(0, E_POW2)
    m_e = o_e < NUM_EXPERTS
    ends = tl.load(offsets + o_e, mask=m_e, other=0)  # [EP]
    starts = tl.load(offsets + o_e - 1, mask=m_e & (o_e > 0), other=0)  # [EP]
    tiles = tl.where(m_e, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)  # [EP]
    tile_ends = tl.cumsum(tiles, axis=0)  # [EP]
    # the experts whose tiles all come before tile i_m are the ones before its expert i_e
    m_before = tile_ends <= i_m  # [EP]
    i_e = tl.sum(m_before.to(tl.int32))
    if i_e >= NUM_EXPERTS:
        return  # past the true tile count (the grid is an upper bound)
    tile_start = tl.sum(tl.where(m_before, tiles, 0))
    row_start = tl.load(offsets + i_e - 1, mask=i_e > 0, other=0)
    row_end = tl.load(offsets + i_e)
    if WAIT:  # expert i_e's rows of A are being delivered: wait for its flag
        flag = _load_acquire(ready + i_e, PTX)
        while flag == 0:
            flag = _load_acquire(ready + i_e, PTX)

    # this tile's rows of C (a slice of expert i_e's group) and the A rows they read
    o_m = row_start + (i_m - tile_start) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < row_end
    if HAS_GATHER:
        o_am = tl.load(a_rows + o_m, mask=m_m, other=0).to(tl.int64)  # [BM] fused gather
    else:
        o_am = o_m.to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_n = o_n < N
    o_k = tl.arange(0, BLOCK_K)  # [BK]

    p_a = a + o_am[:, None] * stride_am + o_k[None, :] * stride_ak  # [BM, BK]
    p_b = b + i_e.to(tl.int64) * stride_be + o_k[:, None] * stride_bk + o_n[None, :] * stride_bn  # [BK, BN]
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BM, BN]: gate under SwiGLU
    b_acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BM, BN]: up under SwiGLU, else unused

    # TMA loads (host-built descriptors; columns past the tensor arrive as zeros): A's tile
    # may run into the next expert's rows, which only feed output rows the store masks off;
    # B's descriptor is over the weights as [E * rows, cols], so a forward B tile must not
    # run past its expert's K rows (the host asks EVEN_K), while a dX tile (B_T: w[e]^T,
    # loaded [BN, BK] and transposed) that runs past them only feeds masked output columns.
    a_row = row_start + (i_m - tile_start) * BLOCK_M
    b_row = i_e * N + i_n * BLOCK_N if B_T else i_e * K

    # main loop over K
    for i_k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if not EVEN_K:
            m_k = i_k * BLOCK_K + o_k < K
        if TMA_A:
            b_a = a_desc.load([a_row, i_k * BLOCK_K])
        elif EVEN_K:
            b_a = tl.load(p_a, mask=m_m[:, None], other=0.0)
        else:
            b_a = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)
        if TMA_B:
            if B_T:
                b_b = tl.trans(b_desc.load([b_row, i_k * BLOCK_K]))
            else:
                b_b = b_desc.load([b_row + i_k * BLOCK_K, i_n * BLOCK_N])
        elif EVEN_K:
            b_b = tl.load(p_b, mask=m_n[None, :], other=0.0)
        else:
            b_b = tl.load(p_b, mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=DOT_PRECISION)
        if EPILOGUE == "swiglu":
            # the up columns sit F = N columns to the right of the gate columns
            if TMA_B:
                b_b2 = b_desc.load([b_row + i_k * BLOCK_K, N + i_n * BLOCK_N])
            elif EVEN_K:
                b_b2 = tl.load(p_b + N * stride_bn, mask=m_n[None, :], other=0.0)
            else:
                b_b2 = tl.load(p_b + N * stride_bn, mask=m_k[:, None] & m_n[None, :], other=0.0)
            b_acc2 = tl.dot(b_a, b_b2, b_acc2, input_precision=DOT_PRECISION)
        p_a += BLOCK_K * stride_ak
        p_b += BLOCK_K * stride_bk

    # epilogue
    m_c = m_m[:, None] & m_n[None, :]
    o_cm = o_m.to(tl.int64)[:, None]
    p_c = c + o_cm * stride_cm + o_n[None, :] * stride_cn  # [BM, BN]
    if EPILOGUE == "swiglu":
        if STORE_PREACT:
            p_x = aux + o_cm * stride_xm + o_n[None, :] * stride_xn
            tl.store(p_x, b_acc.to(aux.dtype.element_ty), mask=m_c)
            tl.store(p_x + N * stride_xn, b_acc2.to(aux.dtype.element_ty), mask=m_c)
        b_h = b_acc * tl.sigmoid(b_acc) * b_acc2  # silu(gate) * up, from the fp32 accumulators
        tl.store(p_c, b_h.to(c.dtype.element_ty), mask=m_c)
    elif EPILOGUE == "swiglu_bwd":
        p_x = aux + o_cm * stride_xm + o_n[None, :] * stride_xn
        b_g = tl.load(p_x, mask=m_c, other=0.0).to(tl.float32)
        b_u = tl.load(p_x + N * stride_xn, mask=m_c, other=0.0).to(tl.float32)
        b_s = tl.sigmoid(b_g)
        # d silu(g) / dg = s + g s (1 - s)
        tl.store(p_c, (b_acc * b_u * (b_s + b_g * b_s * (1.0 - b_s))).to(c.dtype.element_ty), mask=m_c)
        tl.store(p_c + N * stride_cn, (b_acc * b_g * b_s).to(c.dtype.element_ty), mask=m_c)
    else:
        tl.store(p_c, b_acc.to(c.dtype.element_ty), mask=m_c)
    if SIGNAL:  # count this tile's stored elements into expert i_e's counter, after every thread's stores
        tl.debug_barrier()
        rows = tl.minimum(row_end - (row_start + (i_m - tile_start) * BLOCK_M), BLOCK_M)
        cols = tl.minimum(N - i_n * BLOCK_N, BLOCK_N)
        tl.atomic_add(done + i_e, rows * cols, sem="release")


@triton.jit
def _load_acquire(p, PTX: tl.constexpr):
    """``*p`` (int32) with acquire semantics at GPU scope: a plain ``ld.acquire`` on the GPU (with
    an atomic read-modify-write spin plus the counters the two GEMMs took 1.02-1.06x their
    time without flags on H200s; with this load and the counters, within noise), an atomic
    elsewhere (the interpreter runs no PTX)."""
    if PTX:
        return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [p],
                                         dtype=tl.int32, is_pure=False, pack=1)
    else:
        return tl.atomic_add(p, 0, sem="acquire")


@triton.jit
def _dw_tile(
    a, b, a_desc, b_desc, c, c_desc, offsets, i_e, pid,
    N, K,
    stride_am, stride_ak,
    stride_bm, stride_bn,
    stride_ce, stride_ck, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
    USE_TMA: tl.constexpr, TMA_STORE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Output tile ``pid`` of expert ``i_e``: ``C[e][k tile, n tile]``, reducing over the expert's rows."""
    # GROUP_K-swizzled order over this expert's (K tile, N tile) output tiles
    num_pid_k = (K + BLOCK_K - 1) // BLOCK_K
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_in_group = GROUP_K * num_pid_n
    first_k = (pid // num_in_group) * GROUP_K
    group_size = tl.minimum(num_pid_k - first_k, GROUP_K)
    i_k = first_k + (pid % num_in_group) % group_size
    i_n = (pid % num_in_group) // group_size

    row_start = tl.load(offsets + i_e - 1, mask=i_e > 0, other=0)
    row_end = tl.load(offsets + i_e)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_k, m_n = o_k < K, o_n < N
    b_acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)  # [BK, BN]

    # reduce over the expert's rows, BLOCK_M at a time (no iteration for an empty expert).
    # With USE_TMA the expert's full BLOCK_M steps load through TMA descriptors (a_desc over
    # A [M, K], b_desc over B [M, N]; columns past K or N arrive as zeros) ...
    tma_steps = 0
    if USE_TMA:  # (a constexpr branch: without TMA the descriptors are None and never traced)
        tma_steps = (row_end - row_start) // BLOCK_M
        for i_m in range(0, tma_steps):
            row = row_start + i_m * BLOCK_M
            b_a = a_desc.load([row, i_k * BLOCK_K])  # [BM, BK]
            b_b = b_desc.load([row, i_n * BLOCK_N])  # [BM, BN]
            b_acc = tl.dot(tl.trans(b_a), b_b, b_acc, input_precision=DOT_PRECISION)
    # ... and the rest (every step without TMA, the last partial step with it) through masked
    # pointer loads, which stop at the expert's last row.
    for row in range(row_start + tma_steps * BLOCK_M, row_end, BLOCK_M):
        o_m = row + tl.arange(0, BLOCK_M)  # [BM]
        m_m = o_m < row_end
        o_am = o_m.to(tl.int64)
        b_at = tl.load(a + o_am[None, :] * stride_am + o_k[:, None] * stride_ak,
                       mask=m_k[:, None] & m_m[None, :], other=0.0)  # [BK, BM]: A rows, transposed
        b_b = tl.load(b + o_am[:, None] * stride_bm + o_n[None, :] * stride_bn,
                      mask=m_m[:, None] & m_n[None, :], other=0.0)  # [BM, BN]
        b_acc = tl.dot(b_at, b_b, b_acc, input_precision=DOT_PRECISION)

    if TMA_STORE:  # c_desc over C as [E * K, N]; K % BLOCK_K == 0 keeps the tile in expert i_e's rows
        c_desc.store([i_e * K + i_k * BLOCK_K, i_n * BLOCK_N], b_acc.to(c_desc.dtype))
    else:
        p_c = c + i_e.to(tl.int64) * stride_ce + o_k[:, None] * stride_ck + o_n[None, :] * stride_cn
        tl.store(p_c, b_acc.to(c.dtype.element_ty), mask=m_k[:, None] & m_n[None, :])


@triton.jit
def _grouped_gemm_dw_kernel(
    a, b, a_desc, b_desc, c, c_desc, offsets,
    N, K, NUM_EXPERTS, NUM_PROGRAMS,
    stride_am, stride_ak,
    stride_bm, stride_bn,
    stride_ce, stride_ck, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
    PERSISTENT: tl.constexpr, USE_TMA: tl.constexpr, TMA_STORE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    if PERSISTENT:
        # NUM_PROGRAMS programs (a few per SM) take output tiles p, p + NUM_PROGRAMS, ...,
        # numbered expert-major; a TMA store's global write overlaps the program's next tile
        tiles_per_expert = ((K + BLOCK_K - 1) // BLOCK_K) * ((N + BLOCK_N - 1) // BLOCK_N)
        for tile in range(tl.program_id(0), NUM_EXPERTS * tiles_per_expert, NUM_PROGRAMS):
            _dw_tile(a, b, a_desc, b_desc, c, c_desc, offsets, tile // tiles_per_expert, tile % tiles_per_expert,
                     N, K, stride_am, stride_ak, stride_bm, stride_bn, stride_ce, stride_ck, stride_cn,
                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_K, USE_TMA, TMA_STORE, DOT_PRECISION)
    else:  # one program per (output tile, expert)
        _dw_tile(a, b, a_desc, b_desc, c, c_desc, offsets, tl.program_id(1), tl.program_id(0),
                 N, K, stride_am, stride_ak, stride_bm, stride_bn, stride_ce, stride_ck, stride_cn,
                 BLOCK_M, BLOCK_N, BLOCK_K, GROUP_K, USE_TMA, TMA_STORE, DOT_PRECISION)


def tma_loadable(t: torch.Tensor) -> bool:
    """Whether the kernels here load the 2-D tensor ``t`` through a TMA descriptor (forward /
    dX operands and the weights as ``[E * rows, cols]``, dW's x and dy): a 16-bit dtype (fp32
    inputs are the IEEE checking path, not a fast one), unit column stride, rows and base
    16-byte aligned (the descriptor's rules)."""
    return (t.element_size() == 2 and t.stride(1) == 1 and (t.stride(0) * 2) % 16 == 0
            and t.data_ptr() % 16 == 0)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _resolve(kernel: str, key: dict, fallback: dict, config: dict | None, valid) -> dict:
    """An explicit config must be valid (ValueError); a looked-up one that is not is replaced
    by the fallback rather than launched."""
    if config is None:
        return _config.lookup_launchable(kernel, key, default=fallback, valid=valid, near=("M",))
    if not valid(config):
        raise ValueError(f"config {config} cannot launch {kernel} (see valid_config)")
    return config


def _launch(
    a: torch.Tensor, b_strides: tuple[int, int, int], b: torch.Tensor, c: torch.Tensor, offsets: torch.Tensor,
    N: int, K: int, config: dict, *, a_rows: torch.Tensor | None = None, epilogue: str = "none",
    aux: torch.Tensor | None = None, store_preact: bool = False, b_transposed: bool = False,
    ready: torch.Tensor | None = None, done: torch.Tensor | None = None,
) -> None:
    """One launch of :func:`_grouped_gemm_kernel` writing all M = c.shape[0] rows of c.
    ``b`` is the weight ``[E, R, C]``; ``b_transposed`` says the product reads ``w[e]^T``
    (dX), whose strides ``b_strides`` then are w's with the last two swapped. ``ready`` /
    ``done``: the expert flags (module docstring, "Expert flags")."""
    M, E = c.shape[0], offsets.shape[0]
    if M == 0 or N == 0:
        return
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    num_pid_m = min(triton.cdiv(M, BM) + E - 1, M)
    grid = (num_pid_m * triton.cdiv(N, BN),)
    x_strides = (aux.stride(0), aux.stride(1)) if aux is not None else (0, 0)
    tma_a = a_rows is None and tma_loadable(a)
    b_rows = _weight_rows(b)
    tma_b = b_rows is not None and tma_loadable(b_rows) and (b_transposed or K % BK == 0)
    a_desc = tensor_descriptor(a, [BM, BK]) if tma_a else None
    b_desc = tensor_descriptor(b_rows, [BN, BK] if b_transposed else [BK, BN]) if tma_b else None
    _grouped_gemm_kernel[grid](
        a, b, c, offsets, a_rows, aux, a_desc, b_desc, ready, done,
        N, K, num_pid_m,
        a.stride(0), a.stride(1),
        *b_strides,
        c.stride(0), c.stride(1),
        *x_strides,
        NUM_EXPERTS=E, E_POW2=triton.next_power_of_2(E),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=config["GROUP_M"],
        HAS_GATHER=a_rows is not None, EPILOGUE=epilogue, STORE_PREACT=store_preact,
        EVEN_K=K % BK == 0, TMA_A=tma_a, TMA_B=tma_b, B_T=b_transposed, DOT_PRECISION=_dot_precision(a.dtype),
        WAIT=ready is not None, SIGNAL=done is not None, PTX=a.is_cuda,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def _weight_rows(w: torch.Tensor) -> torch.Tensor | None:
    """The weights ``[E, R, C]`` as one ``[E * R, C]`` matrix (a view), or None when the
    experts' rows are not evenly spaced (then no descriptor spans them)."""
    E, R, C = w.shape
    if w.stride(2) != 1 or w.stride(0) != R * w.stride(1):
        return None
    return w.as_strided((E * R, C), (w.stride(1), 1))


def grouped_gemm_fwd(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, config: dict | None = None,
                     done: torch.Tensor | None = None) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]``: x ``[M, K]``, w ``[E, K, N]``, offsets int32
    ``[E]`` group ends -> y ``[M, N]`` in x's dtype. Inputs are assumed validated
    (``api.grouped_gemm`` checks them); any strides. ``config`` overrides the lookup.
    ``done``: int32 ``[E]`` counters that reach ``rows_e * N`` once expert e's rows are stored
    (module docstring, "Expert flags")."""
    M, K = x.shape
    E, _, N = w.shape
    key = bucket_key(E, N, K, M, x.dtype)
    config = _resolve(KERNEL, key, default_config(E, M), config, valid_config)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _launch(x, (w.stride(0), w.stride(1), w.stride(2)), w, y, offsets, N, K, config, done=done)
    return y


def grouped_gemm_dx(dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """``dx[rows of e] = dy[rows of e] @ w[e]^T``: dy ``[M, N]``, w ``[E, K, N]`` -> dx ``[M, K]``.
    The forward kernel on w's transposed strides; configs from ``grouped_gemm_dx``."""
    M, N = dy.shape
    E, K, _ = w.shape
    key = bucket_key(E, K, N, M, dy.dtype)  # the product is [M, N] @ [N, K]
    config = _resolve(KERNEL_DX, key, default_config(E, M), config, valid_config)
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device)
    _launch(dy, (w.stride(0), w.stride(2), w.stride(1)), w, dx, offsets, K, N, config, b_transposed=True)
    return dx


def grouped_gemm_dw(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """``dw[e] = x[rows of e]^T @ dy[rows of e]``: x ``[M, K]``, dy ``[M, N]`` -> dw
    ``[E, K, N]`` in dy's dtype; zeros for an expert without rows."""
    M, N = dy.shape
    K = x.shape[1]
    E = offsets.shape[0]
    key = bucket_key(E, N, K, M, dy.dtype)
    config = _resolve(KERNEL_DW, key, default_dw_config(E, M), config, valid_dw_config)
    dw = torch.empty(E, K, N, dtype=dy.dtype, device=dy.device)
    if E == 0 or K == 0 or N == 0:
        return dw
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    use_tma = M > 0 and tma_loadable(x) and tma_loadable(dy)
    a_desc = tensor_descriptor(x, [BM, BK]) if use_tma else None
    b_desc = tensor_descriptor(dy, [BM, BN]) if use_tma else None
    tiles_per_expert = triton.cdiv(K, BK) * triton.cdiv(N, BN)
    programs_per_sm = config.get("PROGRAMS_PER_SM", 0)
    if programs_per_sm:
        # persistent: a TMA store needs each [BK, BN] tile inside one expert's K rows of dW
        tma_store = use_tma and K % BK == 0 and tma_loadable(dw.view(E * K, N))
        num_programs = min(programs_per_sm * _multiprocessors(dw.device), E * tiles_per_expert)
        grid = (num_programs, 1)
    else:
        tma_store, num_programs = False, 0
        grid = (tiles_per_expert, E)
    c_desc = tensor_descriptor(dw.view(E * K, N), [BK, BN]) if tma_store else None
    _grouped_gemm_dw_kernel[grid](
        x, dy, a_desc, b_desc, dw, c_desc, offsets,
        N, K, E, num_programs,
        x.stride(0), x.stride(1),
        dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_K=config["GROUP_K"],
        PERSISTENT=programs_per_sm > 0, USE_TMA=use_tma, TMA_STORE=tma_store, DOT_PRECISION=_dot_precision(dy.dtype),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return dw


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; 3 elsewhere (the interpreter: an odd count spreads the tiles unevenly)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def _swiglu_config(config: dict) -> dict:
    """A SwiGLU launch keeps two [BLOCK_M, BLOCK_N/2] accumulators, the registers of one
    [BLOCK_M, BLOCK_N] tile, so the tuned config of the same N (2F) applies."""
    return {**config, "BLOCK_N": config["BLOCK_N"] // 2}


def gather_gemm_swiglu(
    x: torch.Tensor, w_gate_up: torch.Tensor, offsets: torch.Tensor, x_rows: torch.Tensor, *,
    store_preact: bool, config: dict | None = None, ready: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """moe_ffn's first GEMM: ``h[p] = silu(g) * u`` with ``[g, u] = x[x_rows[p]] @ w_gate_up[e]``
    for the rows p of expert e. x ``[T, Hd]``, w_gate_up ``[E, Hd, 2F]``, x_rows int32 ``[M]``,
    or None for x's rows as they are (M = T, A loaded without a gather).
    Returns h ``[M, F]`` and, if ``store_preact``, ``gu = [g, u]`` ``[M, 2F]`` (x's dtype).
    ``config`` (looked up in ``grouped_gemm_swiglu`` at N = 2F) tiles the [M, 2F] product;
    its BLOCK_N is halved here. ``ready``: int32 ``[E]`` flags; expert e's programs start once
    ``ready[e] != 0`` (module docstring, "Expert flags")."""
    M = x_rows.shape[0] if x_rows is not None else x.shape[0]
    K = x.shape[1]
    E, _, N2 = w_gate_up.shape
    F = N2 // 2
    key = bucket_key(E, N2, K, M, x.dtype)
    config = _swiglu_config(_resolve(KERNEL_SWIGLU, key, default_config(E, M), config, valid_swiglu_config))
    h = torch.empty(M, F, dtype=x.dtype, device=x.device)
    gu = torch.empty(M, N2, dtype=x.dtype, device=x.device) if store_preact else None
    w = w_gate_up
    _launch(x, (w.stride(0), w.stride(1), w.stride(2)), w, h, offsets, F, K, config,
            a_rows=x_rows, epilogue="swiglu", aux=gu, store_preact=store_preact, ready=ready)
    return h, gu


def gemm_swiglu_bwd(
    dy: torch.Tensor, w_down: torch.Tensor, offsets: torch.Tensor, gu: torch.Tensor, *, config: dict | None = None
) -> torch.Tensor:
    """moe_ffn's backward through the second GEMM and the SwiGLU: ``dh = dy @ w_down[e]^T``
    and, in the epilogue, ``dgu = [dh * u * silu'(g), dh * silu(g)]``. dy ``[M, Hd]``, w_down
    ``[E, F, Hd]``, gu ``[M, 2F]`` -> dgu ``[M, 2F]``. Configs from ``grouped_gemm_dx``."""
    M, Hd = dy.shape
    E, F, _ = w_down.shape
    key = bucket_key(E, F, Hd, M, dy.dtype)
    config = _resolve(KERNEL_DX, key, default_config(E, M), config, valid_config)
    dgu = torch.empty(M, 2 * F, dtype=dy.dtype, device=dy.device)
    w = w_down
    _launch(dy, (w.stride(0), w.stride(2), w.stride(1)), w, dgu, offsets, F, Hd, config,
            epilogue="swiglu_bwd", aux=gu, b_transposed=True)
    return dgu

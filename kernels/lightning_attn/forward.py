"""Lightning attention forward: one pass over q, k, v, no state written to HBM.

Decomposition. One program owns one (sequence, head, slice of E of width BV) and walks the
sequence chunk by chunk (BT tokens), carrying the fp32 state ``S [D, BV]`` in registers from
chunk to chunk. Nothing but o (and, if asked, the final state) is written. Splitting E keeps
the chunk loop sequential yet gives B*H*(E/BV) programs: at B=1, H=64, E=128 and BV=32 that
is 256 programs for 132 SMs. The E/BV programs of a head are adjacent in the grid, so they
walk the same q, k chunks at the same time and share them through L2.

Loads. Fixed-length 16-bit inputs whose heads are adjacent go through TMA descriptors over
``[B, T, H * D]`` (:func:`token_descriptor`): the copy engine fills the pipeline's buffers, rows
past T arrive as zeros (no masks), o leaves through an asynchronous TMA store, and the
registers the pointer tiles held are freed (on sm_90 223 instead of 255 registers, no spill).
Packed sequences (``cu_seqlens``), fp32 and other strides use masked pointer loads. Same
arithmetic either way: outputs are bitwise equal.

Per chunk (measured variants and their times are in docs/perf-notes.md), with rows i and columns j counted from the chunk start, n valid rows,
``lambda = exp(-slope)`` and S the state carried in::

    o_i   = scale * ( sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j   +   lambda^(i+1) q_i S )
    S_out = lambda^n S + sum_j lambda^(n-1-j) k_j^T v_j
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import _config
from kernels._tma import tensor_descriptor

KERNEL = "lightning_attn_fwd"

# Used when no tuned file applies (CPU, an untuned GPU, a far-off shape). BT=64, BV=64, 4 warps,
# 3 stages won at every benchmark shape (B=1 T=4K/16K/64K, B=8 T=4K; H=64, D=E=128, bf16) in
# a sweep of 72 configs on an H200 with pointer loads (triton 3.6; results/raw/sweep_v2_h200.ndjson).
# With TMA loads the H100 tune picks 4 stages for bf16 (kernels/configs); the default stays at 3,
# which also launches for fp32 pointer loads at D=E=128 on an H100 (4 stages was not tried there).
# BV shrinks to E for small E; 3 stages of q, k tiles do not fit in shared memory at D = 256.
DEFAULT_CONFIG = {"BT": 64, "BV": 64, "num_warps": 4, "num_stages": 3}


def default_config(D: int, E: int) -> dict:
    """The documented fallback config for head dims (D, E)."""
    return {**DEFAULT_CONFIG, "BV": min(DEFAULT_CONFIG["BV"], E), "num_stages": 3 if D <= 128 else 2}


CONFIG_FIELDS = tuple(DEFAULT_CONFIG)


@triton.jit
def sequence_and_decay(cu_seqlens, slopes, T, i_n, i_h, IS_VARLEN: tl.constexpr):
    """The prologue every lightning kernel shares: where sequence i_n starts (``bos``) and
    how long it is (``L``; packed sequences from ``cu_seqlens``), and head i_h's decay in
    log2 units (``lambda^m = exp2(-s * m)``)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = 0
        eos = T
    s = tl.load(slopes + i_h).to(tl.float32) * 1.4426950408889634
    return bos, eos - bos, s


@triton.jit(do_not_specialize=["T"])
def _lightning_fwd_kernel(
    q, k, v, o, q_desc, k_desc, v_desc, o_desc, slopes, h0, ht, cu_seqlens,
    T, scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr, OUTPUT_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L, s = sequence_and_decay(cu_seqlens, slopes, T, i_n, i_h, IS_VARLEN)

    # batch strides are 0 for packed sequences (one batch row, offsets from cu_seqlens)
    q_base = q + i_n.to(tl.int64) * stride_qb + bos * stride_qt + i_h * stride_qh
    k_base = k + i_n.to(tl.int64) * stride_kb + bos * stride_kt + i_h * stride_kh
    v_base = v + i_n.to(tl.int64) * stride_vb + bos * stride_vt + i_h * stride_vh
    o_base = o + i_n.to(tl.int64) * stride_ob + bos * stride_ot + i_h * stride_oh
    # the state slice S[:, i_v*BV : (i_v+1)*BV] of (sequence i_n, head i_h), row-major [D, E]
    p_state = (i_nh.to(tl.int64) * D * E + tl.arange(0, D)[:, None] * E
               + i_v * BV + tl.arange(0, BV)[None, :])

    b_s = tl.zeros([D, BV], dtype=tl.float32)  # [D, BV]
    if HAS_INITIAL_STATE:
        b_s += tl.load(h0 + p_state)

    o_i = tl.arange(0, BT)
    # intra-chunk decay lambda^(i-j) on and below the diagonal, 0 above
    diff = o_i[:, None] - o_i[None, :]
    m_intra = tl.where(diff >= 0, tl.exp2(-s * tl.maximum(diff, 0).to(tl.float32)), 0.0)  # [BT, BT]
    # decay of the carried-in state to row i: lambda^(i+1)
    d_q = tl.exp2(-s * (o_i + 1).to(tl.float32))  # [BT]

    o_d = tl.arange(0, D)
    o_e = i_v * BV + tl.arange(0, BV)
    # pointers to the first chunk; they advance by BT rows per chunk (64-bit pointer math)
    p_q = q_base + o_i[:, None] * stride_qt + o_d[None, :]  # [BT, D]
    p_kt = k_base + o_i[None, :] * stride_kt + o_d[:, None]  # [D, BT]
    p_v = v_base + o_i[:, None] * stride_vt + o_e[None, :]  # [BT, BV]
    p_o = o_base + o_i[:, None] * stride_ot + o_e[None, :]  # [BT, BV]

    for i_t in range(0, tl.cdiv(L, BT)):
        m_t = i_t * BT + o_i < L
        if USE_TMA:  # descriptors over [B, T, H * D]: rows past T arrive as zeros
            b_q = q_desc.load([i_n, i_t * BT, i_h * D]).reshape(BT, D)
            b_kt = tl.trans(k_desc.load([i_n, i_t * BT, i_h * D]).reshape(BT, D))
            b_v = v_desc.load([i_n, i_t * BT, i_h * E + i_v * BV]).reshape(BT, BV)
        else:
            b_q = tl.load(p_q, mask=m_t[:, None], other=0.0)  # [BT, D]
            b_kt = tl.load(p_kt, mask=m_t[None, :], other=0.0)  # [D, BT]
            b_v = tl.load(p_v, mask=m_t[:, None], other=0.0)  # [BT, BV]
        n = tl.minimum(L - i_t * BT, BT).to(tl.float32)

        # inter-chunk: the state carried in, decayed to each row (lambda^(i+1) folded into q)
        b_o = tl.dot((b_q * d_q[:, None]).to(b_q.dtype), b_s.to(b_q.dtype), input_precision=DOT_PRECISION)  # [BT, BV]
        # intra-chunk: causal q k^T with decay lambda^(i-j), applied to v, same accumulator
        b_a = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * m_intra  # [BT, BT]
        b_o = tl.dot(b_a.to(b_v.dtype), b_v, acc=b_o, input_precision=DOT_PRECISION)
        if USE_TMA:
            o_desc.store([i_n, i_t * BT, i_h * E + i_v * BV], (b_o * scale).to(o_desc.dtype).reshape(1, BT, BV))
        else:
            tl.store(p_o, (b_o * scale).to(p_o.dtype.element_ty), mask=m_t[:, None])

        # carry the state past this chunk: S = lambda^n S + sum_j lambda^(n-1-j) k_j^T v_j
        # (the decay goes on v's BT x BV rows, fewer than k's D x BT)
        d_k = tl.where(o_i < n, tl.exp2(-s * tl.maximum(n - 1 - o_i, 0)), 0.0)  # [BT]
        b_s = tl.dot(b_kt, (b_v * d_k[:, None]).to(b_v.dtype), acc=b_s * tl.exp2(-s * n),
                     input_precision=DOT_PRECISION)
        p_q += BT * stride_qt
        p_kt += BT * stride_kt
        p_v += BT * stride_vt
        p_o += BT * stride_ot

    if OUTPUT_FINAL_STATE:
        tl.store(ht + p_state, b_s)


def bucket_key(D: int, E: int, T: int, dtype: torch.dtype) -> dict:
    """Shape bucket the tuned configs are keyed by: head dims, dtype, T rounded up to 2^k."""
    return {"D": D, "E": E, "dtype": str(dtype).removeprefix("torch."), "T": triton.next_power_of_2(max(T, 1))}


def valid_config(config: dict, D: int, E: int) -> bool:
    """Whether a config may launch for head dims (D, E): BV divides E, dot tiles >= 16, and
    at least 2 pipeline stages. With num_stages=1, triton 3.6 on an H100 produced wrong
    outputs (BT=64 BV=32, 4 warps: rel. error 0.77; BV=16: NaN) or illegal shared-memory
    reads (8 warps, or BT=128 with BV <= 32); see docs/perf-notes.md."""
    return (
        16 <= config["BV"] <= E and E % config["BV"] == 0 and config["BT"] >= 16 and D >= 16
        and config["num_stages"] >= 2
    )


def _token_strides(x: torch.Tensor) -> tuple[int, int] | None:
    """Batch and token strides of ``x [B, T, H, D]`` seen as ``[B, T, H * D]`` (a size-1 dim
    gets the stride a contiguous tensor would have: it is never stepped), or None when that
    view is not a TMA descriptor's: heads not adjacent, or a stride that is not a positive
    multiple of 16 bytes (e.g. a batch expanded with stride 0)."""
    B, T, H, D = x.shape
    if x.stride(3) != 1 or (H > 1 and x.stride(2) != D):
        return None
    stride_t = x.stride(1) if T > 1 else H * D
    stride_b = x.stride(0) if B > 1 else T * stride_t
    if min(stride_t, stride_b) <= 0 or (stride_t * x.element_size()) % 16 or (stride_b * x.element_size()) % 16:
        return None
    return stride_b, stride_t


def tma_viewable(x: torch.Tensor) -> bool:
    """Whether ``x [B, T, H, D]`` can be read or written through a TMA descriptor over
    ``[B, T, H * D]`` (:func:`token_descriptor`): a 16-bit dtype (fp32 is the IEEE checking
    path), heads adjacent with a unit last stride, batch and token strides positive multiples
    of 16 bytes, and the base 16-byte aligned."""
    return x.element_size() == 2 and x.data_ptr() % 16 == 0 and _token_strides(x) is not None


def token_descriptor(x: torch.Tensor, width: int, BT: int) -> TensorDescriptor:
    """A TMA descriptor over a :func:`tma_viewable` ``x [B, T, H, D]`` seen as ``[B, T, H * D]``,
    blocks of ``[1, BT, width]``: one sequence's BT tokens of one head (or a width-wide slice of
    it). Rows past T load as zeros and are not stored, so a ragged last chunk needs no mask."""
    B, T, H, D = x.shape
    stride_b, stride_t = _token_strides(x)
    return tensor_descriptor(x, [1, BT, width], [B, T, H * D], [stride_b, stride_t, 1])


def lightning_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel on validated inputs (see ``api.lightning_attn``).

    ``config`` (BT, BV, num_warps, num_stages) overrides the tuned lookup; the autotuner
    passes candidates this way. Inputs need a unit last-dim stride; other strides are free.
    """
    B, T, H, D = q.shape
    E = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if config is None:
        config = _config.lookup_launchable(KERNEL, bucket_key(D, E, T, q.dtype), default=default_config(D, E),
                                           valid=lambda c: valid_config(c, D, E), near=("T",))
    elif not valid_config(config, D, E):
        raise ValueError(f"config {config} cannot launch for D={D}, E={E} (see valid_config)")
    BT, BV = config["BT"], config["BV"]

    o = torch.empty(B, T, H, E, dtype=q.dtype, device=q.device)
    final_state = torch.empty(N, H, D, E, dtype=torch.float32, device=q.device) if output_final_state else None
    if N == 0 or (cu_seqlens is None and T == 0):
        if final_state is not None:
            final_state.copy_(initial_state if initial_state is not None else torch.zeros_like(final_state))
        return o, final_state

    h0 = initial_state.float().contiguous() if initial_state is not None else None
    def strides(x: torch.Tensor) -> tuple[int, int, int]:
        return (0 if cu_seqlens is not None else x.stride(0), x.stride(1), x.stride(2))

    # fixed-length 16-bit inputs load through TMA (on an H100 1.11-1.20x the HBM floor at
    # T >= 4K against 1.38-1.49x with pointer loads; docs/perf-notes.md, session 9)
    use_tma = cu_seqlens is None and all(tma_viewable(x) for x in (q, k, v))
    descs = ([token_descriptor(q, D, BT), token_descriptor(k, D, BT), token_descriptor(v, BV, BT),
              token_descriptor(o, BV, BT)] if use_tma else [None] * 4)
    grid = (E // BV, N * H)
    _lightning_fwd_kernel[grid](
        q, k, v, o, *descs, slopes, h0, final_state, cu_seqlens,
        T, scale,
        *strides(q), *strides(k), *strides(v), *strides(o),
        H=H, D=D, E=E, BT=BT, BV=BV,
        HAS_INITIAL_STATE=h0 is not None,
        OUTPUT_FINAL_STATE=final_state is not None,
        IS_VARLEN=cu_seqlens is not None, USE_TMA=use_tma,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return o, final_state

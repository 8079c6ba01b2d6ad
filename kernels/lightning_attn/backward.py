"""Lightning attention backward: three passes, no per-chunk state stored anywhere.

The gradients (per head, ``lambda = exp(-slope)``, ``do`` the gradient of o, ``dht`` that of
the final state S_T, or 0). Let ``dS_t`` be the gradient wrt the state S_t::

    dS_T = scale q_T^T do_T + dht          dS_t = lambda dS_{t+1} + scale q_t^T do_t
    dq_t = scale do_t S_t^T                 (S_t the forward state, [D, E])
    dk_t = v_t dS_t^T                       dv_t = k_t dS_t
    dh0  = lambda dS_1                      (gradient wrt initial_state)

Written out, each gradient is a decayed causal linear attention of its own::

    dq_t = scale ( sum_{s<=t} lambda^(t-s) (do_t . v_s) k_s   +  lambda^t do_t h0^T )
    dv_t = scale   sum_{s>=t} lambda^(s-t) (k_t . q_s) do_s   +  lambda^(T-t) k_t dht
    dk_t = scale   sum_{s>=t} lambda^(s-t) (v_t . do_s) q_s   +  lambda^(T-t) v_t dht^T

Decomposition (host :func:`lightning_attn_bwd`):

1. ``dq`` IS the forward of ``(q, k, v) -> (do, v, k)`` with initial state ``h0^T``: the
   forward kernel (``forward._lightning_fwd_kernel``) runs unchanged, one program per
   (sequence, head, slice of D), recomputing S chunk by chunk in registers.
   Reads do, v, k; writes dq.
2. ``dv`` and ``dk`` are the same pass walking the chunks backwards, :func:`_lightning_bwd_kernel`,
   run twice with roles ``(a, b, c) = (k, q, do)`` for dv (program per slice of E, carried
   state ``dS [D, BV]``) and ``(v, do, q)`` for dk (program per slice of D, carried state
   ``dS^T [E, BV]``). Each starts from dht (read transposed for dk) and its last carried
   state is dh0, written by the dv pass. Reads 3 of q, k, v, do; writes dv or dk.

Loads as in the forward: TMA descriptors over ``[B, T, H * width]`` for fixed-length 16-bit
inputs (``forward.token_descriptor``; rows past T arrive as zeros), masked pointer loads for
packed sequences, fp32 and other strides.

Bytes: 9 tensor reads + 3 writes, against the floor of 4 reads (q, k, v, do) + 3 writes.
A fused dk+dv pass would read 4 and write 2, but it must carry the whole ``[D, E]`` state
per (sequence, head) (no split, B*H programs) or sum dk over E-slices; which wins is a GPU
question (issue 4). The two states are never stored: memory beyond the inputs is dq, dk, dv
and the ``[N, H, D, E]`` fp32 dh0 / transposed h0 / dht.

Within one chunk of n valid rows (i, j from the chunk start) and the state R carried in from
the later chunks (R = gradient arriving at the chunk's last state from outside it)::

    out_i = lambda^(n-1-i) a_i R  +  scale sum_{j>=i} lambda^(j-i) (a_i . b_j) c_j
    R    <- lambda^n R  +  scale sum_j lambda^(j+1) b_j^T c_j
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _config
from kernels.lightning_attn import forward
from kernels.lightning_attn.forward import sequence_and_decay

KERNEL = "lightning_attn_bwd"

# Used when no tuned file applies: the forward's default (BT=64, BV=64, 4 warps, 3 stages; see
# forward.DEFAULT_CONFIG), whose loop has the same loads and dots. On an H100 the tuner's local
# search kept that tile and picked 4 stages with TMA loads (kernels/configs).
DEFAULT_CONFIG = dict(forward.DEFAULT_CONFIG)
CONFIG_FIELDS = tuple(DEFAULT_CONFIG)


def default_config(D: int, E: int) -> dict:
    """The documented fallback config for head dims (D, E); BV is clipped per pass."""
    return {**DEFAULT_CONFIG, "num_stages": 3 if max(D, E) <= 128 else 2}


def pass_config(config: dict, width: int) -> dict:
    """The config one pass launches with: BV clipped to the width of the slice it splits."""
    return {**config, "BV": min(config["BV"], width)}


def valid_config(config: dict, D: int, E: int) -> bool:
    """Whether ``config`` may launch all three passes: dot tiles >= 16, BV (clipped to D and
    to E) divides them, and num_stages >= 2 (one stage miscompiled the forward's loop under
    triton 3.6 on an H100; the passes here have the same loop; see forward.valid_config)."""
    return all(forward.valid_config(pass_config(config, w), d, w) for d, w in ((E, D), (D, E)))


bucket_key = forward.bucket_key


@triton.jit(do_not_specialize=["T"])
def _lightning_bwd_kernel(
    a, b, c, out, a_desc, b_desc, c_desc, out_desc, slopes, dht, dh0, cu_seqlens,
    T, scale,
    stride_ab, stride_at, stride_ah,
    stride_bb, stride_bt, stride_bh,
    stride_cb, stride_ct, stride_ch,
    stride_ob, stride_ot, stride_oh,
    stride_ra, stride_rc,
    H: tl.constexpr, A: tl.constexpr, C: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr,
    HAS_FINAL_STATE_GRAD: tl.constexpr, OUTPUT_STATE_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Reverse-time pass: ``out[t] = sum_{s>=t} scale lambda^(s-t) (a_t . b_s) c_s + lambda^(L-t) a_t R_0``.

    a, b: ``[*, A]`` rows; c, out: ``[*, C]`` rows, this program owning columns
    ``[i_c*BV, (i_c+1)*BV)`` of C. The carried state R is ``[A, C]``; element (x, y) of the
    (sequence, head) block of dht / dh0 (contiguous fp32, A*C per block) sits at
    ``x*stride_ra + y*stride_rc``, so dk's pass reads dht transposed.
    """
    i_c, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L, s = sequence_and_decay(cu_seqlens, slopes, T, i_n, i_h, IS_VARLEN)

    o_i = tl.arange(0, BT)
    o_a = tl.arange(0, A)
    o_c = i_c * BV + tl.arange(0, BV)
    # the state slice R[:, i_c*BV : (i_c+1)*BV] of (sequence i_n, head i_h)
    p_state = i_nh.to(tl.int64) * A * C + o_a[:, None] * stride_ra + o_c[None, :] * stride_rc  # [A, BV]

    b_r = tl.zeros([A, BV], dtype=tl.float32)  # [A, BV]
    if HAS_FINAL_STATE_GRAD:
        b_r += tl.load(dht + p_state)

    # intra-chunk decay lambda^(j-i) on and above the diagonal (later tokens j), 0 below; scale folded in
    diff = o_i[None, :] - o_i[:, None]
    m_intra = tl.where(diff >= 0, tl.exp2(-s * tl.maximum(diff, 0).to(tl.float32)), 0.0) * scale  # [BT, BT]
    # decay of row j's contribution to the state carried out of the chunk's start: lambda^(j+1); scale folded in
    d_b = tl.exp2(-s * (o_i + 1).to(tl.float32)) * scale  # [BT]

    # pointers to the LAST chunk (start row (NT-1)*BT); they step back BT rows per chunk (64-bit pointer math)
    NT = tl.cdiv(L, BT)
    last = ((NT - 1) * BT).to(tl.int64)
    p_a = a + i_n.to(tl.int64) * stride_ab + (bos + last) * stride_at + i_h * stride_ah \
        + o_i[:, None] * stride_at + o_a[None, :]  # [BT, A]
    p_bt = b + i_n.to(tl.int64) * stride_bb + (bos + last) * stride_bt + i_h * stride_bh \
        + o_i[None, :] * stride_bt + o_a[:, None]  # [A, BT]
    p_c = c + i_n.to(tl.int64) * stride_cb + (bos + last) * stride_ct + i_h * stride_ch \
        + o_i[:, None] * stride_ct + o_c[None, :]  # [BT, BV]
    p_o = out + i_n.to(tl.int64) * stride_ob + (bos + last) * stride_ot + i_h * stride_oh \
        + o_i[:, None] * stride_ot + o_c[None, :]  # [BT, BV]

    for i_t in range(0, NT):
        start = (NT - 1 - i_t) * BT
        m_t = start + o_i < L
        if USE_TMA:  # descriptors over [B, T, H * width]: rows past T arrive as zeros
            b_a = a_desc.load([i_n, start, i_h * A]).reshape(BT, A)
            b_bt = tl.trans(b_desc.load([i_n, start, i_h * A]).reshape(BT, A))
            b_c = c_desc.load([i_n, start, i_h * C + i_c * BV]).reshape(BT, BV)
        else:
            b_a = tl.load(p_a, mask=m_t[:, None], other=0.0)  # [BT, A]
            b_bt = tl.load(p_bt, mask=m_t[None, :], other=0.0)  # [A, BT]
            b_c = tl.load(p_c, mask=m_t[:, None], other=0.0)  # [BT, BV]
        n = tl.minimum(L - start, BT).to(tl.float32)

        # from the later chunks: the carried state, decayed back to row i by lambda^(n-1-i)
        d_a = tl.where(o_i < n, tl.exp2(-s * tl.maximum(n - 1 - o_i, 0)), 0.0)  # [BT]
        b_o = tl.dot((b_a * d_a[:, None]).to(b_a.dtype), b_r.to(b_a.dtype), input_precision=DOT_PRECISION)  # [BT, BV]
        # intra-chunk: anti-causal a b^T with decay lambda^(j-i), applied to c, same accumulator
        b_s = tl.dot(b_a, b_bt, input_precision=DOT_PRECISION) * m_intra  # [BT, BT]
        b_o = tl.dot(b_s.to(b_c.dtype), b_c, acc=b_o, input_precision=DOT_PRECISION)
        if USE_TMA:
            out_desc.store([i_n, start, i_h * C + i_c * BV], b_o.to(out_desc.dtype).reshape(1, BT, BV))
        else:
            tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_t[:, None])

        # carry the state back past this chunk: R = lambda^n R + scale sum_j lambda^(j+1) b_j^T c_j
        b_r = tl.dot(b_bt, (b_c * d_b[:, None]).to(b_c.dtype), acc=b_r * tl.exp2(-s * n),
                     input_precision=DOT_PRECISION)
        p_a -= BT * stride_at
        p_bt -= BT * stride_bt
        p_c -= BT * stride_ct
        p_o -= BT * stride_ot

    if OUTPUT_STATE_GRAD:
        tl.store(dh0 + p_state, b_r)


def _launch_reverse(a, b, c, out, slopes, scale, dht, dh0, cu_seqlens, transposed_state, config):
    """One reverse pass (see :func:`_lightning_bwd_kernel`), out[..., :C] split in BV slices."""
    B, T, H, A = a.shape
    C = c.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BV = config["BV"]
    # the [N, H, D, E] state seen as [A, C]: dv's pass has (A, C) = (D, E), dk's (E, D)
    stride_ra, stride_rc = (1, A) if transposed_state else (C, 1)

    def strides(x: torch.Tensor) -> tuple[int, int, int]:
        return (0 if cu_seqlens is not None else x.stride(0), x.stride(1), x.stride(2))

    BT = config["BT"]
    use_tma = cu_seqlens is None and all(forward.tma_viewable(x) for x in (a, b, c, out))
    descs = ([forward.token_descriptor(a, A, BT), forward.token_descriptor(b, A, BT),
              forward.token_descriptor(c, BV, BT), forward.token_descriptor(out, BV, BT)] if use_tma else [None] * 4)
    _lightning_bwd_kernel[(C // BV, N * H)](
        a, b, c, out, *descs, slopes, dht, dh0, cu_seqlens,
        T, scale,
        *strides(a), *strides(b), *strides(c), *strides(out),
        stride_ra, stride_rc,
        H=H, A=A, C=C, BT=BT, BV=BV,
        HAS_FINAL_STATE_GRAD=dht is not None,
        OUTPUT_STATE_GRAD=dh0 is not None,
        IS_VARLEN=cu_seqlens is not None, USE_TMA=use_tma,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )


def lightning_attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    do: torch.Tensor | None,
    dht: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    config: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dq, dk, dv, dh0)`` of lightning attention, on the forward's validated inputs.

    Args:
        q, k, v, slopes, scale, initial_state, cu_seqlens: as given to :func:`lightning_attn_fwd`
            (q, k, v with unit last stride, slopes float32 contiguous).
        do: gradient of o ``[B, T, H, E]`` (any strides), or None for zero.
        dht: gradient of the final state ``[N, H, D, E]``, or None for zero.
        needs: which of (dq, dk, dv, dh0) to compute; the others come back None. dh0 is also
            None without an initial state.
        config: BT, BV, num_warps, num_stages for all three passes (BV clipped to the width of
            each pass's slice); overrides the tuned lookup. The autotuner passes candidates this way.

    Returns:
        dq, dk, dv in the dtype of q; dh0 ``[N, H, D, E]`` in initial_state's dtype.
    """
    B, T, H, D = q.shape
    E = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    need_dq, need_dk, need_dv, need_dh0 = needs
    need_dh0 = need_dh0 and initial_state is not None
    if config is None:
        config = _config.lookup_launchable(KERNEL, bucket_key(D, E, T, q.dtype), default=default_config(D, E),
                                           valid=lambda c: valid_config(c, D, E), near=("T",))
    elif not valid_config(config, D, E):
        raise ValueError(f"config {config} cannot launch for D={D}, E={E} (see valid_config)")

    if do is None:  # only the final state was used downstream
        do = torch.zeros(B, T, H, E, dtype=q.dtype, device=q.device)
    elif do.stride(-1) != 1:
        do = do.contiguous()
    do = do.to(q.dtype)
    if dht is not None:
        dht = dht.to(torch.float32).contiguous()

    dq = dk = dv = dh0 = None
    if N == 0 or T == 0:  # every sequence is empty: the state gradient passes straight through
        def empty(width: int, needed: bool) -> torch.Tensor | None:
            return torch.zeros(B, T, H, width, dtype=q.dtype, device=q.device) if needed else None

        if need_dh0:
            dh0 = (dht if dht is not None else torch.zeros(N, H, D, E, device=q.device)).to(initial_state.dtype)
        return empty(D, need_dq), empty(D, need_dk), empty(E, need_dv), dh0

    if need_dq:
        # dq = forward of (do, v, k) with initial state h0^T [N, H, E, D]
        h0_t = initial_state.to(torch.float32).transpose(-1, -2).contiguous() if initial_state is not None else None
        dq, _ = forward.lightning_attn_fwd(do, v, k, slopes, scale, h0_t, False, cu_seqlens,
                                           config=pass_config(config, D))
    if need_dv or need_dh0:
        dv = torch.empty(B, T, H, E, dtype=q.dtype, device=q.device)
        dh0_32 = torch.empty(N, H, D, E, dtype=torch.float32, device=q.device) if need_dh0 else None
        _launch_reverse(k, q, do, dv, slopes, scale, dht, dh0_32, cu_seqlens, False, pass_config(config, E))
        if need_dh0:
            dh0 = dh0_32.to(initial_state.dtype)
        if not need_dv:
            dv = None
    if need_dk:
        dk = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
        _launch_reverse(v, do, q, dk, slopes, scale, dht, None, cu_seqlens, True, pass_config(config, D))
    return dq, dk, dv, dh0

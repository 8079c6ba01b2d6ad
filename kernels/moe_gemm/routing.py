"""Routing for the MoE FFN: top-k on the router's softmax, the permutation that groups the
T*k token copies by expert, and the weighted combine back to token order.

Index arrays (a "copy" is one (token t, slot j) pair, numbered ``c = t * k + j``; a "row" is
a position in the expert-sorted order the grouped GEMMs read; ``M = T * k``):

    experts      [T, k] int64   expert of copy (t, j); slot j holds the j-th largest probability
    weights      [T, k] fp32    the k probabilities renormalised to sum to 1 (differentiable)
    row_to_copy  [M]    int64   copy held by row p: a stable sort of ``experts.flatten()``,
                                so rows are grouped by expert and ascending in token within one
    row_to_token [M]    int32   ``row_to_copy // k``: the row of x that row p gathers
    copy_to_row  [T, k] int32   the inverse permutation: row of copy (t, j)
    counts       [E]    int32   rows of each expert
    offsets      [E]    int32   group ends, ``cumsum(counts)``: expert e owns rows
                                ``[offsets[e-1], offsets[e])`` (``offsets[-1] == M``)

Three Triton launches after torch's softmax, deterministic, no atomics, no host sync (a chain
of ~20 torch ops took about 1 ms of host time per call before, with the GPU idle behind it):

- top-k (:func:`_topk_kernel`): per token, k rounds of "largest probability, lowest id among
  equals" (what a stable descending sort keeps), and the renormalised weights;
- grouping (:func:`_group`, a stable counting sort): one program per block of copies counts
  each expert's copies in its block; then each block places its copies at
  ``start of the expert + the expert's copies in earlier blocks + those earlier in this
  block`` (a running sum over the block's one-hot tile), so rows of one expert stay in copy
  (= token) order; the first block writes counts and offsets.

The combine ``out[t] = sum_j weights[t, j] * y[copy_to_row[t, j]]`` is a Triton kernel
(:func:`combine`) that sums the k copies of a token in slot order in fp32, so the result is
deterministic (no atomics). Its backward (:func:`combine_bwd`) writes ``dy[copy_to_row[t, j]]
= weights[t, j] * dout[t]`` (every row exactly once) and ``dweights[t, j] = dout[t] .
y[copy_to_row[t, j]]`` in one pass over dout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Not tuned (memory-bound gathers; no GPU time when written): 32 tokens x 128 features per
# program, 4 warps. The backward walks the features of its 32 tokens in chunks of 128.
COMBINE_CONFIG = {"BLOCK_T": 32, "BLOCK_H": 128, "num_warps": 4}


@dataclass(frozen=True)
class Routing:
    """The routing of T tokens to k of E experts (see the module docstring for each array)."""

    weights: torch.Tensor  # [T, k] float32, differentiable in the router logits
    experts: torch.Tensor  # [T, k] int64
    row_to_copy: torch.Tensor  # [M] int64
    row_to_token: torch.Tensor  # [M] int32
    copy_to_row: torch.Tensor  # [T, k] int32
    counts: torch.Tensor  # [E] int32
    offsets: torch.Tensor  # [E] int32

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.offsets.shape[0]


# Ids x experts of the one-hot tile a grouping or top-k program holds (blocks are sized so
# that BLOCK * next_pow2(E) is this; 8192 int32 is 64 registers a thread at 4 warps).
_TILE = 8192


@triton.jit
def _topk_kernel(probs, experts, weights, T, E, stride_t, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                 E_POW2: tl.constexpr):
    """experts[t, j]: the j-th largest of probs[t, :] (ties: the lower id; NaN first, as a
    descending sort puts it); weights[t, j] = probs[t, experts[t, j]] / (sum of the k chosen)."""
    o_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_e = tl.arange(0, E_POW2)
    b_p = tl.load(probs + o_t.to(tl.int64)[:, None] * stride_t + o_e[None, :],
                  mask=m_t[:, None] & (o_e < E)[None, :], other=-1.0)  # [BT, EP]; padding below every p >= 0
    b_key = tl.where(b_p != b_p, float("inf"), b_p)
    # two passes over the same selection: the sum of the chosen, then each one over it
    b_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    for i_pass in tl.static_range(2):
        b_left = b_key
        for j in tl.static_range(TOP_K):
            b_best = tl.max(b_left, axis=1)  # [BT]
            b_idx = tl.min(tl.where(b_left == b_best[:, None], o_e[None, :], E_POW2), axis=1)  # lowest id among equals
            b_hit = o_e[None, :] == b_idx[:, None]  # [BT, EP]
            b_top = tl.sum(tl.where(b_hit, b_p, 0.0), axis=1)  # [BT]
            if i_pass == 0:
                b_sum += b_top
            else:
                tl.store(experts + o_t * TOP_K + j, b_idx.to(tl.int64), mask=m_t)
                # IEEE division (Triton's `/` is approximate on GPUs): top-1's p / p is exactly 1
                tl.store(weights + o_t * TOP_K + j, tl.math.div_rn(b_top, b_sum), mask=m_t)
            b_left = tl.where(b_hit, -2.0, b_left)  # taken: below the padding


@triton.jit
def _block_histogram_kernel(ids, hist, M, E, BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    """hist[b, e]: the ids equal to e among ids[b*BLOCK : (b+1)*BLOCK]."""
    i_b = tl.program_id(0)
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    o_e = tl.arange(0, E_POW2)
    b_id = tl.load(ids + o, mask=o < M, other=E_POW2)  # [B]; padding matches no group
    b_hot = (b_id[:, None] == o_e[None, :]).to(tl.int32)  # [B, EP]
    tl.store(hist + i_b * E + o_e, tl.sum(b_hot, axis=0), mask=o_e < E)


@triton.jit
def _group_scatter_kernel(ids, hist, order, inverse, ends, counts, order_div, M, E, NUM_BLOCKS,
                          DIV: tl.constexpr, BLOCK: tl.constexpr, E_POW2: tl.constexpr, HIST_ROWS: tl.constexpr):
    """A stable counting sort, block b's part: id i (group e) goes to row
    ``ends[e-1] + (ids of group e in blocks before b) + (ids of group e before i in block b)``:
    ``inverse[i] = row``, ``order[row] = i`` (and ``order_div[row] = i // DIV``). Block 0
    also writes the group ends and counts."""
    i_b = tl.program_id(0)
    o_e = tl.arange(0, E_POW2)
    m_e = o_e < E
    # every block's histogram: the groups' totals, and the ids of each group in earlier blocks
    b_total = tl.zeros([E_POW2], dtype=tl.int32)
    b_before = tl.zeros([E_POW2], dtype=tl.int32)
    for b0 in range(0, NUM_BLOCKS, HIST_ROWS):
        o_b = b0 + tl.arange(0, HIST_ROWS)
        b_h = tl.load(hist + o_b[:, None] * E + o_e[None, :], mask=(o_b < NUM_BLOCKS)[:, None] & m_e[None, :], other=0)
        b_total += tl.sum(b_h, axis=0)
        b_before += tl.sum(tl.where((o_b < i_b)[:, None], b_h, 0), axis=0)
    b_end = tl.cumsum(b_total, axis=0)  # [EP] group ends
    b_base = b_end - b_total + b_before  # [EP] this block's first row of each group
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    m = o < M
    b_id = tl.load(ids + o, mask=m, other=E_POW2)
    b_hot = (b_id[:, None] == o_e[None, :]).to(tl.int32)  # [B, EP]
    b_rank = tl.cumsum(b_hot, axis=0) - b_hot  # earlier ids of the same group in this block
    b_row = tl.sum(b_hot * (b_rank + b_base[None, :]), axis=1)  # [B]
    tl.store(inverse + o, b_row, mask=m)
    tl.store(order + b_row, o.to(tl.int64), mask=m)
    if DIV > 0:
        tl.store(order_div + b_row, o // DIV, mask=m)
    if i_b == 0:
        tl.store(ends + o_e, b_end, mask=m_e)
        tl.store(counts + o_e, b_total, mask=m_e)


def _group(ids: torch.Tensor, E: int, divide: int = 0):
    """Stable grouping of ``ids [M]`` (ints in [0, E)): ``(order int64, inverse int32, ends
    int32, counts int32, order // divide int32 or None)``. Two launches (block histograms,
    then the scatter), no host sync."""
    M, dev = ids.shape[0], ids.device
    order = torch.empty(M, dtype=torch.int64, device=dev)
    inverse = torch.empty(M, dtype=torch.int32, device=dev)
    order_div = torch.empty(M, dtype=torch.int32, device=dev) if divide else None
    if M == 0:
        zeros = torch.zeros(E, dtype=torch.int32, device=dev)
        return order, inverse, zeros, zeros.clone(), order_div
    E_POW2 = triton.next_power_of_2(E)
    block = min(max(16, _TILE // E_POW2), triton.next_power_of_2(M))
    num_blocks = triton.cdiv(M, block)
    ints = torch.empty(num_blocks * E + 2 * E, dtype=torch.int32, device=dev)  # [hist | ends | counts]
    hist, ends, counts = ints[:num_blocks * E], ints[num_blocks * E:-E], ints[-E:]
    _block_histogram_kernel[(num_blocks,)](ids, hist, M, E, BLOCK=block, E_POW2=E_POW2)
    _group_scatter_kernel[(num_blocks,)](
        ids, hist, order, inverse, ends, counts, order_div, M, E, num_blocks,
        DIV=divide, BLOCK=block, E_POW2=E_POW2, HIST_ROWS=max(1, _TILE // E_POW2),
    )
    return order, inverse, ends, counts, order_div


def group_by_expert(ids: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows' expert ids ``[M]`` (int, in [0, E)) -> ``(order, inverse, ends)`` on ids' device:
    ``order`` (int64) lists the rows grouped by expert (a stable sort: rows of one expert keep
    their order), ``inverse[order[i]] = i`` (int64), ``ends[e]`` (int32) the end of expert e's
    rows in that order. A counting sort in two launches (:func:`_group`)."""
    order, inverse, ends, _, _ = _group(ids.contiguous(), E)
    return order, inverse.long(), ends


def group_received(counts: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`group_by_expert` of rows received from W sources, source-major (as an all-to-all
    delivers them), each source's block sorted by expert: ``counts [W, E]`` (int, any device)
    the rows source s sent expert e. ``rows`` (their total, if known) spares a host sync."""
    W, E = counts.shape
    ids = torch.repeat_interleave(torch.arange(E, device=counts.device).repeat(W), counts.reshape(-1), output_size=rows)
    return group_by_expert(ids, E)


class _TopK(torch.autograd.Function):
    """probs ``[T, E]`` (fp32) -> (experts ``[T, k]`` int64, weights ``[T, k]`` fp32) by
    :func:`_topk_kernel`; differentiable in probs through the weights: with ``S`` the sum of
    the chosen probabilities, ``dprobs[t, experts[t, j]] = (dw[t, j] - sum_i dw[t, i] *
    weights[t, i]) / S`` and 0 elsewhere (exactly 0 for k = 1, where every weight is 1)."""

    @staticmethod
    def forward(ctx, probs, top_k):
        T, E = probs.shape
        experts = torch.empty(T, top_k, dtype=torch.int64, device=probs.device)
        weights = torch.empty(T, top_k, dtype=torch.float32, device=probs.device)
        if T:
            E_POW2 = triton.next_power_of_2(E)
            block_t = min(max(1, _TILE // E_POW2), triton.next_power_of_2(T))
            _topk_kernel[(triton.cdiv(T, block_t),)](probs, experts, weights, T, E, probs.stride(0),
                                                     TOP_K=top_k, BLOCK_T=block_t, E_POW2=E_POW2)
        ctx.mark_non_differentiable(experts)
        ctx.save_for_backward(probs, experts, weights)
        return experts, weights

    @staticmethod
    def backward(ctx, _, dw):
        probs, experts, weights = ctx.saved_tensors
        total = probs.gather(1, experts).sum(dim=-1, keepdim=True)
        dtop = (dw - (dw * weights).sum(dim=-1, keepdim=True)) / total
        return torch.zeros_like(probs).scatter_(1, experts, dtop), None


def route(router_logits: torch.Tensor, top_k: int) -> Routing:
    """Softmax over the E logits (fp32, torch), the top-k of each token with renormalised
    weights (one kernel), and the expert-grouped permutation of the T*k copies (a counting
    sort, two kernels). Differentiable in the logits through ``weights``; the index arrays
    carry no gradient. Inputs are not checked here (``api.moe_ffn`` does)."""
    T, E = router_logits.shape
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    experts, weights = _TopK.apply(probs, top_k)  # [T, k] each
    row_to_copy, copy_to_row, offsets, counts, row_to_token = _group(experts.view(-1), E, divide=top_k)
    return Routing(
        weights=weights,
        experts=experts,
        row_to_copy=row_to_copy,
        row_to_token=row_to_token,
        copy_to_row=copy_to_row.view(T, top_k),
        counts=counts,
        offsets=offsets,
    )


@triton.jit
def _moe_combine_kernel(
    y, copy_to_row, weights, out,
    T, H,
    stride_ym, stride_yh, stride_ot, stride_oh,
    TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t, h] = sum_{j < TOP_K} (weights[t, j] *) y[copy_to_row[t, j], h], j in order."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_t, m_h = o_t < T, o_h < H
    m_th = m_t[:, None] & m_h[None, :]
    b_out = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)  # [BT, BH]
    for j in tl.static_range(TOP_K):
        # the row copy j of each token landed on, and its routing weight
        row = tl.load(copy_to_row + o_t * TOP_K + j, mask=m_t, other=0).to(tl.int64)  # [BT]
        b_y = tl.load(y + row[:, None] * stride_ym + o_h[None, :] * stride_yh, mask=m_th, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            b_w = tl.load(weights + o_t * TOP_K + j, mask=m_t, other=0.0)  # [BT]
            b_y = b_y * b_w[:, None]
        b_out += b_y
    p_out = out + o_t.to(tl.int64)[:, None] * stride_ot + o_h[None, :] * stride_oh
    tl.store(p_out, b_out.to(p_out.dtype.element_ty), mask=m_th)


@triton.jit
def _moe_combine_bwd_kernel(
    dout, y, copy_to_row, weights, dy, dweights,
    T, H,
    stride_dot, stride_doh, stride_ym, stride_yh, stride_dym, stride_dyh,
    TOP_K: tl.constexpr, K_POW2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dy[copy_to_row[t, j]] = weights[t, j] * dout[t];  dweights[t, j] = dout[t] . y[copy_to_row[t, j]]."""
    i_t = tl.program_id(0)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_j = tl.arange(0, K_POW2)
    b_dw = tl.zeros([BLOCK_T, K_POW2], dtype=tl.float32)  # [BT, KP]: dweights of the block's tokens
    for i_h in range(0, tl.cdiv(H, BLOCK_H)):
        o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
        m_th = m_t[:, None] & (o_h < H)[None, :]
        b_do = tl.load(dout + o_t.to(tl.int64)[:, None] * stride_dot + o_h[None, :] * stride_doh,
                       mask=m_th, other=0.0).to(tl.float32)  # [BT, BH], read once for all k copies
        for j in tl.static_range(TOP_K):
            row = tl.load(copy_to_row + o_t * TOP_K + j, mask=m_t, other=0).to(tl.int64)  # [BT]
            b_w = tl.load(weights + o_t * TOP_K + j, mask=m_t, other=0.0)  # [BT]
            b_y = tl.load(y + row[:, None] * stride_ym + o_h[None, :] * stride_yh, mask=m_th, other=0.0).to(tl.float32)
            # partial dot over this chunk of features, into column j
            b_dw += tl.where(o_j[None, :] == j, tl.sum(b_do * b_y, axis=1)[:, None], 0.0)
            p_dy = dy + row[:, None] * stride_dym + o_h[None, :] * stride_dyh
            tl.store(p_dy, (b_do * b_w[:, None]).to(p_dy.dtype.element_ty), mask=m_th)
    tl.store(dweights + o_t[:, None] * TOP_K + o_j[None, :], b_dw, mask=m_t[:, None] & (o_j < TOP_K)[None, :])


def combine(y: torch.Tensor, copy_to_row: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y[copy_to_row[t, j]]`` (``weights`` None: plain sum),
    fp32 accumulation in slot order, output in y's dtype, ``[T, H]``."""
    T, k = copy_to_row.shape
    H = y.shape[1]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    if T == 0 or H == 0:
        return out
    cfg = COMBINE_CONFIG
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(H, cfg["BLOCK_H"]))
    _moe_combine_kernel[grid](
        y, copy_to_row, weights, out, T, H,
        y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        TOP_K=k, HAS_WEIGHTS=weights is not None,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"],
    )
    return out


def combine_bwd(
    dout: torch.Tensor, y: torch.Tensor, copy_to_row: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`combine` with weights: ``dy [M, H]`` (y's dtype) and ``dweights
    [T, k]`` (fp32, each a dot over H accumulated in fp32 in a fixed order)."""
    T, k = copy_to_row.shape
    M, H = y.shape
    dy = torch.empty(M, H, dtype=y.dtype, device=y.device)
    dweights = torch.empty(T, k, dtype=torch.float32, device=y.device)
    if T == 0:
        return dy, dweights
    cfg = COMBINE_CONFIG
    _moe_combine_bwd_kernel[(triton.cdiv(T, cfg["BLOCK_T"]),)](
        dout, y, copy_to_row, weights, dy, dweights, T, H,
        dout.stride(0), dout.stride(1), y.stride(0), y.stride(1), dy.stride(0), dy.stride(1),
        TOP_K=k, K_POW2=triton.next_power_of_2(k),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"],
    )
    return dy, dweights

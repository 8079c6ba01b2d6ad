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

Everything is torch ops on the tensors' device and deterministic: the top-k is a stable
descending sort of each token's probabilities (of equal probabilities the lower expert id
wins), the grouping a stable sort of the expert ids, the offsets a ``searchsorted`` (no
atomics, no histogram). Nothing here synchronises with the host.

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


def group_by_expert(ids: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows' expert ids ``[M]`` (int) -> ``(order, inverse, ends)``, int64 on ids' device:
    ``order`` lists the rows grouped by expert (a stable sort: rows of one expert keep their
    order), ``inverse[order[i]] = i``, ``ends[e]`` the end of expert e's rows in that order."""
    sorted_ids, order = torch.sort(ids, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=ids.device)
    ends = torch.searchsorted(sorted_ids, torch.arange(E, device=ids.device, dtype=sorted_ids.dtype), right=True)
    return order, inverse, ends


def group_received(counts: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`group_by_expert` of rows received from W sources, source-major (as an all-to-all
    delivers them), each source's block sorted by expert: ``counts [W, E]`` (int, any device)
    the rows source s sent expert e. ``rows`` (their total, if known) spares a host sync."""
    W, E = counts.shape
    ids = torch.repeat_interleave(torch.arange(E, device=counts.device).repeat(W), counts.reshape(-1), output_size=rows)
    return group_by_expert(ids, E)


def route(router_logits: torch.Tensor, top_k: int) -> Routing:
    """Softmax over the E logits (fp32), top-k by a stable descending sort, renormalised
    weights, and the expert-grouped permutation of the T*k copies. Differentiable in the
    logits through ``weights``; the index arrays carry no gradient. Inputs are not checked
    here (``api.moe_ffn`` does)."""
    T, E = router_logits.shape
    M = T * top_k
    device = router_logits.device
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    with torch.no_grad():
        # stable: among equal probabilities the lower expert id comes first (torch.topk makes no such promise)
        experts = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]  # [T, k]
    top = probs.gather(1, experts)  # [T, k]
    if top_k == 1:
        # one renormalised weight is exactly 1: its gradient is exactly 0 (not the round-off
        # of top / top), and the logits stay connected, so they get zeros rather than None
        weights = top * 0.0 + 1.0
    else:
        weights = top / top.sum(dim=-1, keepdim=True)
    with torch.no_grad():
        row_to_copy, copy_to_row, offsets = group_by_expert(experts.reshape(-1), E)  # [M], [M], [E]
        row_to_token = torch.div(row_to_copy, top_k, rounding_mode="floor").to(torch.int32)
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    return Routing(
        weights=weights,
        experts=experts,
        row_to_copy=row_to_copy,
        row_to_token=row_to_token,
        copy_to_row=copy_to_row.to(torch.int32).view(T, top_k),
        counts=counts.to(torch.int32),
        offsets=offsets.to(torch.int32),
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

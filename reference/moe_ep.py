"""Expert-parallel MoE reference: blocking all-to-all, the experts in plain torch, blocking
all-to-all back. Written for clarity, not speed; float64 by default; autograd flows to x,
router_logits and the local weight shards (the exchanges are a differentiable blocking
all-to-all whose backward is the reverse all-to-all).

Math (the definition of ``kernels.a2a_overlap.moe_ffn_ep``): ``moe_ffn_ref`` on the full
weights, the experts sharded so that rank r owns ``[r*E/W, (r+1)*E/W)``. Protocol here: the
rows and their GLOBAL expert ids are sent (a blocking all_to_all_single each, after a
blocking exchange of the [W] row counts); each received row is run through its expert one
row group at a time; results go back with the reverse all_to_all_single.

The unit tests compare ``moe_ffn_ep`` both with this reference (run in the same processes)
and with single-process ``moe_ffn`` / ``moe_ffn_ref`` on the gathered full weights.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from reference.moe import route_ref, swiglu_expert_ref


class _BlockingAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_zeros(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_zeros(sum(ctx.send_splits), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return out, None, None, None


def moe_ffn_ep_ref(x, router_logits, w_gate_up_local, w_down_local, top_k, group=None, *, dtype=torch.float64):
    """``[T, Hd]`` in ``dtype`` on this rank; every rank must call it (same top_k, shapes)."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    E = router_logits.shape[1]
    if E % W:
        raise ValueError(f"W = {W} must divide E = {E}")
    E_l = E // W
    experts, weights = route_ref(router_logits, top_k, dtype=dtype)  # [T, k]
    T = x.shape[0]
    flat = experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # copies sorted by expert = by destination
    dest = flat[order] // E_l
    send_splits = [int((dest == r).sum()) for r in range(W)]
    send_counts = torch.tensor(send_splits, dtype=torch.int64)
    recv_counts = torch.zeros(W, dtype=torch.int64)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    recv_splits = recv_counts.tolist()
    xs = x.to(dtype)[order // top_k]
    recv = _BlockingAllToAll.apply(xs, send_splits, recv_splits, group)
    ids = torch.zeros(sum(recv_splits), dtype=torch.int64)
    dist.all_to_all_single(ids, flat[order].contiguous(), recv_splits, send_splits, group=group)
    # recv * 0, not zeros_like: a rank that receives no rows must still keep the combine
    # exchange in the autograd graph, or it skips that exchange's backward collective
    y = recv * 0
    for e in range(E_l):
        rows = (ids == rank * E_l + e).nonzero(as_tuple=True)[0]
        if rows.numel():
            y = y.index_put((rows,), swiglu_expert_ref(recv[rows], w_gate_up_local[e].to(dtype), w_down_local[e].to(dtype)))
    back = _BlockingAllToAll.apply(y, recv_splits, send_splits, group)  # rows in `order`
    out = torch.zeros(T, x.shape[1], dtype=dtype)
    w = weights.reshape(-1)[order]
    return out.index_add(0, order // top_k, w[:, None] * back)

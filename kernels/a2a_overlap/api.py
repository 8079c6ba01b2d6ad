"""Expert-parallel MoE FFN (``moe_ffn_ep``): the experts sharded over a process group.

W ranks, E experts, ``E_l = E / W`` local experts: rank r owns experts
``[r * E_l, (r + 1) * E_l)`` (``w_gate_up_local [E_l, Hd, 2F]``, ``w_down_local [E_l, F, Hd]``).
Each rank holds its own T_r tokens (T may differ per rank, 0 included).

Pipeline (``num_chunks = C`` chunks: given, or the tuned config of ``schedule.py``, else 1).
A chunk is a group of this rank's LOCAL experts: chunk g holds local experts
``[g*E_l//C, (g+1)*E_l//C)`` of every rank, so each expert's weights are read once however
many chunks there are (chunking by tokens re-read all local weights per chunk: 5.4 GB per
chunk at W=2, which made 8 token chunks 3x slower than serial on 2 H100s)::

    route(logits, k)            one routing of all local tokens (the same as moe_ffn); rows
                                reordered chunk-major: chunk g's rows for rank r are one block
    xs = x[row_to_token]        every token copy in send order, gathered once (backward: the
                                deterministic slot-order combine of routing.py)
    dispatch(g) (all_to_all)    uneven splits: rank r gets the rows of its chunk-g experts
    experts(g)                  received rows (source-major, expert-minor) stably sorted by
                                expert, MoEExpertsFunction (gather + SwiGLU GEMM, down GEMM)
                                on the chunk's weight slices; back to received order
    combine(g) (all_to_all)     the reverse splits: every row comes home to its send slot
    weighted sum                MoECombineFunction (slot order, fp32) into token order, after
                                the last combine

Count exchange: ONE blocking ``all_to_all_single`` of an int64 tensor before any row moves:
rank s sends to rank r the row counts of r's local experts, ``[E_l]`` per peer. That gives
the splits of every chunk (sums over the chunk's experts) and the expert of every received
row (a sender's rows to r are sorted by expert), so no expert ids travel with the rows. It
is the call's one host synchronisation.

Overlap schedule (``C > 1``)::

    start dispatch(0)
    for g in 0..C-1:  start dispatch(g+1);  wait dispatch(g);  experts(g);  start combine(g)
    wait combine(0..C-1);  weighted sum

so the dispatch of chunk g+1 and the combine of chunk g-1 are in flight while the experts of
chunk g run (``async_op=True`` handles; see ``exchange.py``); dispatch(0) and combine(C-1)
are what stays exposed. The backward is correct (the autograd engine issues the reverse
exchanges in an order fixed by the graph) but not scheduled for overlap.

Contract (every rank): the same ``top_k``, ``num_chunks``, ``comm_ctas``, E, Hd, F and dtype, and the same
``requires_grad`` flags, so all ranks issue the same sequence of collectives (forward: 1 +
2C all-to-alls, plus one all-reduce when the config is looked up, plus a ``new_group`` the
first time a ``comm_ctas`` is used; backward: 2C, for the exchanges that carry gradient).
World size 1 makes
no collective at all (``moe_ffn`` on the local = all experts). A peer that dies or hangs
surfaces as a ``RuntimeError`` after the process group's timeout (``init_process_group(...,
timeout=...)``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.a2a_overlap import schedule
from kernels.a2a_overlap.exchange import start_exchange
from kernels.moe_gemm.api import MoECombineFunction, MoEExpertsFunction, _check_moe, moe_ffn
from kernels.moe_gemm.routing import combine, route


class _GatherRows(torch.autograd.Function):
    """``xs[p] = x[row_to_token[p]]``; backward sums each token's k copies in slot order."""

    @staticmethod
    def forward(ctx, x, row_to_token, copy_to_row):
        ctx.save_for_backward(copy_to_row)
        return x[row_to_token.long()]

    @staticmethod
    def backward(ctx, dxs):
        (copy_to_row,) = ctx.saved_tensors
        return combine(dxs.contiguous(), copy_to_row), None, None


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("moe_ffn_ep: a group was given but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _check_ep(x, router_logits, w_gate_up_local, w_down_local, top_k, num_chunks, comm_ctas, W) -> None:
    """Raise before any collective (every rank with the same shapes raises the same way)."""
    if num_chunks is not None and (isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1):
        raise ValueError(f"num_chunks must be None or an int >= 1, got {num_chunks!r}")
    if comm_ctas is not None:
        if num_chunks is None:
            raise ValueError("comm_ctas needs num_chunks (with num_chunks=None both come from the tuned config)")
        if isinstance(comm_ctas, bool) or not isinstance(comm_ctas, int) or comm_ctas < 0:
            raise ValueError(f"comm_ctas must be None or an int >= 0, got {comm_ctas!r}")
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError("router_logits must be a [T, E] tensor")
    E = router_logits.shape[1]
    if E % W != 0:
        raise ValueError(f"the world size W = {W} must divide the number of experts E = {E} (router_logits.shape[1])")
    E_l = E // W
    for name, w in (("w_gate_up_local", w_gate_up_local), ("w_down_local", w_down_local)):
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != E_l:
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{name} must hold E / W = {E} / {W} = {E_l} local experts, got {shape}")
    if num_chunks is not None and num_chunks > E_l:
        raise ValueError(f"num_chunks = {num_chunks} exceeds the E / W = {E} / {W} = {E_l} local experts "
                         "(a chunk is a group of local experts)")
    # the full-weight checks of moe_ffn on stride-0 [E, ...] views of the local shards (no copy)
    _check_moe(x, router_logits, _expand_experts(w_gate_up_local, E), _expand_experts(w_down_local, E), top_k)


def _expand_experts(w: torch.Tensor, E: int) -> torch.Tensor:
    """A [E, ...] view of a local shard for the shape checks (stride-0 view, no copy)."""
    return w[:1].expand(E, *w.shape[1:]) if w.shape[0] >= 1 else w


def _experts_local(recv, ids, w_gate_up_local, w_down_local):
    """Rows in received order -> expert outputs in received order (differentiable)."""
    E_l = w_gate_up_local.shape[0]
    R = recv.shape[0]
    ids_sorted, perm = torch.sort(ids, stable=True)  # expert-major, source-minor
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(R, device=perm.device)
    offsets = torch.searchsorted(ids_sorted, torch.arange(E_l, device=ids.device), right=True).to(torch.int32)
    y = MoEExpertsFunction.apply(recv, w_gate_up_local, w_down_local, perm.to(torch.int32),
                                 inv.to(torch.int32).view(R, 1), offsets)
    return y[inv]


def moe_ffn_ep(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w_gate_up_local: torch.Tensor,
    w_down_local: torch.Tensor,
    top_k: int = 2,
    group=None,
    *,
    num_chunks: int | None = None,
    comm_ctas: int | None = None,
) -> torch.Tensor:
    """MoE FFN with the experts sharded over ``group`` (default: the world); same math as
    ``moe_ffn`` on one process holding all experts.

    Args:
        x: ``[T, Hd]`` this rank's tokens (T may be 0 and may differ between ranks).
        router_logits: ``[T, E]`` logits over ALL E experts.
        w_gate_up_local: ``[E/W, Hd, 2F]``, this rank's experts ``[r*E/W, (r+1)*E/W)``.
        w_down_local: ``[E/W, F, Hd]``.
        top_k: experts per token (the same on every rank).
        group: a ``torch.distributed`` process group, or None for the default group (or for
            no distributed at all: then W = 1).
        num_chunks: chunks (groups of local experts) of the overlap schedule, 1 to E/W; MUST
            be the same on every rank. None: the
            tuned config of this GPU type (``schedule.py``; one extra all-reduce agrees on the
            largest token count first), else the serial default.
        comm_ctas: with ``num_chunks`` given, at most this many CTAs (SMs) for NCCL's kernels
            (0 or None: NCCL's choice; ignored on other backends). MUST match across ranks.

    Returns:
        ``[T, Hd]`` in x's dtype; differentiable in x, router_logits and both local shards.

    Raises:
        ValueError (before any collective) when W does not divide E, or shapes disagree.
        RuntimeError when a collective fails or times out (the process group's timeout).
    """
    W, rank = _world(group)
    _check_ep(x, router_logits, w_gate_up_local, w_down_local, top_k, num_chunks, comm_ctas, W)
    if W == 1:
        return moe_ffn(x, router_logits, w_gate_up_local, w_down_local, top_k)
    if num_chunks is None:
        config = schedule.tuned_config(x, router_logits, w_down_local, W, group)
        num_chunks, comm_ctas = config["num_chunks"], config["comm_ctas"]
    group = schedule.comm_group(group, comm_ctas or 0)
    E = router_logits.shape[1]
    E_l = E // W
    C = num_chunks
    dev = x.device
    bounds = [g * E_l // C for g in range(C + 1)]  # chunk g = local experts [bounds[g], bounds[g+1])

    # routing of all local tokens (local, no communication); rows in chunk-major send order
    rt = route(router_logits, top_k)
    row_to_token, copy_to_row = _chunk_major(rt, W, E_l, bounds)
    # counts exchange: to rank r, the row counts of each of r's local experts ([E_l] per peer)
    send_counts = rt.counts.view(W, E_l).to(torch.int64)
    recv_counts = torch.empty_like(send_counts)  # [W(src), E_l]
    try:
        dist.all_to_all_single(recv_counts.view(-1), send_counts.contiguous().view(-1), group=group)
    except RuntimeError as exc:
        raise RuntimeError(f"moe_ffn_ep: count exchange failed or timed out on rank {rank}: {exc}") from exc
    sent, received = torch.stack([send_counts, recv_counts]).tolist()  # the one host sync
    send_splits = [[sum(sent[r][bounds[g]:bounds[g + 1]]) for r in range(W)] for g in range(C)]  # [C][W]
    recv_splits = [[sum(received[r][bounds[g]:bounds[g + 1]]) for r in range(W)] for g in range(C)]  # [C][W]

    # every row gathered once, then split by chunk (views; the backward concatenates)
    xs = _GatherRows.apply(x, row_to_token, copy_to_row)
    xs_chunks = xs.split([sum(s) for s in send_splits])
    w_gate_up_chunks = w_gate_up_local.split([bounds[g + 1] - bounds[g] for g in range(C)])
    w_down_chunks = w_down_local.split([bounds[g + 1] - bounds[g] for g in range(C)])

    def start_dispatch(g):
        return start_exchange(xs_chunks[g], send_splits[g], recv_splits[g], group, f"dispatch of chunk {g}")

    pending = start_dispatch(0)
    combines = []
    for g in range(C):
        nxt = start_dispatch(g + 1) if g + 1 < C else None
        recv = pending.wait()
        E_g = bounds[g + 1] - bounds[g]
        ids = torch.repeat_interleave(torch.arange(E_g, device=dev).repeat(W),
                                      recv_counts[:, bounds[g]:bounds[g + 1]].reshape(-1),
                                      output_size=sum(recv_splits[g]))  # no host sync
        y = _experts_local(recv, ids, w_gate_up_chunks[g], w_down_chunks[g])
        combines.append(start_exchange(y, recv_splits[g], send_splits[g], group, f"combine of chunk {g}"))
        pending = nxt
    y_back = [pending.wait() for pending in combines]
    return MoECombineFunction.apply(y_back[0] if C == 1 else torch.cat(y_back), rt.weights, copy_to_row)


def _chunk_major(rt, W: int, E_l: int, bounds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_to_token`` and ``copy_to_row`` of the rows reordered chunk-major: rows are sorted
    by expert e = r * E_l + j (rank r, local expert j); a stable sort by the chunk of j keeps
    them sorted by (rank, expert) inside each chunk, so chunk g's rows for rank r are one
    contiguous block. One chunk: the routing's own order."""
    C = len(bounds) - 1
    if C == 1:
        return rt.row_to_token, rt.copy_to_row
    dev = rt.row_to_token.device
    chunk_of_local = [g for g in range(C) for _ in range(bounds[g], bounds[g + 1])]
    chunk_of_expert = torch.tensor(chunk_of_local * W, device=dev)  # [E]
    expert_of_row = rt.experts.reshape(-1)[rt.row_to_copy]  # [M], non-decreasing
    perm = torch.sort(chunk_of_expert[expert_of_row], stable=True).indices  # [M] new row -> old row
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=dev)
    return rt.row_to_token[perm], inv[rt.copy_to_row.long()].to(torch.int32)

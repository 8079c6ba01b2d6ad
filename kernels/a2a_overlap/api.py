"""Expert-parallel MoE FFN (``moe_ffn_ep``): the experts sharded over a process group.

W ranks, E experts, ``E_l = E / W`` local experts: rank r owns experts
``[r * E_l, (r + 1) * E_l)`` (``w_gate_up_local [E_l, Hd, 2F]``, ``w_down_local [E_l, F, Hd]``).
Each rank holds its own T_r tokens (T may differ per rank, 0 included).

Pipeline, per chunk of local tokens (``num_chunks`` chunks: given, or the tuned config of
``schedule.py``, else 1)::

    route(logits_c, k)          the same routing as moe_ffn: rows sorted by expert, hence by
                                destination rank (rank r's experts are contiguous)
    xs = x_c[row_to_token]      the M_c token copies in send order (backward: the deterministic
                                slot-order combine of routing.py, not a scatter-add)
    dispatch (all_to_all)       uneven splits: rank r gets the rows of its experts
    experts                     received rows (source-major, expert-minor) stably sorted by
                                local expert, then MoEExpertsFunction (gather + SwiGLU GEMM,
                                down GEMM) of kernels/moe_gemm; back to received order
    combine (all_to_all back)   the reverse splits: every row comes home to its send slot
    weighted sum                MoECombineFunction (slot order, fp32) into token order

Count exchange: ONE blocking ``all_to_all_single`` of an int64 tensor before any row moves:
rank s sends to rank r its per-(chunk, local expert of r) row counts, ``[C, E_l]`` per peer.
That gives both the splits (sums over experts) and the expert of every received row (a
sender's rows to r are sorted by expert), so no expert ids travel with the rows.

Overlap schedule (``num_chunks = C > 1``)::

    start dispatch(0)
    for c in 0..C-1:  start dispatch(c+1);  wait dispatch(c);  experts(c);  start combine(c)
    for c in 0..C-1:  wait combine(c);  weighted sum(c)

so the dispatch of chunk c+1 and the combine of chunk c-1 are in flight while the experts of
chunk c run (``async_op=True`` handles; see ``exchange.py``). Chunk c is the local tokens
``[c*T//C, (c+1)*T//C)`` (possibly empty). The backward is correct (the autograd engine
issues the reverse exchanges in an order fixed by the graph) but not scheduled for overlap.

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
        num_chunks: chunks of the overlap schedule; MUST be the same on every rank. None: the
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

    T = x.shape[0]
    E = router_logits.shape[1]
    E_l = E // W
    C = num_chunks
    dev = x.device
    bounds = [c * T // C for c in range(C + 1)]

    # routing of every chunk (local, no communication)
    routings = [route(router_logits[bounds[c]:bounds[c + 1]], top_k) for c in range(C)]
    # counts exchange: to rank r, [C, E_l] counts of r's experts; one collective for all chunks
    send_counts = torch.stack([r.counts.view(W, E_l) for r in routings], dim=1).to(torch.int64)  # [W, C, E_l]
    recv_counts = torch.empty_like(send_counts)  # [W(src), C, E_l]
    try:
        dist.all_to_all_single(recv_counts.view(-1), send_counts.contiguous().view(-1), group=group)
    except RuntimeError as exc:
        raise RuntimeError(f"moe_ffn_ep: count exchange failed or timed out on rank {rank}: {exc}") from exc
    send_splits = send_counts.sum(-1).T.tolist()  # [C][W]
    recv_splits = recv_counts.sum(-1).T.tolist()  # [C][W]
    local_ids = torch.arange(E_l, device=dev).repeat(W)  # expert of each (src, expert) block

    def start_dispatch(c):
        rt = routings[c]
        xc = x[bounds[c]:bounds[c + 1]]
        xs = _GatherRows.apply(xc, rt.row_to_token, rt.copy_to_row)
        return start_exchange(xs, send_splits[c], recv_splits[c], group, f"dispatch of chunk {c}")

    pending = start_dispatch(0)
    combines = []
    for c in range(C):
        nxt = start_dispatch(c + 1) if c + 1 < C else None
        recv = pending.wait()
        ids = torch.repeat_interleave(local_ids, recv_counts[:, c, :].reshape(-1).to(dev))
        y = _experts_local(recv, ids, w_gate_up_local, w_down_local)
        combines.append(start_exchange(y, recv_splits[c], send_splits[c], group, f"combine of chunk {c}"))
        pending = nxt
    outs = []
    for c in range(C):
        rt = routings[c]
        y_back = combines[c].wait()
        outs.append(MoECombineFunction.apply(y_back, rt.weights, rt.copy_to_row))
    return outs[0] if C == 1 else torch.cat(outs, dim=0)

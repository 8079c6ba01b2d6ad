"""Expert-parallel MoE FFN (``moe_ffn_ep``): the experts sharded over a process group.

W ranks, E experts, ``E_l = E / W`` local experts: rank r owns experts
``[r * E_l, (r + 1) * E_l)`` (``w_gate_up_local [E_l, Hd, 2F]``, ``w_down_local [E_l, F, Hd]``).
Each rank holds its own T_r tokens (T may differ per rank, 0 included).

Pipeline (``num_chunks = C`` chunks and the transport: given, or the tuned config of
``schedule.py``, else 1 chunk on NCCL). A chunk is a group of this rank's LOCAL experts:
chunk g holds local experts ``[g*E_l//C, (g+1)*E_l//C)`` of every rank, so each expert's
weights are read once however many chunks there are (chunking by tokens re-read all local
weights per chunk: 5.4 GB per chunk at W=2, which made 8 token chunks 3x slower than serial
on 2 H100s)::

    route(logits, k)            one routing of all local tokens (the same as moe_ffn)
    counts (all_gather)         every rank's row count per expert, [W, E] int64: ONE blocking
                                collective and the call's one host synchronisation; every
                                split and offset follows from it (``layout.py``), so no expert
                                ids travel with the rows
    dispatch(g)                 rank r gets every rank's rows for its chunk-g experts
    experts(g)                  MoEExpertsFunction (gather + SwiGLU GEMM, down GEMM) on the
                                chunk's weight slices, rows grouped by expert
    combine(g)                  every output row back to the rank and slot it came from
    weighted sum                MoECombineFunction (slot order, fp32) into token order

Transports (how dispatch and combine move rows in the forward; the backward runs the
reverse all-to-alls on the group, blocking, either way):

- ``"nccl"``: rows gathered chunk-major (chunk g's rows for rank r one block), async
  ``all_to_all_single`` per chunk and direction (``exchange.py``), received rows sorted by
  expert on the GPU, outputs put back in received order before the combine. Schedule::

      start dispatch(0)
      for g in 0..C-1:  start dispatch(g+1);  wait dispatch(g);  experts(g);  start combine(g)
      wait combine(0..C-1);  weighted sum

- ``"copy"``: rows gathered in routing order into a workspace every peer can read
  (``workspace.py``); the copy engines pull each chunk's rows expert-major (no sort) and the
  outputs straight back into routing order (no cat, no un-permute), on two side streams, the
  SMs left to the experts (``copy_exchange.py`` has the schedule and its barriers).
- ``"flags"``: the copy transport's workspaces and copy engines without chunks: one launch
  of each GEMM over all local experts, whose programs wait for per-expert ``ready`` flags
  (set by stream memory ops after each expert's pulls) and count per-expert ``done``
  (which the combine stream waits on before pushing that expert's outputs back);
  ``flags_exchange.py``. ``num_chunks`` must be 1.

dispatch(0) and combine(C-1) are what stays exposed.

Contract (every rank): the same ``top_k``, ``num_chunks``, ``comm_ctas``, ``transport``, E,
Hd, F and dtype, and the same ``requires_grad`` flags, so all ranks issue the same sequence of
collectives (forward: the count all-gather, then 2C all-to-alls (NCCL) or C + 2 workspace
barriers (copy) or 2 (flags) plus a collective workspace allocation when it must grow; a ``new_group`` the
first time a ``comm_ctas`` is used; backward: 2C
all-to-alls, for the exchanges that carry gradient). World size 1 makes no collective at all
(``moe_ffn`` on the local = all experts). A peer that dies or hangs surfaces as a
``RuntimeError`` after the process group's timeout (``init_process_group(..., timeout=...)``);
at a copy-transport barrier on the GPU, as a device-side error after
``workspace.BARRIER_TIMEOUT_MS``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.a2a_overlap import copy_exchange, flags_exchange, schedule, workspace
from kernels.a2a_overlap.exchange import start_exchange
from kernels.a2a_overlap.layout import ExchangePlan
from kernels.moe_gemm.api import MoECombineFunction, MoEExpertsFunction, _check_moe, moe_ffn
from kernels.moe_gemm.routing import combine, group_by_expert, group_received, route


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


def _check_ep(x, router_logits, w_gate_up_local, w_down_local, top_k, num_chunks, comm_ctas, transport, W) -> None:
    """Raise before any collective (every rank with the same shapes raises the same way)."""
    if num_chunks is not None and (isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1):
        raise ValueError(f"num_chunks must be None or an int >= 1, got {num_chunks!r}")
    if comm_ctas is not None:
        if num_chunks is None:
            raise ValueError("comm_ctas needs num_chunks (with num_chunks=None both come from the tuned config)")
        if isinstance(comm_ctas, bool) or not isinstance(comm_ctas, int) or comm_ctas < 0:
            raise ValueError(f"comm_ctas must be None or an int >= 0, got {comm_ctas!r}")
    if transport is not None:
        if num_chunks is None:
            raise ValueError("transport needs num_chunks (with num_chunks=None both come from the tuned config)")
        if transport not in schedule.TRANSPORTS:
            raise ValueError(f"transport must be one of {schedule.TRANSPORTS}, got {transport!r}")
        if transport != "nccl" and comm_ctas:
            raise ValueError(f"comm_ctas limits NCCL's kernels; the {transport} transport has none "
                             f"(got comm_ctas={comm_ctas})")
        if transport == "flags" and num_chunks != 1:
            raise ValueError(f"the flags transport runs unchunked: num_chunks must be 1, got {num_chunks}")
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


def _experts(rows, w_gate_up_local, w_down_local, order, inv, offsets, flags=None):
    """The local experts: ``y[i] = expert(rows[order[i]])``, rows ``order`` grouped by expert
    (``offsets`` int32 group ends), ``inv`` the inverse of ``order``; both None when rows are
    already grouped (the copy transports deliver them so: no gather). Differentiable in rows
    and the weights. The GEMMs and nothing else (ep_bench times this as the experts' own time).
    ``flags``: the flags transport's per-expert (ready, done) (``flags_exchange.py``)."""
    if order is not None:
        order, inv = order.to(torch.int32), inv.to(torch.int32).view(-1, 1)
    return MoEExpertsFunction.apply(rows, w_gate_up_local, w_down_local, order, inv, offsets, flags)


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
    transport: str | None = None,
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
            be the same on every rank. None: the tuned config of this GPU type for the largest
            token count of any rank (``schedule.py``; read off the count all-gather, so it
            costs no extra collective), else the serial default.
        comm_ctas: with ``num_chunks`` given, at most this many CTAs (SMs) for NCCL's kernels
            (0 or None: NCCL's choice; ignored on other backends). MUST match across ranks.
        transport: with ``num_chunks`` given, how the forward moves rows: ``"nccl"`` (default;
            the group's all-to-all), ``"copy"`` (copy engines pulling from the peers'
            symmetric-memory workspaces, ``copy_exchange.py``) or ``"flags"`` (the same
            engines under unchunked GEMMs synchronised per expert, ``flags_exchange.py``;
            num_chunks 1). copy and flags need NCCL groups with CUDA tensors, or gloo with
            CPU tensors. The backward exchanges run on the group either way. MUST match
            across ranks.

    Returns:
        ``[T, Hd]`` in x's dtype; differentiable in x, router_logits and both local shards.

    Raises:
        ValueError (before any collective) when W does not divide E, or shapes disagree.
        RuntimeError when a collective fails or times out (the process group's timeout).
    """
    W, rank = _world(group)
    _check_ep(x, router_logits, w_gate_up_local, w_down_local, top_k, num_chunks, comm_ctas, transport, W)
    if W == 1:
        return moe_ffn(x, router_logits, w_gate_up_local, w_down_local, top_k)
    if transport in ("copy", "flags") and (why := workspace.supported(group, x.device)):
        raise ValueError(f"transport={transport!r} cannot run here: {why}")
    rt = route(router_logits, top_k)  # all local tokens (local, no communication)
    known = None  # the gathered counts (tensor, lists), when the tuned config needs them first
    if num_chunks is None:
        # the count all-gather comes first here (the rows are gathered after it, not under
        # it): the tuned config needs every rank's token count
        known = _counts(rt, W, group, rank, None, meanwhile=None)[:2]
        config = schedule.tuned_config(known[1], top_k, w_down_local, x.dtype, group, x.device)
        num_chunks, comm_ctas, transport = config["num_chunks"], config["comm_ctas"], config["transport"]
    transport = transport or "nccl"
    group = schedule.comm_group(group, comm_ctas or 0) if transport == "nccl" else group
    E_l, C = router_logits.shape[1] // W, num_chunks
    bounds = [g * E_l // C for g in range(C + 1)]  # chunk g = local experts [bounds[g], bounds[g+1])
    w_gate_up_chunks = w_gate_up_local.split([bounds[g + 1] - bounds[g] for g in range(C)])
    w_down_chunks = w_down_local.split([bounds[g + 1] - bounds[g] for g in range(C)])
    if transport == "nccl":
        y_back, copy_to_row = _ep_nccl(x, rt, w_gate_up_chunks, w_down_chunks, bounds, W, rank, group, known)
    else:
        exchange_cls = copy_exchange.CopyExchange if transport == "copy" else flags_exchange.FlagsExchange
        y_back, copy_to_row = _ep_copy(x, rt, w_gate_up_chunks, w_down_chunks, bounds, W, rank, group, known,
                                       exchange_cls)
    return MoECombineFunction.apply(y_back, rt.weights, copy_to_row)


def _ep_nccl(x, rt, w_gate_up_chunks, w_down_chunks, bounds, W, rank, group, known=None):
    """The NCCL transport: all-to-alls of chunk-major rows, chunk g+1's dispatch and chunk
    g-1's combine in flight under chunk g's experts. ``known``: the counts already gathered
    (tensor, list), or None. Returns the expert outputs in send order and the ``copy_to_row``
    of that order."""
    C, E_l = len(bounds) - 1, bounds[-1]
    row_to_token, copy_to_row = _chunk_major(rt, W, E_l, bounds)
    # every row gathered once (while the counts travel), then split by chunk (views; the
    # backward concatenates)
    counts, counts_list, xs = _counts(rt, W, group, rank, known,
                                      meanwhile=lambda: _GatherRows.apply(x, row_to_token, copy_to_row))
    plan = ExchangePlan(counts_list, rank, E_l, bounds)
    send_splits, recv_splits = plan.send_splits, plan.recv_splits  # [C][W] each
    recv_counts = counts[:, rank * E_l:(rank + 1) * E_l]  # [W(src), E_l], on the device

    xs_chunks = xs.split([sum(s) for s in send_splits])

    def start_dispatch(g):
        return start_exchange(xs_chunks[g], send_splits[g], recv_splits[g], group, f"dispatch of chunk {g}")

    pending = start_dispatch(0)
    combines = []
    for g in range(C):
        nxt = start_dispatch(g + 1) if g + 1 < C else None
        recv = pending.wait()
        perm, inv, ends = group_received(recv_counts[:, bounds[g]:bounds[g + 1]], sum(recv_splits[g]))
        y_sorted = _experts(recv, w_gate_up_chunks[g], w_down_chunks[g], perm, inv, ends.to(torch.int32))
        combines.append(start_exchange(y_sorted[inv], recv_splits[g], send_splits[g], group, f"combine of chunk {g}"))
        pending = nxt
    y_back = [pending.wait() for pending in combines]
    return (y_back[0] if C == 1 else torch.cat(y_back)), copy_to_row


def _ep_copy(x, rt, w_gate_up_chunks, w_down_chunks, bounds, W, rank, group, known=None,
             exchange_cls=copy_exchange.CopyExchange):
    """The copy transport (``copy_exchange.py``): rows stay in routing order; the pulls of
    chunk g+1 and the combine of chunk g-1 run on copy engines under chunk g's experts.
    With ``exchange_cls`` FlagsExchange, the flags transport (one chunk; the GEMMs wait on
    and signal per-expert flags, ``flags_exchange.py``). ``known`` as in :func:`_ep_nccl`."""
    C, E_l, dev = len(bounds) - 1, bounds[-1], x.device
    M, Hd = rt.row_to_token.shape[0], x.shape[1]
    # this rank's rows go into the workspace while the counts travel, when the current
    # workspace is large enough (else after the counts, into the grown one)
    early = workspace.peek(group, dev, M * Hd * x.dtype.itemsize)

    def gather_early():
        if early is not None:
            # (x's gradient flows through CopyDispatch, which takes x and skips its own gather)
            torch.index_select(x.detach(), 0, rt.row_to_token.long(), out=early.rows(rank, 0, M, Hd, x.dtype))

    _, counts_list, _ = _counts(rt, W, group, rank, known, meanwhile=gather_early)
    plan = ExchangePlan(counts_list, rank, E_l, bounds)
    xfer = exchange_cls(plan, group, dev, Hd, x.dtype)
    recvs = copy_exchange.CopyDispatch.apply(x, rt.row_to_token, rt.copy_to_row, xfer,
                                             xfer.ws is early)  # pulls chunk 0
    ys = []
    for g in range(C):
        xfer.wait_dispatch(g)
        # the pulls deliver the rows expert-major: no order to gather them by
        y_sorted = _experts(recvs[g], w_gate_up_chunks[g], w_down_chunks[g], None, None, xfer.expert_offsets(g),
                            xfer.flags)
        # issued after chunk g's GEMMs so that the host launches those first (the pulls cost
        # host time per block); both run under chunk g's experts on the GPU
        if g + 1 < C:
            xfer.pull_dispatch(g + 1)
        xfer.publish(g, y_sorted)  # the combine of chunk g, under the experts of chunk g+1
        ys.append(y_sorted)
    return copy_exchange.CopyCombine.apply(xfer, *ys), rt.copy_to_row


def _counts(rt, W: int, group, rank: int, known, meanwhile):
    """``(counts [W, E] tensor, the same as lists, meanwhile())``: the all-gather with
    ``meanwhile`` (or None) under it (see :func:`_all_counts`) and the call's one host sync,
    or, when ``known`` already holds the gathered counts, ``meanwhile`` alone."""
    if known is not None:
        return (*known, meanwhile())
    counts, done = _all_counts(rt.counts, W, group, rank, meanwhile=meanwhile)
    return counts, counts.tolist(), done  # the call's one host sync


def _all_counts(counts: torch.Tensor, W: int, group, rank: int, meanwhile=None):
    """Every rank's routing counts ``[W, E]`` (int64, on counts' device): one all-gather.

    ``meanwhile()`` (work that does not need the counts, e.g. gathering this rank's rows) is
    issued after the all-gather, so the all-gather does not wait for it on the stream and the
    two run together; returns ``(counts, meanwhile's result)``."""
    mine = counts.to(torch.int64).contiguous()
    parts = [torch.empty_like(mine) for _ in range(W)]
    failed = f"moe_ffn_ep: count exchange failed or timed out on rank {rank}"
    try:
        work = dist.all_gather(parts, mine, group=group, async_op=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{failed}: {exc}") from exc
    done = meanwhile() if meanwhile is not None else None  # its own errors are its own
    try:
        work.wait()
    except RuntimeError as exc:
        raise RuntimeError(f"{failed}: {exc}") from exc
    return torch.stack(parts), done


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
    perm, inv, _ = group_by_expert(chunk_of_expert[expert_of_row], C)  # [M] new row -> old row, and back
    return rt.row_to_token[perm], inv[rt.copy_to_row.long()].to(torch.int32)

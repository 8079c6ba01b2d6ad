"""The copy transport of ``moe_ffn_ep``: rows PULLED from the peers' workspaces by the copy
engines (``cudaMemcpyAsync`` from NVLink-mapped peer memory), so no SM does communication.

Why: NCCL's all-to-all kernels occupy SMs beside the experts' GEMMs and slowed them by 15-29%
on 2 H100s (docs/perf-notes.md); a copy-engine pull uses no SM.

Layout (rows of Hd elements; every rank knows every rank's routing counts ``counts[s][e]``,
the rows rank s sends to expert e, from one all-gather, so it can compute every offset)::

    rank r's workspace:  [ xs_r : M_r rows in routing order (sorted by expert)         ]
                         [ y_r chunk 0 ][ y_r chunk 1 ] ...  (the rows r RECEIVED, chunk g's
                                                             expert-major, source-minor)

Forward, on rank me (compute stream = the caller's current stream)::

    compute:   gather x's rows straight into xs_me (no other copy)
    dispatch stream:  barrier(0) (every xs written); for g: pull from every s, for each of my
               chunk-g experts, the rows s sends it -> recv_g, expert-major, source-minor, so
               the grouped GEMM needs no sort; event d_g
    compute:   for g: wait d_g; experts(g) -> y_sorted_g (the same order); event e_g
    combine stream:   for g: wait e_g; copy y_sorted_g into y_me chunk g; barrier(1) (every
               rank's chunk g published); pull from every r, for each of r's chunk-g experts,
               the block of rows that came from me -> straight into their routing-order slots of ybuf;
               finally barrier(1) (no one reads a workspace any more) and the compute stream
               waits for the combine stream.

So the dispatch of chunk g+1 and the combine of chunk g-1 run on the copy engines while the
experts of chunk g run; the permutation back to routing order is free (it is where the pulls
land), and no ``cat`` of chunks follows. The final barrier makes it safe for the next call to
overwrite the workspace.

Backward: the same exchanges in reverse, blocking, on the process group (all-to-all, as
with the NCCL transport): the copy transport speeds the forward only.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from kernels.a2a_overlap import workspace as ws_mod
from kernels.a2a_overlap.layout import ExchangePlan
from kernels.a2a_overlap.exchange import exchange
from kernels.moe_gemm.routing import combine, group_received


@functools.lru_cache(maxsize=None)
def _side_streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """The (dispatch, combine) streams of a device: the copies they issue run on copy engines."""
    return torch.cuda.Stream(device=device), torch.cuda.Stream(device=device)


class CopyExchange:
    """One call's copy-transport state: plan, workspace, streams, events, the chunks' perms.

    Host order (``api._ep_copy``): :meth:`start` (gather, barrier, chunk 0's pulls), then per
    chunk g: :meth:`wait_dispatch` (g), the experts, :meth:`pull_dispatch` (g+1),
    :meth:`publish` (g); then :meth:`finish`. The side streams' work is issued as early as the
    host can, and each waits on the GPU only for what it reads."""

    flags = None  # the experts' (ready, done) flags: none here (flags_exchange.py has them)

    def __init__(self, plan: ExchangePlan, group, device: torch.device, Hd: int, dtype: torch.dtype):
        self.plan, self.group, self.Hd, self.dtype, self.device = plan, group, Hd, dtype, device
        self.ws = ws_mod.workspace(group, device, self.rows_needed(plan) * Hd * dtype.itemsize)
        self.cuda = device.type == "cuda"
        self.dispatch_stream, self.combine_stream = _side_streams(device) if self.cuda else (None, None)
        self.dispatched = [None] * plan.C
        self.recvs = self.ybuf = None
        self._orders: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        ends = torch.tensor(plan.expert_ends(), dtype=torch.int32)
        self._ends = ends.pin_memory().to(device, non_blocking=True) if self.cuda else ends

    @staticmethod
    def rows_needed(plan: ExchangePlan) -> int:
        """Workspace rows per rank (the same on every rank): its own rows, then what it received."""
        return plan.rows_needed

    def expert_offsets(self, g: int) -> torch.Tensor:
        """int32 group ends of chunk g's experts in recv_g (the grouped GEMM's offsets)."""
        return self._ends[self.plan.bounds[g]:self.plan.bounds[g + 1]]

    def expert_order(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(perm, inv) between chunk g's rows source-major (as an all-to-all delivers them)
        and expert-major (as the pulls deliver them): ``sorted[i] = source_major[perm[i]]``.
        Computed once per chunk, for the backward."""
        if g not in self._orders:
            p = self.plan
            lo, hi = p.me * p.E_l + p.bounds[g], p.me * p.E_l + p.bounds[g + 1]  # this rank's chunk-g experts
            counts = [c[lo:hi] for c in p.counts]
            # on the device: the grouping is a Triton kernel
            perm, inv, _ = group_received(torch.tensor(counts, device=self.device), sum(map(sum, counts)))
            self._orders[g] = perm, inv
        return self._orders[g]

    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _rows(self, rank: int, start: int, n: int) -> torch.Tensor:
        return self.ws.rows(rank, start, n, self.Hd, self.dtype)

    # -- forward -------------------------------------------------------------------------
    def start(self, x: torch.Tensor, row_to_token: torch.Tensor, gathered: bool) -> list[torch.Tensor]:
        """Gather x's rows into this rank's workspace (unless ``gathered``: the caller already
        did, into this workspace), wait for every rank's, pull chunk 0.
        Returns the C receive buffers (chunk g is filled once :meth:`wait_dispatch` (g) returns)."""
        p, me, Hd = self.plan, self.plan.me, self.Hd
        # Every buffer a side stream writes is allocated HERE, before any expert is issued: the
        # caching allocator hands out blocks freed on the compute stream at once, safe only for
        # that stream. ybuf allocated after the experts could be a block that a later chunk's
        # experts still use (wrong outputs at 2-4 chunks on H200s until this was moved here);
        # allocated now, every earlier user of its block precedes the events the side streams wait on.
        self.ybuf = torch.empty(p.M[me], Hd, dtype=self.dtype, device=self.device)
        self.recvs = [torch.empty(sum(p.recv_splits[g]), Hd, dtype=self.dtype, device=self.device)
                      for g in range(p.C)]
        if not gathered:
            torch.index_select(x, 0, row_to_token.long(), out=self._rows(me, 0, p.M[me]))
        if self.cuda:
            self.dispatch_stream.wait_stream(torch.cuda.current_stream())
            for t in self.recvs:  # written on the dispatch stream
                t.record_stream(self.dispatch_stream)
        with self._on(self.dispatch_stream):
            self.ws.barrier(0)  # every rank's rows are in its workspace
        self.pull_dispatch(0)
        return self.recvs

    @torch.no_grad()  # recv_g is already an autograd output: filling it must not record history
    def pull_dispatch(self, g: int) -> None:
        """Issue chunk g's pulls on the dispatch stream (copy engines)."""
        with self._on(self.dispatch_stream):
            for s, src, dst, rows in self.plan.dispatch_pulls(g):
                self.recvs[g][dst:dst + rows].copy_(self._rows(s, src, rows))
            if self.cuda:
                self.dispatched[g] = torch.cuda.Event()
                self.dispatched[g].record()

    def wait_dispatch(self, g: int) -> None:
        """Make the compute stream wait for chunk g's rows."""
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.dispatched[g])

    @torch.no_grad()
    def publish(self, g: int, y_sorted: torch.Tensor) -> None:
        """Chunk g's experts are issued (``y_sorted`` in recv_g's expert-major order): on the
        combine stream, once they finish, copy y_sorted into the workspace, wait for every
        rank's chunk g, and pull this rank's rows back into their routing-order slots of ybuf."""
        p, me = self.plan, self.plan.me
        if self.cuda:
            self.combine_stream.wait_stream(torch.cuda.current_stream())
            y_sorted.record_stream(self.combine_stream)  # read there; freed on the compute stream
        with self._on(self.combine_stream):
            if p.R[me][g]:
                self._rows(me, p.y_start[me][g], p.R[me][g]).copy_(y_sorted)
            self.ws.barrier(1)  # every rank's chunk g is published
            for r, src, dst, rows in p.combine_pulls(g):
                self.ybuf[dst:dst + rows].copy_(self._rows(r, src, rows))

    def finish(self) -> torch.Tensor:
        """ybuf ``[M, Hd]`` (routing order) once every pull is done; no rank reads any workspace
        after the closing barrier, so the next call may overwrite them."""
        with self._on(self.combine_stream):
            self.ws.barrier(1)
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.combine_stream)
        ybuf, self.ybuf, self.recvs = self.ybuf, None, None
        return ybuf

    # -- backward (blocking exchanges on the group) ---------------------------------------
    def dispatch_backward(self, grads) -> torch.Tensor:
        """Gradients of the received rows (expert-major per chunk) -> of this rank's rows in
        routing order: per chunk, to source-major, the reverse all-to-all, then each rank's
        block back to its place."""
        p = self.plan
        dxs = torch.empty(p.M[p.me], self.Hd, dtype=grads[0].dtype, device=grads[0].device)
        for g in range(p.C):
            _, inv = self.expert_order(g)
            back = exchange(grads[g][inv], p.recv_splits[g], p.send_splits[g], self.group,
                            f"dispatch of chunk {g} (backward)")
            for (start, rows), part in zip(p.send_blocks(g), back.split(p.send_splits[g])):
                dxs[start:start + rows] = part
        return dxs

    def combine_backward(self, dy: torch.Tensor) -> list[torch.Tensor]:
        """Gradient of ybuf (routing order) -> of each chunk's y_sorted (expert-major)."""
        p, out = self.plan, []
        for g in range(p.C):
            send = torch.cat([dy[start:start + rows] for start, rows in p.send_blocks(g)])
            back = exchange(send, p.send_splits[g], p.recv_splits[g], self.group, f"combine of chunk {g} (backward)")
            out.append(back[self.expert_order(g)[0]])
        return out


class CopyDispatch(torch.autograd.Function):
    """``x`` -> the rows every chunk receives (C tensors, filled as :class:`CopyExchange`
    pulls them); backward: the reverse exchanges, then each token's k copies summed in slot
    order."""

    @staticmethod
    def forward(ctx, x, row_to_token, copy_to_row, xfer: CopyExchange, gathered: bool):
        ctx.xfer = xfer
        ctx.save_for_backward(copy_to_row)
        return tuple(xfer.start(x, row_to_token, gathered))

    @staticmethod
    def backward(ctx, *grads):
        (copy_to_row,) = ctx.saved_tensors
        dxs = ctx.xfer.dispatch_backward(grads)
        return combine(dxs, copy_to_row), None, None, None, None


class CopyCombine(torch.autograd.Function):
    """The chunks' expert outputs (each in its y_sorted order, already handed to
    :meth:`CopyExchange.publish`) -> ybuf ``[M, Hd]`` in this rank's routing order; backward: the
    reverse exchanges."""

    @staticmethod
    def forward(ctx, xfer: CopyExchange, *ys_sorted):
        ctx.xfer = xfer
        return xfer.finish()

    @staticmethod
    def backward(ctx, dy):
        return (None, *ctx.xfer.combine_backward(dy))

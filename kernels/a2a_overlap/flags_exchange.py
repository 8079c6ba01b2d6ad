"""The flags transport of ``moe_ffn_ep``: no chunks; per-expert flags between the copy engines
and ONE launch of each expert GEMM over all local experts.

Chunking (``copy_exchange.py``) overlaps chunk g+1's dispatch with chunk g's experts, but each
chunk's GEMMs are smaller launches and the first dispatch and last combine stay exposed. Here
the GEMMs run whole (grouped_gemm.py, "Expert flags"): the up GEMM's programs of expert j wait
for ``ready[j]``, set by a stream memory op once the copy engines have pulled expert j's rows;
the down GEMM's programs count their stored elements into ``done[j]``, and the combine stream
waits (a stream memory op) for ``done[j] == rows_j * Hd`` before pushing expert j's outputs
to the ranks they came from. So expert 0 starts as soon as its rows land and each expert's
outputs leave while the next experts compute.

Layout (rows of Hd elements; ``plan`` is the copy transport's, one chunk)::

    rank r's workspace:  [ xs_r: M_r rows in routing order ][ ybuf_r: M_r rows, routing order ]

Forward on rank me (compute stream = the caller's current stream)::

    compute:   gather x's rows into xs_me; copy my own rows for my experts into recv (an SM
               copy: a copy within one GPU does not run beside a spinning GEMM, so it
               must finish first); barrier(0) (every xs written, every ybuf free); event
    dispatch:  (after the event) per local expert j: pull its rows from every peer into recv
               (copy engines, raw pointers), then ready[j] = 1      -- all issued BEFORE
    compute:   the up GEMM (spins per expert), the down GEMM (counts per expert)
    combine:   (after the event) per local expert j: wait done[j] >= rows_j * Hd, push its
               output rows to each peer's ybuf (peer writes); then the rows of my own
               tokens into my ybuf (SM copies: last, see :meth:`FlagsExchange.publish`);
               barrier(1) (every ybuf full)
    compute:   wait for the combine stream; ybuf_me is the result (copied out when autograd
               keeps it, since the next call reuses the workspace)

Each copy is one driver call by address (``memops``): the local copies and the pulls are
issued between the count exchange's host sync and the GEMMs' launch, while the GPU waits for
the host. The pulls and flags are queued before the GEMMs are launched: a spinning kernel may
hold every SM, and a host call that blocks until the device is idle (a module load at a
kernel's first launch) would otherwise deadlock with producers not yet issued. The barrier on
the compute stream keeps the side streams' SM-using work (the barrier kernels, the local
output copies) away from the spin: barrier(1) and the local pushes run once the down GEMM
has started, after the up GEMM, which is the only one that spins.

On CPU (gloo, the tests) the same steps run in order: the pulls and ``ready`` before the
GEMMs, which then find every flag set, and the pushes after them, once each ``done`` counter
is checked against its expected count (a GEMM that signals wrongly fails loudly here).

Backward: the copy transport's (blocking exchanges on the group).
"""
from __future__ import annotations

import torch

from kernels.a2a_overlap import memops
from kernels.a2a_overlap.copy_exchange import CopyExchange
from kernels.a2a_overlap.layout import ExchangePlan

COUNTER_LIMIT = 2**31  # done[j] is an int32 counter of expert j's output elements


class FlagsExchange(CopyExchange):
    """One call's flags-transport state; host order (``api._ep_copy`` with one chunk):
    :meth:`start` (gather, local rows, barrier, every pull and flag), the experts with
    :attr:`flags`, :meth:`publish` (the combine's waits and pushes), :meth:`finish`.

    Every copy is issued by address (``memops``): the blocks' row offsets are fixed here and
    turned into addresses with one ``data_ptr`` per buffer."""

    def __init__(self, plan: ExchangePlan, group, device: torch.device, Hd: int, dtype: torch.dtype):
        if plan.C != 1:
            raise ValueError(f"the flags transport runs one chunk, got {plan.C}")
        # checked over EVERY expert (every rank knows all counts), so all ranks raise or none
        e_big = max(range(len(plan.total)), key=plan.total.__getitem__)
        if plan.total[e_big] * Hd >= COUNTER_LIMIT:
            raise ValueError(f"the flags transport counts an expert's output elements in int32: expert "
                             f"{e_big} receives {plan.total[e_big]} rows of {Hd}")
        super().__init__(plan, group, device, Hd, dtype)
        ready_done = torch.zeros(2, plan.E_l, dtype=torch.int32, device=device)
        self.flags = (ready_done[0], ready_done[1])
        # the outputs outlive this call's workspace only when autograd keeps them for the
        # backward (read here, outside the autograd Functions, whose forward runs without grad);
        # otherwise the weighted sum reads them in place, on the compute stream, before the
        # next call can write there (its barrier(0) follows on the same stream)
        self.copy_out = torch.is_grad_enabled()
        self._row_bytes = Hd * dtype.itemsize
        # the copy transport's pulls (source rank, row in its routing order, row in recv, rows),
        # grouped by local expert: each expert's flag follows its own blocks
        ends = plan.expert_ends()
        self._blocks: list[list[tuple[int, int, int, int]]] = [[] for _ in range(plan.E_l)]
        j = 0
        for block in plan.dispatch_pulls(0):
            while block[2] >= ends[j]:  # past expert j's rows in recv (empty experts skipped)
                j += 1
            self._blocks[j].append(block)

    @staticmethod
    def rows_needed(plan: ExchangePlan) -> int:
        return 2 * max(plan.M)  # [ xs | ybuf ]

    def _addresses(self) -> list[int]:
        return [self.ws.data_ptr(r) for r in range(self.plan.W)]

    # -- forward -------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, x: torch.Tensor, row_to_token: torch.Tensor, gathered: bool) -> list[torch.Tensor]:
        p, me, row = self.plan, self.plan.me, self._row_bytes
        recv = torch.empty(sum(p.recv_splits[0]), self.Hd, dtype=self.dtype, device=self.device)
        self.recvs = [recv]
        if not gathered:
            torch.index_select(x, 0, row_to_token.long(), out=self._rows(me, 0, p.M[me]))
        ws, to = self._addresses(), recv.data_ptr()
        compute = torch.cuda.current_stream() if self.cuda else None
        for blocks in self._blocks:  # my own rows for my experts: an SM copy, before any spin
            for s, src, dst, n in blocks:
                if s == me:
                    memops.copy(to + dst * row, ws[me] + src * row, n * row, compute)
        self.ws.barrier(0)  # every xs written, every ybuf free (the compute stream: see the module docstring)
        ready = self.flags[0]
        if self.cuda:
            started = torch.cuda.Event()
            started.record()
            for stream in (self.dispatch_stream, self.combine_stream):
                stream.wait_event(started)
            for t in (recv, ready):
                t.record_stream(self.dispatch_stream)
        # every peer's rows for every local expert, then that expert's flag: on the GPU the
        # dispatch stream's copy engines and memory ops; on the CPU now, in order
        for j, blocks in enumerate(self._blocks):
            for s, src, dst, n in blocks:
                if s != me:
                    memops.copy(to + dst * row, ws[s] + src * row, n * row, self.dispatch_stream)
            memops.write_value32(ready.data_ptr() + 4 * j, 1, self.dispatch_stream)
        return self.recvs

    def wait_dispatch(self, g: int) -> None:
        """Nothing: the up GEMM's programs wait for their expert's flag."""

    @torch.no_grad()
    def publish(self, g: int, y_sorted: torch.Tensor) -> None:
        """The experts are issued (``y_sorted`` in recv's order): per local expert, once its
        outputs are stored, push each source's block to that source's ybuf (the pulls
        reversed: the block at ``dst`` of recv goes to row ``src`` of the source's ybuf).
        The blocks for this rank go last: a copy within one GPU needs an SM, which the down
        GEMM holds to its last wave, and would hold up every push queued behind it."""
        p, me, row = self.plan, self.plan.me, self._row_bytes
        _, done = self.flags
        if self.cuda:
            for t in (y_sorted, done):
                t.record_stream(self.combine_stream)
        ws, frm, mine = self._addresses(), y_sorted.data_ptr(), []
        for j, blocks in enumerate(self._blocks):
            expected = p.total[p.me * p.E_l + j] * self.Hd  # the rows local expert j receives, times Hd
            if expected == 0:
                continue
            if self.cuda:
                memops.wait_value32_geq(done.data_ptr() + 4 * j, expected, self.combine_stream)
            elif int(done[j]) != expected:
                raise RuntimeError(f"flags transport: local expert {j}'s GEMM counted {int(done[j])} output "
                                   f"elements, expected {expected}")
            for s, src, dst, n in blocks:
                push = (ws[s] + (p.M[s] + src) * row, frm + dst * row, n * row)
                if s == me:
                    mine.append(push)
                else:
                    memops.copy(*push, self.combine_stream)
        for push in mine:
            memops.copy(*push, self.combine_stream)

    def finish(self) -> torch.Tensor:
        """This rank's outputs ``[M, Hd]`` in routing order once every rank has pushed
        (barrier(1)): copied out of ybuf when autograd keeps them (:attr:`copy_out`), else
        ybuf itself, which the next call overwrites only after the compute stream has read it."""
        me, M = self.plan.me, self.plan.M[self.plan.me]
        with self._on(self.combine_stream):
            self.ws.barrier(1)
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.combine_stream)
            torch.cuda.current_stream().wait_stream(self.dispatch_stream)
        ybuf = self._rows(me, M, M)
        self.recvs = None
        return ybuf.clone() if self.copy_out else ybuf

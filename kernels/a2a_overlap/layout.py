"""Where every row of ``moe_ffn_ep`` goes: splits and offsets from all ranks' routing counts.

``counts[s][e]`` is the number of rows rank s sends to expert e (rank ``e // E_l``, local
expert ``e % E_l``); chunk g holds local experts ``bounds[g]:bounds[g+1]`` of every rank.

- NCCL transport: rank s's rows in chunk-major order (chunk g, then destination rank r, then
  expert; ``api._chunk_major``), so each (chunk, rank) is one block of an all-to-all; rank r
  receives chunk g source-major.
- Copy transport: rank s's rows stay in routing order (sorted by expert e), so each (rank,
  expert) is one block; rank r pulls its chunk-g rows expert-major, source-minor, the order
  its experts run them in (``y_sorted``), and the outputs are pulled back block by block.
"""
from __future__ import annotations

from itertools import accumulate


class ExchangePlan:
    """Every split and offset of one call, for rank ``me`` (host-side integers only)."""

    def __init__(self, counts: list[list[int]], me: int, E_l: int, bounds: list[int]):
        # host time between the call's one sync and its first pulls: prefix sums, not nested sums
        W, C = len(counts), len(bounds) - 1
        self.W, self.C, self.me, self.E_l, self.bounds, self.counts = W, C, me, E_l, bounds, counts
        # e_off[s][e]: start of expert e's rows in rank s's routing order (e_off[s][E] = M_s)
        self.e_off = [[0, *accumulate(c)] for c in counts]
        self.M = [off[-1] for off in self.e_off]
        # n[s][g][r]: rows s sends to r in chunk g
        n = [[[off[r * E_l + bounds[g + 1]] - off[r * E_l + bounds[g]] for r in range(W)] for g in range(C)]
             for off in self.e_off]
        self.send_splits = n[me]  # [C][W]
        self.recv_splits = [[n[s][g][me] for s in range(W)] for g in range(C)]  # [C][W]
        # total[e]: rows expert e receives from all ranks; before_me[e]: from ranks before this one
        columns = list(zip(*counts))
        self.total = [sum(col) for col in columns]
        self.before_me = [sum(col[:me]) for col in columns]
        t_off = [0, *accumulate(self.total)]
        # R[r][g]: rows r receives in chunk g; y_start[r][g]: where they sit in r's workspace,
        # after r's own rows: [ xs_r (M_r rows) | chunk 0 | chunk 1 | ... ]
        self.R = [[t_off[r * E_l + bounds[g + 1]] - t_off[r * E_l + bounds[g]] for g in range(C)] for r in range(W)]
        self.y_start = [[self.M[r] + before for before in accumulate(self.R[r], initial=0)][:C] for r in range(W)]
        self.rows_needed = max(self.M[r] + sum(self.R[r]) for r in range(W))

    def _local(self, j: int) -> int:
        return self.me * self.E_l + j

    def send_blocks(self, g: int) -> list[tuple[int, int]]:
        """(start, rows) in this rank's routing order of its chunk-g rows for each rank r."""
        b0 = self.bounds[g]
        return [(self.e_off[self.me][r * self.E_l + b0], self.send_splits[g][r]) for r in range(self.W)]

    def dispatch_pulls(self, g: int):
        """(source rank, row in its workspace, row in recv_g, rows), nonempty: chunk g's rows
        expert-major, source-minor."""
        c, dst = self.counts, 0
        for j in range(self.bounds[g], self.bounds[g + 1]):
            e = self._local(j)
            for s in range(self.W):
                if c[s][e]:
                    yield s, self.e_off[s][e], dst, c[s][e]
                dst += c[s][e]

    def combine_pulls(self, g: int):
        """(owner rank r, row in r's workspace, row in this rank's routing order, rows),
        nonempty: for each of r's chunk-g experts e, the outputs of the rows this rank sent to e
        (r holds them expert-major, source-minor from ``y_start[r][g]``)."""
        mine = self.counts[self.me]
        for r in range(self.W):
            src = self.y_start[r][g]
            for j in range(self.bounds[g], self.bounds[g + 1]):
                e = r * self.E_l + j
                if mine[e]:  # after the rows of expert e from ranks before this one
                    yield r, src + self.before_me[e], self.e_off[self.me][e], mine[e]
                src += self.total[e]

    def expert_ends(self) -> list[int]:
        """For each local expert j: the end of its rows in its chunk's receive buffer (the
        grouped GEMM's offsets of chunk g are entries ``bounds[g]:bounds[g+1]``)."""
        ends = []
        for g in range(self.C):
            ends += accumulate(self.total[self._local(j)] for j in range(self.bounds[g], self.bounds[g + 1]))
        return ends

"""The expert-parallel exchange plan (kernels.a2a_overlap.layout): on random routing counts,
every rank's pulls, simulated on plain lists, deliver exactly the rows the all-to-all
definition says, in the order the experts and the combine expect. Also the schedule's config
rules for the transport."""
import random

import pytest

from kernels.a2a_overlap import schedule
from kernels.a2a_overlap.layout import ExchangePlan


def _cases():
    rng = random.Random(0)
    for W, E_l, C in ((2, 3, 1), (2, 3, 2), (3, 4, 3), (4, 2, 2), (4, 5, 2), (8, 3, 3)):
        counts = [[rng.choice([0, 0, 1, 2, 5, 9]) for _ in range(W * E_l)] for _ in range(W)]
        counts[0] = [0] * (W * E_l)  # a rank that sends nothing
        for s in range(W):  # the last rank's first expert receives nothing
            counts[s][(W - 1) * E_l] = 0
        yield W, E_l, C, counts


@pytest.mark.parametrize("W, E_l, C, counts", list(_cases()))
def test_pulls_deliver_every_row_once_in_expert_order(W, E_l, C, counts):
    bounds = [g * E_l // C for g in range(C + 1)]
    plans = [ExchangePlan(counts, r, E_l, bounds) for r in range(W)]
    # rank s's rows in routing order: (source s, expert e, index within the block)
    xs = [[(s, e, i) for e in range(W * E_l) for i in range(counts[s][e])] for s in range(W)]
    ws = []  # each rank's workspace: its rows, then its received chunks (filled below)
    for r, p in enumerate(plans):
        assert p.M[r] == len(xs[r]) and p.rows_needed >= p.M[r] + sum(p.R[r])
        ws.append(xs[r] + [None] * (p.rows_needed - p.M[r]))
    # dispatch: rank r pulls chunk g expert-major, source-minor
    recv = {}
    for r, p in enumerate(plans):
        for g in range(C):
            buf = [None] * sum(p.recv_splits[g])
            for s, src, dst, rows in p.dispatch_pulls(g):
                assert rows > 0 and src + rows <= p.M[s]
                assert all(v is None for v in buf[dst:dst + rows])  # no row written twice
                buf[dst:dst + rows] = ws[s][src:src + rows]
            want = [(s, r * E_l + j, i) for j in range(bounds[g], bounds[g + 1])
                    for s in range(W) for i in range(counts[s][r * E_l + j])]
            assert buf == want
            assert p.recv_splits[g] == [sum(1 for v in want if v[0] == s) for s in range(W)]
            assert [plans[s].send_splits[g][r] for s in range(W)] == p.recv_splits[g]
            assert p.expert_ends()[bounds[g]:bounds[g + 1]] == [
                sum(1 for v in want if v[1] < r * E_l + j + 1) for j in range(bounds[g], bounds[g + 1])]
            recv[r, g] = buf
            ws[r][p.y_start[r][g]:p.y_start[r][g] + len(buf)] = buf  # the experts' outputs, same order
    # combine: every rank gets each of its rows back, in its routing order
    for r, p in enumerate(plans):
        back = [None] * p.M[r]
        for g in range(C):
            for owner, src, dst, rows in p.combine_pulls(g):
                assert all(v is None for v in back[dst:dst + rows])
                back[dst:dst + rows] = ws[owner][src:src + rows]
        assert back == xs[r]
        # the splits of the NCCL transport and of the copy transport's backward agree
        assert [sum(b[1] for b in p.send_blocks(g)) for g in range(C)] == [sum(s) for s in p.send_splits]
        for g in range(C):
            for dest, (start, rows) in enumerate(p.send_blocks(g)):
                assert {v[1] // E_l for v in xs[r][start:start + rows]} <= {dest}


def test_transport_config_rules():
    assert schedule.valid_config({"num_chunks": 2, "comm_ctas": 16})  # written before transports: NCCL
    assert schedule.valid_config({"num_chunks": 2, "comm_ctas": 0, "transport": "copy"})
    assert not schedule.valid_config({"num_chunks": 2, "comm_ctas": 16, "transport": "copy"})
    assert not schedule.valid_config({"num_chunks": 2, "comm_ctas": 0, "transport": "smoke"})
    assert schedule.valid_config({"num_chunks": 1, "comm_ctas": 0, "transport": "flags"})
    assert not schedule.valid_config({"num_chunks": 2, "comm_ctas": 0, "transport": "flags"})  # unchunked only
    assert not schedule.valid_config({"num_chunks": 1, "comm_ctas": 8, "transport": "flags"})


def test_flags_counter_limit_raises_on_every_rank():
    """The flags transport counts an expert's output elements in int32. An expert past that
    limit makes EVERY rank raise (before any collective), not only its owner, so no rank
    waits at a barrier the others never reach."""
    import torch

    from kernels.a2a_overlap.flags_exchange import COUNTER_LIMIT, FlagsExchange

    W, E_l, Hd = 2, 2, 8
    counts = [[1] * (W * E_l) for _ in range(W)]
    counts[1][3] = COUNTER_LIMIT // Hd  # rank 1's local expert 1 receives too many rows
    for me in range(W):
        with pytest.raises(ValueError, match="expert 3 receives"):
            FlagsExchange(ExchangePlan(counts, me, E_l, [0, E_l]), None, torch.device("cpu"), Hd, torch.float32)

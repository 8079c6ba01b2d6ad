"""Probe (not committed code): copy-engine pulls over torch symmetric memory vs NCCL, and how much
each slows the local experts' GEMMs when run beside them. python .dev/ce_probe.py W T"""
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def ev():
    return torch.cuda.Event(enable_timing=True)


def rank_main(rank, W, T, port, out):
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=120), device_id=dev)
    import torch.distributed._symmetric_memory as symm
    from autotune.ep_bench import MINIMAX, _inputs, _serial_parts
    from kernels.moe_gemm import route

    log = {"rank": rank, "W": W, "T": T}
    try:
        log["symm_backend"] = str(symm.get_backend(dev))
    except Exception as e:  # noqa: BLE001
        log["symm_backend"] = repr(e)
    inp = _inputs(T, MINIMAX, rank, f"cuda:{rank}", torch.bfloat16, W)
    with torch.no_grad():
        comm, compute = _serial_parts(inp, MINIMAX, W)
        E_l = MINIMAX["E"] // W
        rt = route(inp["logits"], 2)
        cnt = rt.counts.view(W, E_l).sum(-1).to(torch.int64)  # rows this rank sends to r
        allc = torch.empty(W, W, dtype=torch.int64, device=dev)
        dist.all_gather_into_tensor(allc, cnt)
        allc = allc.tolist()  # allc[s][r] rows s sends to r
        Hd = MINIMAX["Hd"]
        M = sum(allc[rank])
        maxM = max(sum(r) for r in allc)
        t0 = time.perf_counter()
        buf = symm.empty(maxM * Hd, dtype=torch.bfloat16, device=dev)
        hdl = symm.rendezvous(buf, dist.group.WORLD)
        log["rendezvous_s"] = time.perf_counter() - t0
        xs = buf[: M * Hd].view(M, Hd)
        torch.index_select(inp["x"], 0, rt.row_to_token.long(), out=xs)
        hdl.barrier(channel=0)
        torch.cuda.synchronize()
        R = sum(allc[s][rank] for s in range(W))
        recv = torch.empty(R, Hd, dtype=torch.bfloat16, device=dev)
        side = torch.cuda.Stream()
        peers = []
        ro = 0
        for s in range(W):
            so = sum(allc[s][:rank])  # offset of rank's block in s's xs
            n = allc[s][rank]
            peers.append((hdl.get_buffer(s, (n, Hd), torch.bfloat16, so * Hd), recv[ro: ro + n]))
            ro += n

        def pull():
            for src, dst in peers:
                dst.copy_(src)

        # correctness vs NCCL
        pull(); torch.cuda.synchronize()
        send, rs = cnt.tolist(), [allc[s][rank] for s in range(W)]
        ref = torch.empty_like(recv)
        dist.all_to_all_single(ref, xs.contiguous(), rs, send)
        torch.cuda.synchronize()
        log["pull_equal_nccl"] = bool(torch.equal(ref, recv))
        log["bytes_pulled_from_peers"] = sum(allc[s][rank] for s in range(W) if s != rank) * Hd * 2

        def time_it(fn, reps=10, stream=None):
            fn(); torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                dist.barrier(); torch.cuda.synchronize()
                a, b = ev(), ev()
                a.record(); fn(); b.record(); torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            return statistics.median(ts), min(ts), max(ts)

        log["pull_ms"] = time_it(pull)
        log["barrier_ms"] = time_it(lambda: hdl.barrier(channel=1))
        log["nccl_dispatch_ms"] = time_it(lambda: dist.all_to_all_single(ref, xs, rs, send))
        log["compute_ms"] = time_it(compute)

        # compute with N background pulls (copy engine) on a side stream
        def beside(bg, n):
            def fn():
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(n):
                        bg()
                a, b = ev(), ev()
                a.record(); compute(); b.record()
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                return a.elapsed_time(b)
            fn()
            ts = []
            for _ in range(6):
                dist.barrier(); torch.cuda.synchronize()
                ts.append(fn())
            return statistics.median(ts), min(ts), max(ts)

        for n in (1, 4, 12):
            log[f"compute_beside_{n}_pulls"] = beside(pull, n)

        ref2 = torch.empty_like(ref)

        def nccl_bg():
            dist.all_to_all_single(ref2, xs, rs, send, async_op=True)
        # NCCL on its own stream (async) beside compute
        def beside_nccl(n):
            def fn():
                works = []
                a, b = ev(), ev()
                for _ in range(n):
                    works.append(dist.all_to_all_single(ref2, xs, rs, send, async_op=True))
                a.record(); compute(); b.record()
                for w in works:
                    w.wait()
                torch.cuda.synchronize()
                return a.elapsed_time(b)
            fn()
            ts = []
            for _ in range(6):
                dist.barrier(); torch.cuda.synchronize()
                ts.append(fn())
            return statistics.median(ts), min(ts), max(ts)

        for n in (1, 4, 12):
            log[f"compute_beside_{n}_nccl"] = beside_nccl(n)
        # pull issued from the side stream of a high priority
        hp = torch.cuda.Stream(priority=-1)
        side = hp
        log["compute_beside_12_pulls_hp"] = beside(pull, 12)
        log["gpu"] = torch.cuda.get_device_name(dev)
        log["torch"] = torch.__version__
    with open(os.path.join(out, f"ce_W{W}_T{T}_r{rank}.json"), "w") as f:
        json.dump(log, f, indent=1)
    if rank == 0:
        print(json.dumps(log), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    W, T = int(sys.argv[1]), int(sys.argv[2])
    out = sys.argv[3] if len(sys.argv) > 3 else "."
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(rank_main, args=(W, T, port, out), nprocs=W)

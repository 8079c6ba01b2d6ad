"""Where does moe_ffn_ep's time go beyond comm + compute? Host and GPU timeline of one call
(2 GPUs, NCCL, MiniMax shapes) for the serial NCCL path and the flags transport: each phase
function is wrapped to record host perf_counter and a CUDA event (current stream) at entry
and exit. Prints rank 0's timeline (ms from the call's start): host time | GPU time.
Usage: PYTHONPATH=. python .dev/ep_phases_probe.py OUT.json T [T ...]"""
import json
import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp


def main_rank(rank, W, port, Ts, out):
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            device_id=torch.device("cuda", rank))
    from autotune.ep_bench import MINIMAX, _inputs
    from kernels.a2a_overlap import api, flags_exchange, moe_ffn_ep
    trace = []

    def wrap(obj, name, label):
        real = getattr(obj, name)

        def f(*a, **k):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            trace.append((label + ">", time.perf_counter(), ev))
            r = real(*a, **k)
            ev2 = torch.cuda.Event(enable_timing=True)
            ev2.record()
            trace.append(("<" + label, time.perf_counter(), ev2))
            return r
        setattr(obj, name, f)

    wrap(api, "route", "route")
    wrap(api, "_counts", "counts")
    wrap(api, "start_exchange", "start_exchange")
    wrap(api, "group_received", "group_received")
    wrap(api, "_experts", "experts")
    wrap(api.MoECombineFunction, "apply", "weighted_sum")
    wrap(flags_exchange.FlagsExchange, "start", "flags.start")
    wrap(flags_exchange.FlagsExchange, "publish", "flags.publish")
    wrap(flags_exchange.FlagsExchange, "finish", "flags.finish")
    res = {}
    with torch.no_grad():
        for T in Ts:
            inp = _inputs(T, MINIMAX, rank, f"cuda:{rank}", torch.bfloat16, W)
            for transport in ("nccl", "flags"):
                run = lambda: moe_ffn_ep(inp["x"], inp["logits"], inp["w_gate_up"], inp["w_down"], 2,  # noqa: E731
                                         num_chunks=1, transport=transport)
                for _ in range(3):
                    run()
                torch.cuda.synchronize()
                dist.barrier()
                rows = []
                for rep in range(3):
                    trace.clear()
                    torch.cuda.synchronize()
                    dist.barrier()
                    st = torch.cuda.Event(enable_timing=True)
                    st.record()
                    h0 = time.perf_counter()
                    run()
                    en = torch.cuda.Event(enable_timing=True)
                    en.record()
                    h1 = time.perf_counter()
                    torch.cuda.synchronize()
                    rows.append({"total_gpu_ms": round(st.elapsed_time(en), 3), "host_ms": round(1e3 * (h1 - h0), 3),
                                 "phases": [(lab, round(1e3 * (h - h0), 3), round(st.elapsed_time(ev), 3))
                                            for lab, h, ev in trace]})
                res[f"{transport}_T{T}"] = rows
                # one call under the profiler: host syncs (cudaStreamSynchronize, cudaMemcpy DtoH) and op host times
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    run()
                    torch.cuda.synchronize()
                if rank == 0:
                    with open(out.replace(".json", f"_{transport}_T{T}_profile.txt"), "w") as f:
                        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60))
                    prof.export_chrome_trace(out.replace(".json", f"_{transport}_T{T}_trace.json"))
    if rank == 0:
        json.dump(res, open(out, "w"), indent=1)
        for k, rows in res.items():
            r = rows[-1]
            print(k, "gpu", r["total_gpu_ms"], "host", r["host_ms"], [x for x in r["phases"]], flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    out, Ts = sys.argv[1], [int(t) for t in sys.argv[2:]]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(main_rank, args=(2, port, Ts, out), nprocs=2)

"""Expert-parallel overlap: benchmark and tune ``moe_ffn_ep`` on all GPUs of this machine.

    python -m autotune.ep_bench                          # MiniMax shapes, 4K..32K tokens per rank
    python -m autotune.ep_bench --tokens 4096,16384 --chunks 1,2,4 --comm-ctas 0,16
    python -m autotune.ep_bench --cpu --world 2          # gloo + interpreter, tiny: pipeline only

One process per GPU (NCCL). For each token count per rank T, on the same routed inputs (E=32,
top-2, hidden 6144, expert hidden 9216, bf16, random router logits), every rank times:

- ``comm``: the dispatch and the combine all-to-all of the serial schedule, nothing else;
- ``compute``: the local experts on the rows the dispatch delivered (the grouped GEMMs with
  the gather and SwiGLU fused in; the sort by expert is done outside the timed region);
- ``compute_grouped``: the same GEMMs on those rows already sorted by expert (no gather: the
  up GEMM loads them through TMA), as the copy and flags transports deliver them;
- ``serial``: ``moe_ffn_ep`` with one chunk (exchange, experts, exchange back);
- ``chunks{C}-ctas{K}``: the overlap schedule with C chunks (groups of local experts, C <= E/W;
  larger C are skipped) and NCCL limited to K CTAs (K = 0: NCCL's own choice);
- ``copy-chunks{C}``: the same schedule on the copy transport (copy engines pulling from the
  peers' symmetric-memory workspaces; ``kernels/a2a_overlap/copy_exchange.py``).
- ``flags``: the flags transport (no chunks; the GEMMs wait on and signal per-expert flags
  beside the copy engines; ``kernels/a2a_overlap/flags_exchange.py``). Its experts' span
  starts at the launch, so it includes the up GEMM's wait for expert 0's rows.

A time is the median over repetitions of the slowest rank's CUDA-event time (the ranks
all-reduce each repetition's time with MAX). Repetitions are interleaved: repetition r runs
comm, compute and every schedule once each, so drift during the run (clocks, temperature)
does not favour whichever was measured first. Every candidate's output is checked against the
serial schedule's (relative error <= 1e-2, bf16) before it is timed and before it may win. The
fastest checked schedule per T is ``ours``; fraction of the communication hidden = (serial -
ours) / comm. Each schedule is also run 5 more times (interleaved too) with CUDA events around
every chunk's experts (the local GEMMs, inside the schedule, while the exchanges of other
chunks run beside them): the experts' own time under overlap, whose slowdown against
``compute`` is the second number issue 6 bounds (``expert_slowdown`` = experts under overlap
/ compute - 1, where compute is ``compute_grouped`` for the copy and flags transports, whose
experts run the ungathered GEMMs, and ``compute`` for NCCL). Because chunked GEMMs can run
faster than serial's one launch, (serial - ours) / comm can pass 100%;
``hidden_outside_experts`` (see :func:`summarise`) subtracts each schedule's own experts time
first and is the stricter number.

Every rank samples its GPU's SM clock, power and throttle reasons (NVML) while a token count
is timed; rank 0's summary is each results line's ``telemetry`` (the GPU its ``gpu`` names),
every rank's is in ``extra["telemetry_by_rank"]``. Under the
power cap back-to-back GEMMs run at lower clocks than GEMMs with gaps between them, so the
experts' time moves with the schedule's idle time as well as with interference.

As soon as a token count is done, rank 0 appends its measurements to
``<results>/moe_ffn_ep.jsonl`` (one schema, ``profiling.results``) and merges its winner into
``<config root>/<gpu-slug>/moe_ffn_ep.json`` (a killed run keeps every finished T),
keyed by ``kernels.a2a_overlap.schedule.bucket_key`` (world size, shapes, dtype, T), the file
``moe_ffn_ep(num_chunks=None)`` reads. This is the autotuner's exhaustive strategy for a
multi-process kernel: the single-process engine (``autotune.runner``) cannot run collectives.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

MINIMAX = {"E": 32, "Hd": 6144, "F": 9216, "top_k": 2}
TINY = {"E": 4, "Hd": 32, "F": 16, "top_k": 2}
TOLERANCE = 1e-2


def _parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slowest(times: dict[str, list[float]], device: str) -> dict[str, list[float]]:
    """Each repetition's time on the slowest rank (one all-reduce MAX for all closures)."""
    import torch.distributed as dist

    names = list(times)
    t = torch.tensor([times[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(names, t.tolist()))


class _Timer:
    """Times of several closures, INTERLEAVED: repetition r runs every closure once, in the
    same order on every rank, so slow drift (clocks, temperature) falls on all of them alike
    rather than on whichever ran last. Each time is the slowest rank's for that repetition."""

    def __init__(self, device: str, reps: int):
        self.cuda, self.reps, self.device = device.startswith("cuda"), reps, device

    def _once(self, fn) -> float:
        import torch.distributed as dist

        dist.barrier()
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def __call__(self, fns: dict) -> dict[str, list[float]]:
        for fn in fns.values():
            fn()  # warm-up: compiles, communicators, workspaces
        times = {name: [] for name in fns}
        for _ in range(self.reps):
            for name, fn in fns.items():
                times[name].append(self._once(fn))
        return _slowest(times, self.device)


class _ExpertClock:
    """The experts' own time inside ``moe_ffn_ep``: events around every call of
    ``api._experts`` (the grouped GEMMs) on the compute stream, summed per call of a schedule,
    slowest rank per repetition; schedules interleaved as in :class:`_Timer`. Each chunk's
    start event follows its dispatch wait, so a span is the GEMMs' time with whatever else
    (other chunks' exchanges) runs beside them."""

    def __init__(self, device: str, reps: int = 5):
        self.cuda, self.reps, self.device = device.startswith("cuda"), reps, device

    def __call__(self, fns: dict) -> dict[str, list[float]]:
        from kernels.a2a_overlap import api

        real, spans = api._experts, []

        def timed(*args, **kwargs):
            if not self.cuda:
                t = time.perf_counter()
                out = real(*args, **kwargs)
                spans.append((time.perf_counter() - t) * 1e3)
                return out
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = real(*args, **kwargs)
            end.record()
            spans.append((start, end))
            return out

        totals = {name: [] for name in fns}
        api._experts = timed
        try:
            for _ in range(self.reps):
                for name, fn in fns.items():
                    spans.clear()
                    fn()
                    if self.cuda:
                        torch.cuda.synchronize()
                        totals[name].append(sum(s.elapsed_time(e) for s, e in spans))
                    else:
                        totals[name].append(sum(spans))
        finally:
            api._experts = real
        return _slowest(totals, self.device)


def _inputs(T: int, dims: dict, rank: int, device: str, dtype: torch.dtype, W: int) -> dict:
    g = torch.Generator().manual_seed(1000 + rank)
    E_l = dims["E"] // W
    return {
        "x": torch.randn(T, dims["Hd"], generator=g).to(device, dtype),
        "logits": torch.randn(T, dims["E"], generator=g).to(device),
        "w_gate_up": (torch.randn(E_l, dims["Hd"], 2 * dims["F"], generator=g) * dims["Hd"] ** -0.5).to(device, dtype),
        "w_down": (torch.randn(E_l, dims["F"], dims["Hd"], generator=g) * dims["F"] ** -0.5).to(device, dtype),
    }


def _serial_parts(inp: dict, dims: dict, W: int):
    """(comm(), compute(), compute_grouped()) closures on the serial schedule's routed rows
    (one chunk)."""
    import torch.distributed as dist

    from kernels.a2a_overlap.api import _experts
    from kernels.a2a_overlap.exchange import start_exchange
    from kernels.moe_gemm import route
    from kernels.moe_gemm.routing import group_received

    E_l = dims["E"] // W
    rt = route(inp["logits"], dims["top_k"])
    send_counts = rt.counts.view(W, E_l).to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts.view(-1), send_counts.contiguous().view(-1))
    send, recv_splits = send_counts.sum(-1).tolist(), recv_counts.sum(-1).tolist()
    xs = inp["x"][rt.row_to_token.long()]
    recv = start_exchange(xs, send, recv_splits, None, "dispatch").wait()
    perm, inv, ends = group_received(recv_counts)  # the rows' order for the experts, outside the timed region
    order = perm, inv, ends.to(torch.int32)
    grouped = recv[perm]  # the rows as the copy transports deliver them

    def comm():
        back = start_exchange(xs, send, recv_splits, None, "dispatch").wait()
        return start_exchange(back, recv_splits, send, None, "combine").wait()

    def compute():
        return _experts(recv, inp["w_gate_up"], inp["w_down"], *order)

    def compute_grouped():
        return _experts(grouped, inp["w_gate_up"], inp["w_down"], None, None, order[2])

    return comm, compute, compute_grouped


def _rank_main(rank: int, W: int, port: int, args: argparse.Namespace, outdir: str) -> None:
    try:
        import torch.distributed as dist

        cpu = args.cpu
        if cpu:
            os.environ["TRITON_INTERPRET"] = "1"
            device, backend, dtype = "cpu", "gloo", torch.float32
        else:
            torch.cuda.set_device(rank)
            device, backend, dtype = f"cuda:{rank}", "nccl", torch.bfloat16
        kwargs = {} if cpu else {"device_id": torch.device("cuda", rank)}
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                                timeout=datetime.timedelta(seconds=args.timeout), **kwargs)
        from autotune.worker import rel_error
        from kernels.a2a_overlap import moe_ffn_ep
        from profiling import TelemetrySampler

        dims = TINY if cpu else MINIMAX
        started = time.perf_counter()
        timer = _Timer(device, args.reps)
        experts_clock = _ExpertClock(device)
        rows = []
        candidates = [(C, K, "nccl") for C in args.chunks for K in args.comm_ctas
                       if C <= dims["E"] // W and (C, K) != (1, 0) and "nccl" in args.transports]
        candidates += [(C, 0, "copy") for C in args.chunks if C <= dims["E"] // W and "copy" in args.transports]
        candidates += [(1, 0, "flags")] if "flags" in args.transports else []
        with torch.no_grad():
            for T in args.tokens:
                inp = _inputs(T, dims, rank, device, dtype, W)
                run = lambda C, K, X="nccl": moe_ffn_ep(inp["x"], inp["logits"], inp["w_gate_up"],  # noqa: E731
                                                        inp["w_down"], dims["top_k"], num_chunks=C, comm_ctas=K,
                                                        transport=X)
                comm, compute, compute_grouped = _serial_parts(inp, dims, W)
                serial_out = run(1, 0)
                schedules = {"serial": ({"num_chunks": 1, "comm_ctas": 0, "transport": "nccl"}, None)}
                for C, K, X in candidates:  # each checked against serial before it is timed
                    err = torch.tensor([rel_error(run(C, K, X), serial_out)], dtype=torch.float64, device=device)
                    dist.all_reduce(err, op=dist.ReduceOp.MAX)
                    name = {"nccl": f"chunks{C}-ctas{K}", "copy": f"copy-chunks{C}", "flags": "flags"}[X]
                    schedules[name] = ({"num_chunks": C, "comm_ctas": K, "transport": X}, err.item())
                calls = {name: (lambda c=config: run(c["num_chunks"], c["comm_ctas"], c["transport"]))
                         for name, (config, _) in schedules.items()}
                # every rank samples its GPU's clocks, power and throttle reasons while timing:
                # under the power cap, back-to-back GEMMs ("compute", serial) run at lower SM
                # clocks than GEMMs with gaps between them (the chunked schedules)
                with TelemetrySampler(index=rank) as sampler:
                    times = timer({"comm": comm, "compute": compute, "compute_grouped": compute_grouped, **calls})
                    experts = experts_clock(calls)
                telemetry = [None] * W
                dist.all_gather_object(telemetry, sampler.summary())
                rows.append({"T": T, "name": "comm", "times": times["comm"]})
                rows.append({"T": T, "name": "compute", "times": times["compute"]})
                rows.append({"T": T, "name": "compute_grouped", "times": times["compute_grouped"]})
                for name, (config, err) in schedules.items():
                    rows.append({"T": T, "name": name, "config": config, "times": times[name],
                                 "experts_times": experts[name], **({} if err is None else {"rel_err": err})})
                if rank == 0:
                    # each T is saved (results lines, config entry) as soon as it is measured:
                    # a run that is killed keeps every T it finished
                    print(f"T={T}: " + ", ".join(f"{r['name']} {statistics.median(r['times']):.3f} ms"
                                                 for r in rows if r["T"] == T), flush=True)
                    _save({"rows": [r for r in rows if r["T"] == T], "dims": dims, "dtype": str(dtype).removeprefix("torch."),
                           "W": W, "telemetry": {f"rank{r}": t for r, t in enumerate(telemetry) if t}},
                          args, time.perf_counter() - started)
                del inp
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def summarise(rows: list[dict]) -> dict[int, dict]:
    """Per T: the medians, the fastest checked schedule (``ours``), the fraction hidden, the
    experts' slowdown under ``ours`` (None without an experts clock), and the fraction hidden
    outside the experts (None without an experts clock on both serial and ours).

    ``hidden`` is issue 6's (serial - ours) / comm. It also credits ``ours`` with any change
    in the experts' own speed: chunked GEMMs that run faster than serial's one launch (other
    configs, other clocks under the power cap) push it past 100%. ``hidden_outside_experts``
    = ((serial - its experts) - (ours - its experts)) / comm compares only the time each
    schedule spends outside its experts' GEMMs (communication, waits, routing, copies), so
    the experts' speed cancels; their slowdown is reported apart (``expert_slowdown``),
    against the GEMMs alone on the same path: ``compute_grouped`` (no gather) for the copy and
    flags transports when it was measured, else ``compute``."""
    out = {}
    for T in sorted({r["T"] for r in rows}):
        at_T = {r["name"]: r for r in rows if r["T"] == T}
        med = {name: statistics.median(r["times"]) for name, r in at_T.items()}
        experts_of = {name: statistics.median(r["experts_times"]) for name, r in at_T.items() if r.get("experts_times")}
        checked = [r for r in at_T.values() if "config" in r and r.get("rel_err", 0.0) <= TOLERANCE]
        best = min(checked, key=lambda r: statistics.median(r["times"]))
        ours, experts = med[best["name"]], experts_of.get(best["name"])
        outside = None
        if med["comm"] > 0 and experts is not None and "serial" in experts_of:
            outside = ((med["serial"] - experts_of["serial"]) - (ours - experts)) / med["comm"]
        grouped = best["config"].get("transport") in ("copy", "flags") and "compute_grouped" in med
        alone = med["compute_grouped"] if grouped else med["compute"]
        out[T] = {"medians": med, "best": best, "ours_ms": ours, "experts_ms": experts,
                  "serial_experts_ms": experts_of.get("serial"),
                  "hidden": (med["serial"] - ours) / med["comm"] if med["comm"] > 0 else None,
                  "hidden_outside_experts": outside,
                  "experts_alone_ms": alone,
                  "expert_slowdown": experts / alone - 1.0 if experts is not None else None}
    return out


def _save(result: dict, args: argparse.Namespace, wall_s: float) -> None:
    """Results lines for every measurement (rank 0's view: slowest rank per repetition) and
    the winners into the config file."""
    import numpy as np

    from autotune import writer
    from kernels.a2a_overlap import schedule
    from profiling import Record, append_records, gpu_identity, versions

    rows, dims, W = result["rows"], result["dims"], result["W"]
    dtype = getattr(torch, result["dtype"])
    identity = None if args.cpu else gpu_identity(0)
    summary = summarise(rows)
    records, entries = [], []
    for r in rows:
        t = np.array(r["times"])
        shape = {"W": W, **dims, "T": r["T"]}
        provider = "ours" if r is summary[r["T"]]["best"] else r["name"]
        extra = {"name": r["name"], "reps": len(t), "rel_err_vs_serial": r.get("rel_err"),
                 "telemetry_by_rank": result.get("telemetry", {}),
                 "experts_ms": statistics.median(r["experts_times"]) if r.get("experts_times") else None,
                 "chunks_split": "experts", "timing_meaningful": not args.cpu}
        if provider == "ours" or r["name"] == "serial":
            extra.update(hidden_fraction=summary[r["T"]]["hidden"], expert_slowdown=summary[r["T"]]["expert_slowdown"],
                         hidden_outside_experts=summary[r["T"]]["hidden_outside_experts"])
        records.append(Record(
            kernel=schedule.KERNEL, provider=provider, mode="fwd", shape=shape, dtype=result["dtype"],
            config=r.get("config", {}), median_ms=float(np.median(t)), p20_ms=float(np.percentile(t, 20)),
            p80_ms=float(np.percentile(t, 80)), floor_ms=None, bytes=None, flops=None, x_name="T",
            x_value=r["T"], gpu={"name": identity.name, "slug": identity.slug, "driver": identity.driver} if identity else {},
            versions=versions(), telemetry=result.get("telemetry", {}).get("rank0", {}), extra=extra))
    for T, s in summary.items():
        ranked = sorted((r for r in rows if r["T"] == T and "config" in r and r.get("rel_err", 0.0) <= TOLERANCE),
                        key=lambda r: statistics.median(r["times"]))
        entries.append({
            "key": schedule.bucket_key(W, dims["E"], dims["Hd"], dims["F"], T, dtype), "config": s["best"]["config"],
            "median_ms": s["ours_ms"], "default_ms": s["medians"]["serial"], "comm_ms": s["medians"]["comm"],
            "compute_ms": s["medians"]["compute"], "compute_grouped_ms": s["medians"].get("compute_grouped"),
            "hidden_fraction": s["hidden"],
            "hidden_outside_experts": s["hidden_outside_experts"],
            "experts_ms": s["experts_ms"], "serial_experts_ms": s["serial_experts_ms"],
            "expert_slowdown": s["expert_slowdown"],
            "runner_up": ({"config": ranked[1]["config"], "median_ms": statistics.median(ranked[1]["times"])}
                          if len(ranked) > 1 else None),
            "candidates_tried": len(ranked), "strategy": "exhaustive",
        })
    append_records(records, Path(args.results) / f"{schedule.KERNEL}.jsonl")
    if args.cpu and args.out_dir is None:
        print("interpreter run: timings are meaningless; no config written (give --out-dir to write one)")
        return
    v = versions()
    meta = {"gpu": identity.name if identity else None, "device": "cpu (gloo, Triton interpreter)" if args.cpu else "cuda",
            "world_size": W, "driver": v["driver"], "torch": v["torch"], "triton": v["triton"], "cuda": v["cuda"],
            "python": v["python"], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "strategy": "exhaustive", "timing_meaningful": not args.cpu, "reps": args.reps, "wall_s": round(wall_s, 3)}
    root = Path(args.out_dir) if args.out_dir else None
    written = writer.write_configs(schedule.KERNEL, entries, meta, slug="cpu" if args.cpu else None, root=root)
    kept = f" (the {written.replaced.status} file it replaced is now {written.kept})" if written.kept else ""
    print(f"wrote {len(entries)} bucket(s) to {written.path}{kept}")
    for T, s in summary.items():
        m = s["medians"]
        print(f"T={T}: comm {m['comm']:.3f} ms, compute {m['compute']:.3f}, serial {m['serial']:.3f}, "
              f"ours {s['ours_ms']:.3f} ({s['best']['name']}): {_pct(s['hidden'], '.0f')} of comm hidden "
              f"({_pct(s['hidden_outside_experts'], '.0f')} outside the experts), experts "
              f"{s['experts_ms'] or float('nan'):.3f} ms under it ({_pct(s['expert_slowdown'], '+.1f')} vs "
              f"{s['experts_alone_ms']:.3f} alone; "
              f"serial's {s['serial_experts_ms'] or float('nan'):.3f})", flush=True)
    for rank, t in result.get("telemetry", {}).items():
        if "sm_clock_mhz" in t:
            clock, power = t["sm_clock_mhz"], t.get("power_w", {})
            print(f"  {rank}: SM clock {clock['min']}-{clock['max']} MHz (median {clock['median']}), power up to "
                  f"{power.get('max')} W, throttle reasons {t.get('throttle_reasons')}")


def _pct(value: float | None, spec: str) -> str:
    return "n/a" if value is None else f"{100 * value:{spec}}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autotune.ep_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=None, help="ranks (default: every GPU; 2 with --cpu)")
    parser.add_argument("--tokens", type=_parse_ints, default=None, help="tokens per rank, e.g. 4096,16384")
    parser.add_argument("--chunks", type=_parse_ints, default=[1, 2, 4, 8, 16], help="those above E/W are skipped")
    parser.add_argument("--comm-ctas", type=_parse_ints, default=[0, 8, 16, 32], help="NCCL maxCTAs; 0 = NCCL's choice")
    parser.add_argument("--transports", type=lambda t: [v for v in t.split(",") if v],
                        default=["nccl", "copy", "flags"],
                        help="nccl (all-to-all), copy (copy engines over symmetric memory), flags (copy engines "
                             "and per-expert flags under unchunked GEMMs)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--results", default="results", help="folder for moe_ffn_ep.jsonl")
    parser.add_argument("--out-dir", default=None, help="config root (default: $KWB_CONFIG_DIR or kernels/configs)")
    parser.add_argument("--timeout", type=float, default=120.0, help="process group timeout, seconds")
    parser.add_argument("--cpu", action="store_true", help="gloo + Triton interpreter at tiny shapes (pipeline only)")
    args = parser.parse_args(argv)
    W = args.world or (2 if args.cpu else torch.cuda.device_count())
    if W < 2:
        parser.error(f"needs 2 or more ranks (found {W} GPUs); --cpu runs on gloo")
    if not args.cpu and W > torch.cuda.device_count():
        parser.error(f"--world {W} exceeds the {torch.cuda.device_count()} GPUs here")
    from kernels.a2a_overlap.schedule import TRANSPORTS

    if not args.transports or set(args.transports) - set(TRANSPORTS):
        parser.error(f"--transports must list some of {TRANSPORTS}, got {args.transports}")
    args.tokens = args.tokens or ([3, 8] if args.cpu else [4096, 8192, 16384, 32768])
    if args.cpu:
        args.comm_ctas = [0]  # gloo has no SMs to limit: every K would time the same schedule
    import tempfile

    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, W, port, args, outdir)) for r in range(W)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        errors = [open(os.path.join(outdir, f)).read() for f in sorted(os.listdir(outdir)) if f.endswith(".err")]
        if errors or any(p.exitcode != 0 for p in procs):
            print("\n".join(errors) or f"exit codes {[p.exitcode for p in procs]}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sustained, interleaved timing of the grouped GEMMs (ours, torch._grouped_mm, dense) at E=32
up/down, 4K/16K tokens, random routing, fwd/dX/dW. Per (shape, mode): the GPU is first brought
to its power cap (1.5 s of the dense GEMM), then 3 rounds, each running the three providers
for 100 ms warm-up + 300 ms timed, so they see the same thermal state. Committed configs.
PYTHONPATH=. python results/raw/grouped_gemm_sustained_session8_probe.py OUT.json"""
import gc
import json
import statistics
import sys
import time

import torch

from autotune.moe import BENCH_SHAPES, GroupedGemmCase, gemm_flops
from profiling import TelemetrySampler, bench, versions

PROVIDERS = ("ours", "torch_grouped_mm", "dense")
out = {"versions": versions(), "gpu": torch.cuda.get_device_name(), "rows": []}
for s in (s for s in BENCH_SHAPES if s["routing"] == "random"):
    for mode in ("fwd", "dx", "dw"):
        cases = {p: GroupedGemmCase(s, mode, p) for p in PROVIDERS}
        t0 = time.time()
        while time.time() - t0 < 1.5:
            cases["dense"].call(0)
        torch.cuda.synchronize()
        times = {p: [] for p in PROVIDERS}
        clocks = {p: [] for p in PROVIDERS}
        for r in range(3):
            for p, c in cases.items():
                with TelemetrySampler() as smp:
                    times[p].append(bench(c.call, warmup_ms=100, rep_ms=300).median_ms)
                clocks[p].append(smp.summary().get("sm_clock_mhz", {}).get("median"))
        row = {"proj": s["proj"], "T": s["T"], "mode": mode, "providers": {}}
        for p in PROVIDERS:
            ms = statistics.median(times[p])
            row["providers"][p] = {"median_ms": round(ms, 4), "rounds": [round(x, 4) for x in times[p]],
                                   "sm_clock_median_by_round": clocks[p],
                                   "tflops": round(gemm_flops(cases[p].tshape) / ms / 1e9, 1)}
        o, g, d = (row["providers"][p] for p in PROVIDERS)
        row["ours_over_dense"] = round(d["median_ms"] / o["median_ms"], 4)
        out["rows"].append(row)
        json.dump(out, open(sys.argv[1], "w"), indent=1)
        print(f"{mode} {s['proj']} {s['T']}: ours {o['median_ms']:.3f} ({o['tflops']:.0f}) tgm {g['tflops']:.0f} dense {d['tflops']:.0f} "
              f"-> {100 * row['ours_over_dense']:.0f}% | ours {o['rounds']} dense {d['rounds']} clk {o['sm_clock_median_by_round']} / "
              f"{d['sm_clock_median_by_round']}", flush=True)
        del cases
        gc.collect()
        torch.cuda.empty_cache()

"""Probe (session 9, 1 H100; the kernel then had a module flag USE_TMA, since replaced by
tma_viewable): lightning forward with TMA descriptor loads/stores vs the committed pointer
loads, several configs; forward+backward at the default config both ways. H=64, D=E=128,
bf16, B=1 T=4K/16K/64K and B=8 T=4K. Per shape: 1.5 s heat, then 3 interleaved rounds of
100 ms warm-up + 300 ms timed. python results/raw/lightning_fwd_tma_probe.py OUT.json"""
import json, statistics, sys, time
import torch
from kernels.lightning_attn import forward as F, lightning_attn, minimax_slopes
from profiling import bench, versions

def c(BT, BV, w, s):
    return {"BT": BT, "BV": BV, "num_warps": w, "num_stages": s}
CFGS = {"64x64w4s3": c(64, 64, 4, 3), "64x64w4s4": c(64, 64, 4, 4), "64x64w4s2": c(64, 64, 4, 2),
        "64x32w4s3": c(64, 32, 4, 3), "64x32w4s2": c(64, 32, 4, 2), "64x64w8s3": c(64, 64, 8, 3)}
out = {"versions": versions(), "gpu": torch.cuda.get_device_name(), "rows": []}
H, D = 64, 128
s = minimax_slopes(H, 3, 8).cuda()
for B, T in ((1, 4096), (1, 16384), (1, 65536), (8, 4096)):
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    F.USE_TMA = False
    ref, _ = F.lightning_attn_fwd(q, k, v, s, 1.0, None, False, None, CFGS["64x64w4s3"])
    fns, check = {}, {}
    for tma in (False, True):
        for name, cfg in CFGS.items():
            key = ("tma_" if tma else "ptr_") + name
            F.USE_TMA = tma
            try:
                o, _ = F.lightning_attn_fwd(q, k, v, s, 1.0, None, False, None, cfg)
                torch.cuda.synchronize()
                check[key] = {"bitwise": bool(torch.equal(o, ref)), "max_abs": float((o.float() - ref.float()).abs().max())}
                fns[key] = (lambda tma, cfg: lambda i: (setattr(F, "USE_TMA", tma), F.lightning_attn_fwd(q, k, v, s, 1.0, None, False, None, cfg)))(tma, cfg)
            except Exception as e:  # noqa: BLE001
                check[key] = {"error": repr(e)[-300:]}
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    grads = {}
    for tma in (False, True):
        F.USE_TMA = tma
        o, _ = lightning_attn(qg, kg, vg, s)
        o.backward(do)
        grads[tma] = [x.grad.clone() for x in (qg, kg, vg)]
        for x in (qg, kg, vg): x.grad = None
        fns[("tma" if tma else "ptr") + "_fwdbwd"] = (lambda tma: lambda i: (setattr(F, "USE_TMA", tma), lightning_attn(qg, kg, vg, s)[0].backward(do)))(tma)
    check["fwdbwd_grads_equal"] = [bool(torch.equal(a, b)) for a, b in zip(grads[False], grads[True])]
    t0 = time.time()
    while time.time() - t0 < 1.5:
        fns["ptr_64x64w4s3"](0)
    times = {kk: [] for kk in fns}
    for r in range(3):
        for kk, fn in fns.items():
            times[kk].append(bench(fn, warmup_ms=100, rep_ms=300).median_ms)
    floor = 4 * B * T * H * D * 2 / 3.02e12 * 1e3
    row = {"B": B, "T": T, "floor_ms": round(floor, 4), "check": check,
           "times": {kk: {"median_ms": round(statistics.median(v), 4), "rounds": [round(x, 4) for x in v],
                          "x_floor": round(statistics.median(v) / floor, 3)} for kk, v in times.items()}}
    out["rows"].append(row)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
    print(B, T, json.dumps(check), flush=True)
    print("   ", " | ".join(f"{kk} {v['median_ms']:.4f} ({v['x_floor']})" for kk, v in row["times"].items()), flush=True)
    del q, k, v, do, qg, kg, vg, fns, grads
    torch.cuda.empty_cache()
F.USE_TMA = True

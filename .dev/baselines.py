import os, sys, json, itertools
import torch
from triton.testing import do_bench
sys.path.insert(0, os.getcwd())
from kernels.lightning_attn import minimax_slopes
from kernels.lightning_attn.forward import lightning_attn_fwd
from fla.ops.simple_gla import chunk_simple_gla
H, D = 64, 128
s = minimax_slopes(H, 3, 8).cuda()
for B, T in [(1, 4096), (1, 16384), (1, 65536), (8, 4096)]:
    n = 2 if B * T >= 32768 else 6
    ins = [tuple(torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)) for _ in range(n)]
    q, k, v = ins[0]
    of, _ = chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0)
    oo, _ = lightning_attn_fwd(q, k, v, s, 1.0, None, False, None)
    err = ((oo.float() - of.float()).norm() / of.float().norm()).item()
    row = {"shape": [B, T], "ours_vs_fla_rel": err}
    it = itertools.cycle(ins)
    row["fla_ms"] = do_bench(lambda: chunk_simple_gla(*next(it), g_gamma=-s, scale=1.0), warmup=25, rep=100, return_mode="median")
    row["ours_default_ms"] = do_bench(lambda: lightning_attn_fwd(*next(it), s, 1.0, None, False, None), warmup=25, rep=100, return_mode="median")
    sd = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    row["sdpa_ms"] = do_bench(lambda: sd(*next(it)), warmup=10, rep=50, return_mode="median")
    row["floor_ms"] = 4 * B * T * H * D * 2 / 3.02e12 * 1e3
    print(json.dumps(row), flush=True)

import os, sys, json, time, itertools
import torch, triton
from triton.testing import do_bench
sys.path.insert(0, os.getcwd())
from kernels.lightning_attn import lightning_attn, minimax_slopes
from kernels.lightning_attn.forward import lightning_attn_fwd
OUT = os.environ.get("OUT", "/tmp")
log = open(f"{OUT}/explore.jsonl", "w")
def emit(**kw):
    print(json.dumps(kw), flush=True); log.write(json.dumps(kw) + "\n"); log.flush()

dev = "cuda"
emit(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
     sms=torch.cuda.get_device_properties(0).multi_processor_count)
# ceilings
x = torch.randn(2**30 // 2, device=dev, dtype=torch.bfloat16); y = torch.empty_like(x)
t = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
emit(copy_tb_s=2 * x.numel() * 2 / (t * 1e-3) / 1e12, ms=t)
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn_like(a)
t = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
emit(mm_tflop_s=2 * 8192**3 / (t * 1e-3) / 1e12)
del x, y, a, b

def chunk_ref64(q, k, v, s, scale=1.0, C=256):
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, D = q.shape; E = v.shape[-1]
    lam = s.double().to(q.device)
    S = torch.zeros(B, H, D, E, dtype=torch.float64, device=q.device)
    o = torch.empty(B, T, H, E, dtype=torch.float64, device=q.device)
    for st in range(0, T, C):
        qc, kc, vc = (z[:, st:st + C].transpose(1, 2) for z in (q, k, v))  # B H c D
        n = qc.shape[2]
        i = torch.arange(n, device=q.device, dtype=torch.float64)
        dec = torch.exp(-lam[:, None, None] * (i[:, None] - i[None, :])) * (i[:, None] >= i[None, :])
        A = (qc @ kc.transpose(-1, -2)) * dec
        oc = A @ vc + (qc * torch.exp(-lam[:, None] * (i + 1))[..., None]) @ S
        o[:, st:st + n] = (scale * oc).transpose(1, 2)
        S = torch.exp(-lam * n)[:, None, None] * S + (kc * torch.exp(-lam[:, None] * (n - 1 - i))[..., None]).transpose(-1, -2) @ vc
    return o, S

def rel(a, b): return ((a.double() - b).norm() / b.norm()).item()
torch.manual_seed(0)
for (B, T, H, layer) in [(2, 4133, 8, 0), (1, 16384, 64, 3)]:
    q, k, v = (torch.randn(B, T, H, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    s = minimax_slopes(H, layer, 8).to(dev)
    o, ht = lightning_attn(q, k, v, s, output_final_state=True)
    ro, rh = chunk_ref64(q, k, v, s)
    emit(check=[B, T, H, layer], rel_o=rel(o, ro), rel_state=rel(ht, rh), nan=bool(o.isnan().any()))
try:
    from fla.ops.simple_gla import chunk_simple_gla
    HAVE_FLA = True
except Exception as e:
    emit(fla_import_error=repr(e)); HAVE_FLA = False

H, D = 64, 128
def inputs(B, T, n):
    return [tuple(torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3)) for _ in range(n)]
s = minimax_slopes(H, 3, 8).to(dev)
shapes = [(1, 16384), (1, 4096), (1, 65536), (8, 4096)]
configs = [dict(BT=bt, BV=bv, num_warps=w, num_stages=st) for bt, bv, w, st in itertools.product([32, 64, 128], [32, 64, 128], [4, 8], [1, 2, 3])]
results = {}
for (B, T) in shapes:
    nbytes = 4 * B * T * H * D * 2
    nrot = max(1, min(8, (200 << 20) // nbytes + 1))
    ins = inputs(B, T, nrot)
    floor_ms = nbytes / 3.02e12 * 1e3
    cands = configs if (B, T) == (1, 16384) else results.get("top", configs[:3])
    best = None
    for cfg in cands:
        it = itertools.cycle(ins)
        try:
            def f():
                q, k, v = next(it); lightning_attn_fwd(q, k, v, s, 1.0, None, False, None, config=cfg)
            f(); torch.cuda.synchronize()
            t = do_bench(f, warmup=25, rep=100, return_mode="median")
        except Exception as e:
            emit(shape=[B, T], cfg=cfg, error=repr(e)[:200]); continue
        emit(shape=[B, T], cfg=cfg, ms=t, x_floor=t / floor_ms)
        results.setdefault((B, T), []).append((t, cfg))
    ranked = sorted(results[(B, T)], key=lambda r: r[0])
    if (B, T) == (1, 16384):
        results["top"] = [c for _, c in ranked[:8]]
    emit(shape=[B, T], best=ranked[0], floor_ms=floor_ms)
    if HAVE_FLA:
        it = itertools.cycle(ins)
        def g():
            q, k, v = next(it); chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0)
        g(); t = do_bench(g, warmup=25, rep=100, return_mode="median")
        q, k, v = ins[0]
        of, _ = chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0)
        oo, _ = lightning_attn_fwd(q, k, v, s, 1.0, None, False, None, config=ranked[0][1])
        emit(shape=[B, T], fla_ms=t, fla_x_floor=t / floor_ms, rel_ours_vs_fla=rel(oo, of.double()))
    if T <= 16384 or B == 1:
        it = itertools.cycle(ins)
        def h():
            q, k, v = next(it)
            torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h(); t = do_bench(h, warmup=10, rep=50, return_mode="median")
        emit(shape=[B, T], sdpa_ms=t)
    del ins
    torch.cuda.empty_cache()

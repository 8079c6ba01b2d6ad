"""One launch each (after a warm-up) of: our dW / forward at E=32 up 16K and torch._grouped_mm's,
then the lightning forward (B=1 T=16K H=64 D=128), each between cudaProfilerStart/Stop for
`ncu --profile-from-start off`. python .dev/ncu_driver.py"""
import torch
from autotune.moe import GroupedGemmCase
from kernels.lightning_attn import lightning_attn, minimax_slopes

shape = {"proj": "up", "E": 32, "K": 6144, "N": 18432, "T": 16384, "top_k": 2, "routing": "random"}
for mode in ("dw", "fwd"):
    for p in ("ours", "torch_grouped_mm"):
        c = GroupedGemmCase(shape, mode, p)
        for i in range(3):
            c.call(i)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        c.call(3)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(mode, p, "done", flush=True)
        del c
        torch.cuda.empty_cache()
B, T, H, D = 1, 16384, 64, 128
q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
s = minimax_slopes(H, 3, 8).cuda()
for _ in range(3):
    lightning_attn(q, k, v, s)
torch.cuda.synchronize()
torch.cuda.profiler.start()
lightning_attn(q, k, v, s)
torch.cuda.synchronize()
torch.cuda.profiler.stop()
print("lightning done", flush=True)

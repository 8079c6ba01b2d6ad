"""Probe (not committed code): the lightning forward's chunk loop under tl.range options
(warp specialisation, loop stages, unroll). Rewrites forward.py's loop header, times each
variant at H=64 D=E=128 bf16, checks it against the committed kernel's output."""
import json
import sys
import traceback
import types

import torch
import triton

from kernels.lightning_attn import forward, minimax_slopes

SRC = open(forward.__file__).read()
HEAD = "    for i_t in range(0, tl.cdiv(L, BT)):"
assert HEAD in SRC


def variant(opts: str):
    src = SRC.replace(HEAD, f"    for i_t in tl.range(0, tl.cdiv(L, BT){opts}):")
    mod = types.ModuleType("fwd_variant")
    mod.__file__ = f"/tmp/fwd_variant_{abs(hash(opts))}.py"
    open(mod.__file__, "w").write(src)
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


def main(out):
    torch.manual_seed(0)
    rows = []
    for B, T in ((1, 16384), (1, 65536), (8, 4096)):
        H, D = 64, 128
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        slopes = minimax_slopes(H, 0, 80).cuda()
        ref, _ = forward.lightning_attn_fwd(q, k, v, slopes, 1.0, None, False, None,
                                            config={"BT": 64, "BV": 64, "num_warps": 4, "num_stages": 3})
        floor_ms = 4 * q.numel() * 2 / 3.02e12 * 1e3
        for opts in ("", ", warp_specialize=True", ", disallow_acc_multi_buffer=True", ", loop_unroll_factor=2",
                     ", num_stages=2", ", flatten=True"):
            for nw in (4, 8):
                for BV in (32, 64):
                    cfg = {"BT": 64, "BV": BV, "num_warps": nw, "num_stages": 3}
                    row = {"B": B, "T": T, "opts": opts, **cfg}
                    try:
                        mod = variant(opts)
                        fn = lambda: mod.lightning_attn_fwd(q, k, v, slopes, 1.0, None, False, None, config=cfg)  # noqa
                        o, _ = fn()
                        row["rel_err"] = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                        ms = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
                        row.update(ms=ms, x_floor=ms[0] / floor_ms)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = (repr(e)[:300])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    json.dump(rows, open(out, "w"), indent=0)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception:
        traceback.print_exc()

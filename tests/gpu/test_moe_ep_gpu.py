"""Expert-parallel moe_ffn_ep with NCCL, one spawned process per GPU (2 or more GPUs).

Every child builds the same full inputs from a seed on its own GPU, runs moe_ffn_ep on its
token slice and expert shard (NCCL all-to-all with num_chunks 1 and 4; the copy transport with
1, 2 and 4; the flags transport twice, the second call on the first's workspace, and twice
under no_grad, where its output is not copied out of the workspace) in bf16,
backpropagates a fixed dout, and
saves outputs and gradients; the parent compares them, concatenated over ranks, with
single-process moe_ffn on the full weights (bf16, same kernels) and the float32 reference.
Cases: balanced random routing; a rank that sends no tokens; experts of the last rank never
chosen (that rank receives nothing). A child that hangs is killed at the wall limit.
"""
from __future__ import annotations

import datetime

import pytest
import torch

from tests.helpers import TOLERANCE, assert_close
from tests.ranks import spawn_ranks

pytestmark = pytest.mark.gpu
HD, F, E = 1024, 1536, 32
WALL_S = 300
BF16 = TOLERANCE[torch.bfloat16]
NAMES = ("x", "logits", "w_gate_up", "w_down")


def _world() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _inputs(case: dict, device: str) -> dict:
    g = torch.Generator().manual_seed(case["seed"])
    T = sum(case["tokens"])
    logits = torch.randn(T, E, generator=g) * 2
    if case.get("skew"):
        logits[:, E - E // case["W"]:] -= 30.0  # the last rank's experts: never chosen
    full = {
        "x": torch.randn(T, HD, generator=g),
        "logits": logits,
        "w_gate_up": torch.randn(E, HD, 2 * F, generator=g) / HD**0.5,
        "w_down": torch.randn(E, F, HD, generator=g) / F**0.5,
        "dout": torch.randn(T, HD, generator=g),
    }
    return {n: t.to(device, torch.float32 if n == "logits" else torch.bfloat16) for n, t in full.items()}


def _grads(fn, leaves, dout, *args, **kw):
    leaves = [t.clone().requires_grad_() for t in leaves]
    out = fn(*leaves, *args, **kw)
    out.backward(dout)
    return {"out": out.detach().cpu()} | {n: t.grad.cpu() for n, t in zip(NAMES, leaves)}


def _worker(rank: int, port: int, case: dict) -> dict:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=case["W"],
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", rank))
    from kernels.a2a_overlap import moe_ffn_ep

    inp = _inputs(case, f"cuda:{rank}")
    E_l = E // case["W"]
    t0 = sum(case["tokens"][:rank])
    t1 = t0 + case["tokens"][rank]
    leaves = [inp["x"][t0:t1], inp["logits"][t0:t1], inp["w_gate_up"][rank * E_l:(rank + 1) * E_l],
              inp["w_down"][rank * E_l:(rank + 1) * E_l]]
    result = {}
    for C in (1, 4):
        result[f"ep{C}"] = _grads(moe_ffn_ep, leaves, inp["dout"][t0:t1], 2, num_chunks=C)
    # the copy transport; 2 chunks is where a side-stream race once showed (H200, 16K tokens);
    # 4 chunks twice in a row on the same workspace (the second call overwrites it)
    for key, C in (("copy1", 1), ("copy2", 2), ("copy4", 4), ("copy4-again", 4)):
        result[key] = _grads(moe_ffn_ep, leaves, inp["dout"][t0:t1], 2, num_chunks=C, transport="copy")
    for key in ("flags", "flags-again"):
        result[key] = _grads(moe_ffn_ep, leaves, inp["dout"][t0:t1], 2, num_chunks=1, transport="flags")
    with torch.no_grad():  # the weighted sum reads the workspace in place (no copy out); the
        # second call (after one on other tokens) rewrites every workspace under the same tensors
        for x in (leaves[0].flip(0), leaves[0]):
            out = moe_ffn_ep(x, *leaves[1:], 2, num_chunks=1, transport="flags")
        result["flags-no-grad"] = {"out": out.cpu()}
    torch.cuda.synchronize()
    dist.destroy_process_group()
    return result


def _spawn(case: dict, outdir) -> list[dict]:
    return spawn_ranks(_worker, case, outdir, WALL_S)


def _cases(W: int) -> dict:
    return {
        "balanced": dict(W=W, tokens=[1024 + 128 * r for r in range(W)], seed=1),
        "rank0-sends-nothing": dict(W=W, tokens=[0] + [700] * (W - 1), seed=2),
        "last-rank-receives-nothing": dict(W=W, tokens=[600] * W, seed=3, skew=True),
    }


@pytest.mark.skipif(_world() < 2, reason="needs 2 or more GPUs (NCCL)")
@pytest.mark.parametrize("name", list(_cases(2)))
def test_ep_nccl_matches_single_process(name, tmp_path):
    from kernels.moe_gemm import moe_ffn
    from reference.moe import moe_ffn_ref

    case = _cases(_world())[name]
    results = _spawn(case, tmp_path)
    inp = _inputs(case, "cuda:0")
    leaves = [inp[n] for n in NAMES]
    want = {"moe_ffn": _grads(moe_ffn, leaves, inp["dout"], 2)}
    ref_leaves = [t.float().clone().requires_grad_() for t in leaves]
    out = moe_ffn_ref(*ref_leaves, 2, dtype=torch.float32)
    out.backward(inp["dout"].float())
    want["moe_ffn_ref"] = {"out": out.detach().cpu()} | {n: t.grad.cpu() for n, t in zip(NAMES, ref_leaves)}
    for key in ("ep1", "ep4", "copy1", "copy2", "copy4", "copy4-again", "flags", "flags-again"):
        got = {n: torch.cat([r[key][n] for r in results]) for n in ("out", *NAMES)}
        for ref_name, ref in want.items():
            for n, t in got.items():
                assert_close(f"{name} {key}.{n} vs {ref_name}", t.float(), ref[n].float(), BF16)
    got = torch.cat([r["flags-no-grad"]["out"] for r in results])
    for ref_name, ref in want.items():
        assert_close(f"{name} flags-no-grad.out vs {ref_name}", got.float(), ref["out"].float(), BF16)

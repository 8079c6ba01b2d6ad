"""Grouped MoE GEMM, routing and moe_ffn vs the float64 references (Triton interpreter on CPU).

Tolerances (relative Frobenius error, DESIGN.md): 1e-5 for fp32 (IEEE dots, fp32
accumulation), 1e-2 for bf16/fp16 operands (one bf16 rounding of each operand and of each
stored intermediate, ~2-4e-3 measured here).
"""
from __future__ import annotations

import importlib
import json

import pytest
import torch
import triton

from kernels import _config
from kernels.moe_gemm import grouped_gemm, moe_ffn, route
from kernels.moe_gemm.grouped_gemm import (
    KERNEL,
    bucket_key,
    default_config,
    gather_gemm_swiglu,
    grouped_gemm_dw,
    grouped_gemm_dx,
    grouped_gemm_fwd,
    tma_loadable,
    valid_config,
    valid_dw_config,
)
from kernels.moe_gemm.routing import combine, combine_bwd
from reference.moe import grouped_gemm_dw_ref, grouped_gemm_ref, moe_ffn_ref, route_ref
from tests.helpers import TOLERANCE, assert_close

gg_module = importlib.import_module("kernels.moe_gemm.grouped_gemm")  # the package's `grouped_gemm` is the function
routing_module = importlib.import_module("kernels.moe_gemm.routing")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cfg(BM, BN, BK, G=1, warps=4, stages=2) -> dict:
    return {"BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK, "GROUP_M": G, "num_warps": warps, "num_stages": stages}


def dw_cfg(BM, BN, BK, G=1, warps=4, stages=2, per_sm=0) -> dict:
    return {"BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK, "GROUP_K": G, "num_warps": warps, "num_stages": stages,
            "PROGRAMS_PER_SM": per_sm}


# rows per expert; each case names the degenerate thing it covers
GROUPS = {
    "balanced": [8, 8, 8, 8],
    "all-in-one": [0, 0, 37, 0],
    "empty-first-and-last": [0, 5, 20, 3, 0],
    "ragged": [3, 17, 1, 9],
    "one-row": [1],
}
CONFIGS = {
    "default": None,  # what the kernel launches untuned (128-256 wide tiles: everything masked)
    "16x16x16": cfg(16, 16, 16),
    "32x16x32-g2": cfg(32, 16, 32, G=2),
}


def offsets_of(counts: list[int], device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def gemm_inputs(counts, K, N, dtype, device):
    M, E = sum(counts), len(counts)
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(E, K, N, device=device) * K**-0.5).to(dtype)
    return x, w, offsets_of(counts, device)


# --------------------------------------------------------------------------- grouped_gemm

@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("counts", GROUPS.values(), ids=GROUPS.keys())
def test_grouped_gemm_forward(counts, dtype, config, device):
    # K = 40, N = 24: neither a multiple of any block
    x, w, offsets = gemm_inputs(counts, 40, 24, dtype, device)
    y = grouped_gemm_fwd(x, w, offsets, config=config) if config else grouped_gemm(x, w, offsets)
    assert y.dtype == dtype and y.shape == (sum(counts), 24)
    assert_close("y", y, grouped_gemm_ref(x, w, offsets), TOLERANCE[dtype])


@pytest.mark.parametrize("K,N,config", [(64, 48, cfg(16, 16, 16)), (32, 32, cfg(16, 32, 32, G=4)), (16, 16, None)],
                         ids=["even-K", "K=BK", "16x16"])
def test_grouped_gemm_forward_even_k(K, N, config, device):
    x, w, offsets = gemm_inputs([5, 0, 30, 2], K, N, torch.bfloat16, device)
    y = grouped_gemm_fwd(x, w, offsets, config=config)
    assert_close("y", y, grouped_gemm_ref(x, w, offsets), TOLERANCE[torch.bfloat16])


def test_grouped_gemm_fp16(device):
    x, w, offsets = gemm_inputs([7, 0, 12], 40, 24, torch.float16, device)
    assert_close("y", grouped_gemm(x, w, offsets), grouped_gemm_ref(x, w, offsets), TOLERANCE[torch.float16])


def test_grouped_gemm_any_strides(device):
    counts = [6, 0, 11]
    M, K, N = sum(counts), 40, 24
    x = torch.randn(K, M, device=device).T  # column-major rows
    w = torch.randn(3, N, K, device=device).transpose(1, 2)  # [E, K, N] stored transposed
    offsets = offsets_of(counts, device).long()  # int64 offsets are accepted
    assert not x.is_contiguous() and not w.is_contiguous()
    assert_close("y", grouped_gemm(x, w, offsets), grouped_gemm_ref(x, w, offsets), TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("counts", [GROUPS["empty-first-and-last"], GROUPS["all-in-one"], GROUPS["ragged"]],
                         ids=["empty-first-and-last", "all-in-one", "ragged"])
def test_grouped_gemm_gradients(counts, dtype, device):
    x, w, offsets = gemm_inputs(counts, 40, 24, dtype, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = grouped_gemm(x, w, offsets)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    grouped_gemm_ref(x64, w64, offsets).backward(dy.double())
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close("dx", x.grad, x64.grad, TOLERANCE[dtype])
    assert_close("dw", w.grad, w64.grad, TOLERANCE[dtype])
    for e, n in enumerate(counts):  # an expert without rows gets exactly zero
        if n == 0:
            assert (w.grad[e] == 0).all()


@pytest.mark.parametrize(
    "config,dw_config",
    [(cfg(16, 16, 16), dw_cfg(16, 16, 16)), (cfg(32, 16, 16, G=3), dw_cfg(32, 16, 32, G=2)), (cfg(16, 64, 32), dw_cfg(64, 32, 16))],
    ids=["16", "32-grouped", "wide"],
)
def test_backward_kernels_with_several_configs(config, dw_config, device):
    counts = [0, 9, 1, 30, 0, 4]
    x, w, offsets = gemm_inputs(counts, 40, 24, torch.float32, device)
    dy = torch.randn(sum(counts), 24, device=device)
    dx = grouped_gemm_dx(dy, w, offsets, config=config)
    assert_close("dx", dx, grouped_gemm_ref(dy, w.transpose(1, 2), offsets), TOLERANCE[torch.float32])
    dw = grouped_gemm_dw(x, dy, offsets, config=dw_config)
    assert_close("dw", dw, grouped_gemm_dw_ref(x, dy, offsets), TOLERANCE[torch.float32])


@pytest.mark.parametrize("K,N", [(64, 48), (40, 24), (20, 24)], ids=["tma", "tma-cols-past-the-edge", "pointer-only"])
def test_dw_tma_and_pointer_steps(K, N, device):
    """bf16 dW over experts with several full BLOCK_M steps and a partial last one, exactly
    full steps, a single row, and none. Rows of 16-byte multiples load their full steps through
    TMA descriptors (columns past K or N zero-filled); K=20 (40-byte rows) stays on pointers."""
    counts = [0, 33, 16, 1, 48, 0, 5]
    x, _, offsets = gemm_inputs(counts, K, 8, torch.bfloat16, device)
    dy = torch.randn(sum(counts), N, device=device).to(torch.bfloat16)
    assert tma_loadable(x) == (K != 20) and tma_loadable(dy)
    dw = grouped_gemm_dw(x, dy, offsets, config=dw_cfg(16, 32, 32, G=2))
    assert_close("dw", dw, grouped_gemm_dw_ref(x, dy, offsets), TOLERANCE[torch.bfloat16])
    assert (dw[0] == 0).all() and (dw[5] == 0).all()


@pytest.mark.parametrize("per_sm", [1, 2])
@pytest.mark.parametrize("K,N", [(64, 48), (40, 24), (20, 24)], ids=["tma-store", "pointer-store", "pointer-only"])
def test_dw_persistent_matches_one_program_per_tile(K, N, per_sm, device):
    """Persistent dW (PROGRAMS_PER_SM > 0: a few programs loop over the tiles) computes the same
    bits as one program per tile. K % BLOCK_K == 0 with 16-bit rows stores through TMA; K=40
    (a K tile straddling two experts' rows of dW) and K=20 (unaligned rows) store through
    pointers. Empty experts still get zeros."""
    counts = [0, 33, 16, 1, 48, 0, 5]
    x, _, offsets = gemm_inputs(counts, K, 8, torch.bfloat16, device)
    dy = torch.randn(sum(counts), N, device=device).to(torch.bfloat16)
    want = grouped_gemm_dw(x, dy, offsets, config=dw_cfg(16, 32, 32, G=2))
    got = grouped_gemm_dw(x, dy, offsets, config=dw_cfg(16, 32, 32, G=2, per_sm=per_sm))
    assert torch.equal(got, want)
    assert_close("dw", got, grouped_gemm_dw_ref(x, dy, offsets), TOLERANCE[torch.bfloat16])
    assert (got[0] == 0).all() and (got[5] == 0).all()


@pytest.mark.parametrize("K,N", [(64, 48), (40, 24), (20, 24)], ids=["tma", "tma-a-and-dx-only", "pointer-only"])
def test_fwd_dx_tma_and_pointer_loads(K, N, device):
    """bf16 forward, dX and the SwiGLU pair with 16-byte aligned rows load through TMA
    descriptors: A tiles that run into the next expert's rows (their outputs are masked), the
    forward's B only when K is a multiple of BLOCK_K (K=40 with BLOCK_K 32 is not), dX's
    transposed B tiles past the expert's rows; K=20 stays on pointers."""
    counts = [0, 33, 16, 1, 48, 0, 5]
    x, w, offsets = gemm_inputs(counts, K, N, torch.bfloat16, device)
    tol = TOLERANCE[torch.bfloat16]
    config = cfg(16, 32, 32, G=2)
    assert_close("y", grouped_gemm_fwd(x, w, offsets, config=config), grouped_gemm_ref(x, w, offsets), tol)
    dy = torch.randn(sum(counts), N, device=device).to(torch.bfloat16)
    assert_close("dx", grouped_gemm_dx(dy, w, offsets, config=config), grouped_gemm_ref(dy, w.transpose(1, 2), offsets), tol)
    rows = torch.randint(0, 7, (sum(counts),), device=device, dtype=torch.int32)
    x_src = torch.randn(7, K, device=device).to(torch.bfloat16)
    h, gu = gather_gemm_swiglu(x_src, w, offsets, rows, store_preact=True, config=config)
    assert_close("gu", gu, grouped_gemm_ref(x_src[rows.long()], w, offsets), tol)


def test_tma_loadable():
    x = torch.randn(8, 64).to(torch.bfloat16)
    assert tma_loadable(x)
    assert not tma_loadable(x.float())  # fp32: the IEEE checking path
    assert not tma_loadable(x.T)  # column stride != 1
    assert not tma_loadable(x[:, 1:])  # base not 16-byte aligned
    assert tma_loadable(x[:, :20])  # the row stride counts (128 bytes), not the width
    assert not tma_loadable(torch.randn(8, 20).to(torch.bfloat16))  # rows 40 bytes apart


def test_grouped_gemm_zero_rows(device):
    x, w, offsets = gemm_inputs([0, 0, 0], 16, 16, torch.float32, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = grouped_gemm(x, w, offsets)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and (w.grad == 0).all()


# --------------------------------------------------------------------------- config lookup

@pytest.fixture
def gemm_launches(monkeypatch):
    """Records the config of every grouped GEMM forward/dX launch, then launches."""
    launches: list[dict] = []
    kernel = gg_module._grouped_gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append({n: kwargs[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")})
                return kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(gg_module, "_grouped_gemm_kernel", Spy())
    return launches


def test_kernel_launches_with_the_looked_up_config(config_dir, gemm_launches, device):
    tuned = cfg(16, 32, 16, G=2, warps=2, stages=3)
    counts = [10, 0, 20]
    key = bucket_key(3, 24, 40, 30, torch.bfloat16)
    assert key == {"E": 3, "N": 24, "K": 40, "dtype": "bfloat16", "M": 32}
    path = _config.config_path(KERNEL)
    path.parent.mkdir(parents=True)
    bad = dict(tuned, num_stages=1)  # an entry the kernel must not launch (num_stages >= 2)
    path.write_text(json.dumps({"kernel": KERNEL, "meta": {"triton": triton.__version__}, "entries": [
        {"key": key, "config": tuned}, {"key": bucket_key(3, 24, 40, 30, torch.float32), "config": bad}]}))
    x, w, offsets = gemm_inputs(counts, 40, 24, torch.bfloat16, device)
    assert_close("y", grouped_gemm(x, w, offsets), grouped_gemm_ref(x, w, offsets), TOLERANCE[torch.bfloat16])
    assert gemm_launches[-1] == tuned
    x, w, offsets = gemm_inputs([50, 0, 20], 40, 24, torch.bfloat16, device)  # M = 70: nearest bucket 32 (vs none)
    grouped_gemm(x, w, offsets)
    assert gemm_launches[-1] == tuned
    x, w, offsets = gemm_inputs(counts, 40, 24, torch.float32, device)
    assert_close("y", grouped_gemm(x, w, offsets), grouped_gemm_ref(x, w, offsets), TOLERANCE[torch.float32])
    assert gemm_launches[-1] == default_config(3, 30)


def test_valid_config():
    assert valid_config(cfg(16, 16, 16)) and valid_dw_config(dw_cfg(16, 16, 16))
    assert not valid_config(cfg(16, 16, 8))  # tl.dot needs tiles >= 16
    assert not valid_config(cfg(16, 48, 16))  # not a power of two
    assert not valid_config(cfg(16, 16, 16, stages=1))  # one stage miscompiled under triton 3.6
    assert not valid_config(cfg(16, 16, 16), swiglu=True)  # SwiGLU halves BLOCK_N to 8
    assert valid_config(cfg(16, 32, 16), swiglu=True)
    assert not valid_config({"BLOCK_M": 16})
    assert not valid_dw_config(dw_cfg(16, 16, 16, G=0))
    assert not valid_dw_config(dw_cfg(16, 16, 16, per_sm=-1))
    no_field = dw_cfg(16, 16, 16)
    del no_field["PROGRAMS_PER_SM"]
    assert valid_dw_config(no_field)  # files tuned before the field existed: one program per tile
    with pytest.raises(ValueError, match="cannot launch"):
        grouped_gemm_fwd(torch.randn(4, 16), torch.randn(1, 16, 16), torch.tensor([4], dtype=torch.int32),
                         config=cfg(16, 16, 16, stages=1))


# --------------------------------------------------------------------------- routing

# the last two: many top-k and grouping blocks (E = 8: 1024 tokens and copies per block),
# and E = 100 (128 columns: 64 tokens / copies per block, the histograms read in 3 passes)
@pytest.mark.parametrize("T,E,k", [(50, 8, 1), (50, 8, 2), (33, 5, 3), (20, 4, 4), (1, 6, 2), (2100, 8, 2),
                                   (4200, 100, 3)], ids=str)
def test_routing_invariants(T, E, k, device):
    logits = torch.randn(T, E, device=device)
    r = route(logits, k)
    M = T * k
    assert r.weights.shape == (T, k) and r.weights.dtype == torch.float32
    assert r.offsets.dtype == r.counts.dtype == r.row_to_token.dtype == r.copy_to_row.dtype == torch.int32
    # a permutation, and copy_to_row is its inverse (both compositions are the identity)
    arange = torch.arange(M, device=device)
    assert torch.equal(r.row_to_copy.sort().values, arange)
    assert torch.equal(r.copy_to_row.flatten().long()[r.row_to_copy], arange)
    assert torch.equal(r.row_to_copy[r.copy_to_row.flatten().long()], arange)
    assert torch.equal(r.row_to_token.long(), r.row_to_copy // k)
    # rows grouped by expert (ascending), tokens ascending within a group (stable sort)
    row_expert = r.experts.flatten()[r.row_to_copy]
    assert (row_expert[1:] >= row_expert[:-1]).all()
    same = row_expert[1:] == row_expert[:-1]
    assert (r.row_to_copy[1:][same] > r.row_to_copy[:-1][same]).all()
    # counts and offsets
    assert torch.equal(r.counts.long(), torch.bincount(r.experts.flatten(), minlength=E))
    assert r.counts.sum().item() == M
    assert torch.equal(r.offsets.long(), r.counts.long().cumsum(0))
    assert (r.offsets[1:] >= r.offsets[:-1]).all() and r.offsets[-1].item() == M
    for e in range(E):  # each group holds exactly that expert's rows
        s, t = (0 if e == 0 else r.offsets[e - 1].item()), r.offsets[e].item()
        assert (row_expert[s:t] == e).all()
    # weights: positive, sum to 1, from distinct experts in descending probability
    assert (r.weights > 0).all()
    assert torch.allclose(r.weights.sum(-1), torch.ones(T, device=device))
    assert all(len(set(row)) == k for row in r.experts.tolist())
    probs = torch.softmax(logits, -1).gather(1, r.experts)
    assert (probs[:, 1:] <= probs[:, :-1]).all()
    # the reference makes the same choice, with the same weights
    ref_experts, ref_weights = route_ref(logits, k)
    assert torch.equal(r.experts, ref_experts)
    assert_close("weights", r.weights, ref_weights, TOLERANCE[torch.float32])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_routing_weights_gradient(k, device):
    # the top-k kernel's backward vs autograd through the float64 reference's softmax and renormalisation
    logits = torch.randn(70, 6, device=device)
    dw = torch.randn(70, k, device=device)
    mine = logits.clone().requires_grad_()
    route(mine, k).weights.backward(dw)
    ref = logits.double().requires_grad_()
    route_ref(ref, k)[1].backward(dw.double())
    if k == 1:
        assert torch.equal(mine.grad, torch.zeros_like(mine.grad))  # every weight is exactly 1
    else:
        assert_close("dlogits", mine.grad, ref.grad, TOLERANCE[torch.float32])


def test_routing_nan_logits_choose_valid_experts(device):
    # a NaN logit makes its token's probabilities all NaN: NaN comes first (as a descending
    # sort puts it), ties to the lower id, so ids stay in [0, E) and no row is lost
    logits = torch.randn(9, 5, device=device)
    logits[3, 2] = float("nan")
    r = route(logits, 2)
    assert r.experts[3].tolist() == [0, 1] and r.weights[3].isnan().all()
    assert ((r.experts >= 0) & (r.experts < 5)).all() and r.offsets[-1].item() == 18
    assert torch.equal(r.row_to_copy.sort().values, torch.arange(18, device=device))


def test_routing_ties_are_deterministic(device):
    # equal logits: the lower expert id wins, every time
    r = route(torch.zeros(5, 6, device=device), 3)
    assert torch.equal(r.experts, torch.tensor([[0, 1, 2]] * 5, device=device))
    assert torch.allclose(r.weights, torch.full((5, 3), 1 / 3, device=device))
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 5.0, 2.0, 2.0]], device=device)
    r = route(logits, 2)
    assert r.experts.tolist() == [[1, 2], [2, 0]]
    assert torch.equal(r.experts, route_ref(logits, 2)[0])
    # many tied tokens: the whole permutation is the same on every call
    logits = torch.randint(0, 3, (200, 8), device=device).float()
    first = route(logits, 2)
    for _ in range(3):
        again = route(logits, 2)
        assert torch.equal(again.row_to_copy, first.row_to_copy) and torch.equal(again.offsets, first.offsets)


def test_combine_and_its_backward(device):
    T, k, H = 45, 3, 200  # T > BLOCK_T, H > BLOCK_H and not a multiple of it
    r = route(torch.randn(T, 5, device=device), k)
    y = torch.randn(T * k, H, device=device)
    weights = torch.rand(T, k, device=device)
    gathered = y[r.copy_to_row.long()]  # [T, k, H]
    assert_close("out", combine(y, r.copy_to_row, weights), (weights[..., None] * gathered).sum(1), 1e-6)
    assert_close("sum", combine(y, r.copy_to_row), gathered.sum(1), 1e-6)
    dout = torch.randn(T, H, device=device)
    dy, dweights = combine_bwd(dout, y, r.copy_to_row, weights)
    y64, w64 = y.double().requires_grad_(True), weights.double().requires_grad_(True)
    (w64[..., None] * y64[r.copy_to_row.long()]).sum(1).backward(dout.double())
    assert_close("dy", dy, y64.grad, 1e-6)
    assert_close("dweights", dweights, w64.grad, 1e-6)


# --------------------------------------------------------------------------- moe_ffn

def moe_inputs(T, Hd, F, E, dtype, device, *, logits=None):
    x = torch.randn(T, Hd, device=device).to(dtype)
    router_logits = torch.randn(T, E, device=device) if logits is None else logits
    w_gate_up = (torch.randn(E, Hd, 2 * F, device=device) * Hd**-0.5).to(dtype)
    w_down = (torch.randn(E, F, Hd, device=device) * F**-0.5).to(dtype)
    return [t.requires_grad_(True) for t in (x, router_logits, w_gate_up, w_down)]


def check_moe(inputs, top_k, tol):
    out = moe_ffn(*inputs, top_k=top_k)
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
    dout = torch.randn_like(out)
    out.backward(dout)
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = moe_ffn_ref(*leaves, top_k)
    ref.backward(dout.double())
    assert_close("out", out, ref, tol)
    for name, t, r in zip(("dx", "d_router_logits", "dw_gate_up", "dw_down"), inputs, leaves):
        assert t.grad is not None, f"{name} is None"
        assert t.grad.dtype == t.dtype
        if name == "d_router_logits" and inputs[0].shape[0] == 1:
            # one token: its logit gradient w_i (g_i - sum_j w_j g_j), g_i = y_i . dout, is a
            # difference of two rounded dot products, so its relative error is unbounded when
            # g_1 ~ g_2 (seen: 1.9e-2 in bf16, 1.5e-5 in fp32). Many tokens average this out
            # (checked for T >= 9); the pieces that are ours (combine_bwd's dweights) are
            # checked on their own.
            continue
        if name == "d_router_logits" and top_k == 1:
            # one renormalised weight is the constant 1: the gradient is zero (exactly, in ours;
            # float64 round-off of p/p in the reference), so no relative error exists
            assert (t.grad == 0).all() and r.grad.abs().max().item() < 1e-12
            continue
        assert_close(name, t.grad, r.grad, tol)
    return out


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(
    "T,Hd,F,E,k",
    [(13, 40, 24, 4, 2), (13, 40, 24, 4, 1), (9, 32, 16, 4, 4), (1, 40, 24, 4, 2), (10, 24, 40, 16, 2)],
    ids=["T13-top2", "T13-top1", "top_k=E", "T1", "E16-many-empty"],
)
def test_moe_ffn_matches_reference(T, Hd, F, E, k, dtype, device):
    check_moe(moe_inputs(T, Hd, F, E, dtype, device), k, TOLERANCE[dtype])


@pytest.mark.parametrize("k", [1, 2])
def test_moe_ffn_all_tokens_to_one_expert(k, device):
    logits = torch.randn(17, 4, device=device)
    logits[:, 2] += 30.0  # every token's first choice is expert 2
    inputs = moe_inputs(17, 40, 24, 4, torch.float32, device, logits=logits)
    assert (route(logits, k).counts[2] == 17).item()
    check_moe(inputs, k, TOLERANCE[torch.float32])


def test_moe_ffn_is_deterministic(device):
    inputs = moe_inputs(21, 32, 24, 4, torch.bfloat16, device)
    runs = []
    for _ in range(2):
        for t in inputs:
            t.grad = None
        out = moe_ffn(*inputs, top_k=2)
        out.backward(torch.ones_like(out))
        runs.append([out.detach().clone()] + [t.grad.clone() for t in inputs])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_moe_ffn_partial_gradients_and_no_grad(device):
    x, logits, w_gate_up, w_down = moe_inputs(11, 32, 16, 4, torch.float32, device)
    with torch.no_grad():
        plain = moe_ffn(x, logits, w_gate_up, w_down)
    ref = moe_ffn_ref(x.detach(), logits.detach(), w_gate_up.detach(), w_down.detach(), 2)
    assert_close("out (no grad)", plain, ref, TOLERANCE[torch.float32])
    # only w_down and the logits need gradients: no pre-activations stored, still right
    out = moe_ffn(x.detach(), logits, w_gate_up.detach(), w_down)
    out.sum().backward()
    assert logits.grad is not None and w_down.grad is not None
    ref_leaves = [logits.detach().double().requires_grad_(True), w_down.detach().double().requires_grad_(True)]
    moe_ffn_ref(x.detach(), ref_leaves[0], w_gate_up.detach(), ref_leaves[1], 2).sum().backward()
    assert_close("d_router_logits", logits.grad, ref_leaves[0].grad, TOLERANCE[torch.float32])
    assert_close("dw_down", w_down.grad, ref_leaves[1].grad, TOLERANCE[torch.float32])


def test_swiglu_gemm_stores_the_pre_activations(device):
    T, Hd, F, E = 10, 40, 24, 3
    x = torch.randn(T, Hd, device=device)
    w = torch.randn(E, Hd, 2 * F, device=device)
    counts = [7, 0, 13]
    x_rows = torch.randint(0, T, (sum(counts),), device=device, dtype=torch.int32)
    offsets = offsets_of(counts, device)
    h, gu = gather_gemm_swiglu(x, w, offsets, x_rows, store_preact=True, config=cfg(16, 32, 16))
    ref_gu = grouped_gemm_ref(x[x_rows.long()], w, offsets)
    assert_close("gu", gu, ref_gu, TOLERANCE[torch.float32])
    g, u = ref_gu.chunk(2, -1)
    assert_close("h", h, torch.nn.functional.silu(g) * u, TOLERANCE[torch.float32])
    h2, none = gather_gemm_swiglu(x, w, offsets, x_rows, store_preact=False)
    assert none is None
    assert_close("h (default config)", h2, torch.nn.functional.silu(g) * u, TOLERANCE[torch.float32])


@pytest.mark.parametrize("config", [cfg(16, 16, 16), cfg(32, 16, 32, G=2)], ids=["16x16x16", "32x16x32-g2"])
def test_expert_flags(config, device):
    """The flags transport's kernel side: with every ``ready`` flag set the waiting GEMM gives
    the same result as without flags, and the signalling GEMM's ``done[e]`` reaches exactly
    ``rows_e * N`` (empty experts included), whatever the tiling."""
    counts, K, N = [5, 0, 19, 1], 40, 36
    x, w, offsets = gemm_inputs(counts, K, N, torch.float32, device)
    done = torch.zeros(len(counts), dtype=torch.int32, device=device)
    y = grouped_gemm_fwd(x, w, offsets, config=config, done=done)
    assert done.tolist() == [c * N for c in counts]
    assert_close("y (signalling)", y, grouped_gemm_ref(x, w, offsets), TOLERANCE[torch.float32])
    ready = torch.ones(len(counts), dtype=torch.int32, device=device)
    w2 = torch.randn(len(counts), K, 2 * N, device=device)
    x_rows = torch.randperm(sum(counts), device=device).to(torch.int32)
    swiglu_config = {**config, "BLOCK_N": 2 * config["BLOCK_N"]}
    h, _ = gather_gemm_swiglu(x, w2, offsets, x_rows, store_preact=False, config=swiglu_config, ready=ready)
    h0, _ = gather_gemm_swiglu(x, w2, offsets, x_rows, store_preact=False, config=swiglu_config)
    assert torch.equal(h, h0)


def test_moe_ffn_zero_tokens(device):
    x, logits, w_gate_up, w_down = moe_inputs(0, 16, 16, 4, torch.float32, device)
    out = moe_ffn(x, logits, w_gate_up, w_down)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert (w_gate_up.grad == 0).all() and (w_down.grad == 0).all() and x.grad.shape == (0, 16)


# --------------------------------------------------------------------------- bad input

@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: bad input must be refused before anything runs."""

    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("a kernel launched on bad input")

    for module, names in ((gg_module, ("_grouped_gemm_kernel", "_grouped_gemm_dw_kernel")),
                          (routing_module, ("_moe_combine_kernel", "_moe_combine_bwd_kernel"))):
        for name in names:
            monkeypatch.setattr(module, name, Refuse())


def _gemm_args(device):
    return {"x": torch.randn(10, 16, device=device), "w": torch.randn(3, 16, 8, device=device),
            "offsets": torch.tensor([2, 2, 10], dtype=torch.int32, device=device)}


GEMM_BAD = {
    "x-not-tensor": (lambda a: {**a, "x": a["x"].tolist()}, TypeError, "x must be a torch.Tensor"),
    "x-rank": (lambda a: {**a, "x": a["x"][None]}, ValueError, r"x must be \[M, K\]"),
    "x-int": (lambda a: {**a, "x": a["x"].long(), "w": a["w"].long()}, TypeError, "x must be float32"),
    "w-rank": (lambda a: {**a, "w": a["w"][0]}, ValueError, r"w must be \[E, K, N\] \(3 dims\)"),
    "w-dtype": (lambda a: {**a, "w": a["w"].bfloat16()}, TypeError, "w must have x's dtype"),
    "w-K": (lambda a: {**a, "w": a["w"][:, :8]}, ValueError, "K = 16"),
    "offsets-float": (lambda a: {**a, "offsets": a["offsets"].float()}, TypeError, "offsets must be an int32"),
    "offsets-length": (lambda a: {**a, "offsets": a["offsets"][1:]}, ValueError, r"offsets must be \[E\] = \[3\]"),
    "offsets-decreasing": (lambda a: {**a, "offsets": torch.tensor([5, 2, 10], dtype=torch.int32)}, ValueError, "non-decreasing"),
    "offsets-short": (lambda a: {**a, "offsets": torch.tensor([2, 2, 9], dtype=torch.int32)}, ValueError, "to M = 10"),
    "offsets-negative": (lambda a: {**a, "offsets": torch.tensor([-1, 2, 10], dtype=torch.int32)}, ValueError, ">= 0"),
    "device": (lambda a: {**a, "w": a["w"].to("meta")}, ValueError, "one device"),
}


@pytest.mark.parametrize("change,error,match", GEMM_BAD.values(), ids=GEMM_BAD.keys())
def test_grouped_gemm_bad_input_raises_before_launch(change, error, match, no_launch, device):
    args = change(_gemm_args(device))
    with pytest.raises(error, match=match):
        grouped_gemm(args["x"], args["w"], args["offsets"])


def _moe_args(device):
    T, Hd, F, E = 6, 16, 8, 4
    return {"x": torch.randn(T, Hd, device=device), "router_logits": torch.randn(T, E, device=device),
            "w_gate_up": torch.randn(E, Hd, 2 * F, device=device), "w_down": torch.randn(E, F, Hd, device=device),
            "top_k": 2}


MOE_BAD = {
    "x-rank": (lambda a: {**a, "x": a["x"][None]}, ValueError, r"x must be \[T, Hd\]"),
    "x-int": (lambda a: {**a, "x": a["x"].int()}, TypeError, "x must be float32"),
    "logits-rank": (lambda a: {**a, "router_logits": a["router_logits"][0]}, ValueError, r"router_logits must be \[T, E\] \(2 dims\)"),
    "logits-int": (lambda a: {**a, "router_logits": a["router_logits"].long()}, TypeError, "router_logits must be a float"),
    "logits-T": (lambda a: {**a, "router_logits": a["router_logits"][1:]}, ValueError, "T = 6"),
    "w_gate_up-rank": (lambda a: {**a, "w_gate_up": a["w_gate_up"][0]}, ValueError, r"w_gate_up must be \[E, Hd, 2F\] \(3"),
    "w_gate_up-odd": (lambda a: {**a, "w_gate_up": a["w_gate_up"][..., 1:]}, ValueError, "w_gate_up must be"),
    "w_gate_up-E": (lambda a: {**a, "w_gate_up": a["w_gate_up"][1:]}, ValueError, "w_gate_up must be"),
    "w_gate_up-Hd": (lambda a: {**a, "w_gate_up": a["w_gate_up"][:, 1:]}, ValueError, "w_gate_up must be"),
    "w_gate_up-dtype": (lambda a: {**a, "w_gate_up": a["w_gate_up"].bfloat16()}, TypeError, "w_gate_up must have x's dtype"),
    "w_down-shape": (lambda a: {**a, "w_down": a["w_down"][:, 1:]}, ValueError, r"w_down must be \[E, F, Hd\] = \[4, 8, 16\]"),
    "w_down-dtype": (lambda a: {**a, "w_down": a["w_down"].half()}, TypeError, "w_down must have x's dtype"),
    "top_k-too-big": (lambda a: {**a, "top_k": 5}, ValueError, "top_k must be between 1 and E = 4"),
    "top_k-zero": (lambda a: {**a, "top_k": 0}, ValueError, "top_k must be between 1"),
    "top_k-float": (lambda a: {**a, "top_k": 2.0}, TypeError, "top_k must be an int"),
    "top_k-bool": (lambda a: {**a, "top_k": True}, TypeError, "top_k must be an int"),
    "device": (lambda a: {**a, "w_down": a["w_down"].to("meta")}, ValueError, "one device"),
}


@pytest.mark.parametrize("change,error,match", MOE_BAD.values(), ids=MOE_BAD.keys())
def test_moe_ffn_bad_input_raises_before_launch(change, error, match, no_launch, device):
    args = change(_moe_args(device))
    with pytest.raises(error, match=match):
        moe_ffn(**args)


def test_outputs_are_poisoned_in_tests():
    """The kernels' outputs come from torch.empty, NaN-filled here: an unwritten row would fail."""
    assert torch.isnan(torch.empty(3)).all()


# --------------------------------------------------------------------------- tuner and benchmark plumbing

def test_tunables_check_against_their_references():
    """Each tunable's small shapes: default and extreme candidates pass its own reference
    check, and its bucket is the key its kernel looks up."""
    from autotune import moe

    for t in (moe.TUNABLE_FWD, moe.TUNABLE_SWIGLU, moe.TUNABLE_DX, moe.TUNABLE_DW):
        assert t.near == ("M",)
        shape = t.shapes("small")[1]
        candidates = t.candidates(shape)
        assert candidates and all(c["num_stages"] >= 2 for c in candidates)
        inputs = t.make_inputs(shape, "cpu")
        expected = t.reference(inputs)
        for config in (t.default_config(shape), candidates[0], candidates[-1]):
            assert_close(f"{t.name} {config}", t.run(inputs, config), expected, t.tolerance(shape))
    shape = moe.parse_shape("E=32,K=6144,N=18432,T=3000")
    assert shape == {"E": 32, "K": 6144, "N": 18432, "T": 3000, "top_k": 2, "routing": "random", "dtype": "bf16"}
    assert moe.bucket_fwd(shape) == bucket_key(32, 18432, 6144, 6000, torch.bfloat16)
    assert moe.bucket_dx(shape) == bucket_key(32, 6144, 18432, 6000, torch.bfloat16)  # dX: [M, N] @ [N, K]
    assert moe.bucket_fwd(shape)["M"] == 8192
    for bad in ("E=32,K=64,N=64", "E=2,K=64,N=64,T=8,top_k=3", "E=2,K=64,N=64,T=8,routing=magic", "E=2,K=64,N=64,T=8,X=1"):
        with pytest.raises(ValueError):
            moe.parse_shape(bad)
    minimax = moe.TUNABLE_FWD.shapes("minimax")
    assert {(s["K"], s["N"]) for s in minimax} == {(6144, 18432), (9216, 6144)}
    assert [s["T"] for s in minimax[:6]] == [1024, 2048, 4096, 8192, 16384, 32768]
    # the SwiGLU GEMM is the up projection: its shapes have N = 2F, its bucket is the [M, 2F] product's
    assert {s["N"] for name in ("minimax", "minimax-ep") for s in moe.TUNABLE_SWIGLU.shapes(name)} == {18432}
    assert moe.TUNABLE_SWIGLU.bucket(shape) == moe.bucket_fwd(shape)
    assert not moe.TUNABLE_SWIGLU.is_valid({**moe.default_config_fwd(shape), "BLOCK_N": 16}, shape)  # halved to 8


def test_zipf_routing_is_skewed(device):
    from autotune.moe import routing_logits

    torch.manual_seed(0)
    counts = route(routing_logits(20000, 32, "zipf", device), 2).counts
    assert 0.45 < counts[0].item() / 20000 < 0.55  # expert 0 takes half the tokens
    counts = route(routing_logits(20000, 32, "random", device), 2).counts
    assert counts.max().item() / 40000 < 0.05


@pytest.mark.parametrize("mode", ["fwd", "dx", "dw"])
def test_benchmark_providers_compute_the_same(mode):
    """Every benchmark provider, torch._grouped_mm included, computes the same grouped product
    (checked on a CPU; the benchmark itself runs on the GPU)."""
    from autotune.moe import PROVIDERS, GroupedGemmCase

    shape = {"proj": "tiny", "E": 5, "K": 48, "N": 32, "T": 30, "top_k": 2, "routing": "zipf"}
    for provider in PROVIDERS:
        case = GroupedGemmCase(shape, mode, provider, dtype=torch.float32, device="cpu")
        if not case.available:
            continue
        err = case.check()
        assert (err is None) == (provider == "dense")
        assert err is None or err < 1e-5, f"{provider} {mode}: {err:.2e}"
        if provider != "dense":  # dense dW writes one [K, N] matrix: the FLOPs of all experts
            assert case.call(0).shape == case.sets[0]["out"].shape


def test_benchmark_cases_are_timed_after_the_heat_up(monkeypatch):
    """Each benchmark case runs HEAT_MS before it is timed (so it is timed at the GPU's power
    cap) and records it; the CUDA timer is replaced by a recorder here."""
    from autotune import benchmarks
    from autotune.moe import GroupedGemmCase
    from profiling import Timing

    seen = []
    monkeypatch.setattr(benchmarks, "bench", lambda fn, **kw: seen.append(kw) or Timing(1.0, 0.9, 1.1, 5))
    shape = {"proj": "tiny", "E": 3, "K": 16, "N": 16, "T": 6, "top_k": 2, "routing": "random"}
    case = GroupedGemmCase(shape, "fwd", "loop", dtype=torch.float32, device="cpu")
    timing, _ = benchmarks.checked_timing(case)
    assert timing.median_ms == 1.0 and seen == [{"warmup_ms": benchmarks.HEAT_MS}]
    assert benchmarks.HEAT_MS >= 500 and case.extra["warmup_ms"] == benchmarks.HEAT_MS

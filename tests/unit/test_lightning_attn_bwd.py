"""Lightning attention backward vs float64 autograd through the token-by-token reference
(Triton interpreter on CPU).

The loss is ``<o, do> + <final_state, dht>`` with random do and dht, so the gradient that
enters through the final state (dht) is checked together with the one through o.
"""
from __future__ import annotations

import pytest
import torch

from kernels.lightning_attn import lightning_attn, minimax_slopes
from kernels.lightning_attn.backward import default_config, lightning_attn_bwd, valid_config
from reference.lightning_attn import lightning_attn_ref
from tests.helpers import TOLERANCE, assert_close, strided_copy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = ("dq", "dk", "dv", "dh0")


def make_leaves(B, T, H, D, E, dtype, device, *, state=True, N=None):
    q = torch.randn(B, T, H, D, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, T, H, D, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, T, H, E, device=device).to(dtype).requires_grad_()
    h0 = torch.randn(N or B, H, D, E, device=device).requires_grad_() if state else None
    return q, k, v, h0


def reference_grads(q, k, v, slopes, *, scale, h0, cu_seqlens, do, dht):
    """float64 autograd through the token loop, on the same loss."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    h = h0.detach().double().requires_grad_() if h0 is not None else None
    o, ht = lightning_attn_ref(*leaves, slopes, scale=scale, initial_state=h, cu_seqlens=cu_seqlens)
    loss = (o * do.double()).sum() + ((ht * dht.double()).sum() if dht is not None else 0.0)
    wrt = leaves + ([h] if h is not None else [])
    return torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)  # T = 0: zeros


def check_grads(q, k, v, slopes, *, scale=1.0, h0=None, cu_seqlens=None, with_dht=True, tol=None):
    tol = tol or TOLERANCE[q.dtype]
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    H, D, E = q.shape[2], q.shape[3], v.shape[3]
    do = torch.randn_like(v)
    dht = torch.randn(N, H, D, E, device=q.device) if with_dht else None
    o, ht = lightning_attn(q, k, v, slopes, scale=scale, initial_state=h0, output_final_state=with_dht,
                           cu_seqlens=cu_seqlens)
    loss = (o.float() * do.float()).sum() + ((ht * dht).sum() if with_dht else 0.0)
    wrt = [q, k, v] + ([h0] if h0 is not None else [])
    got = torch.autograd.grad(loss, wrt)
    want = reference_grads(q, k, v, slopes, scale=scale, h0=h0, cu_seqlens=cu_seqlens, do=do, dht=dht)
    for name, g, w, x in zip(NAMES, got, want, wrt):
        assert g.dtype == x.dtype, f"{name}: dtype {g.dtype} != {x.dtype}"
        assert_close(name, g, w, tol)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(
    "B,T,H,D,E",
    [(1, 1, 1, 16, 16), (2, 77, 2, 32, 64), (1, 128, 2, 64, 32), (3, 33, 1, 16, 128)],
    ids=lambda x: str(x),
)
def test_gradients_match_reference(B, T, H, D, E, dtype, device):
    q, k, v, h0 = make_leaves(B, T, H, D, E, dtype, device)
    check_grads(q, k, v, minimax_slopes(H, 1, 4).to(device), scale=0.3, h0=h0)


@pytest.mark.parametrize("with_dht", [True, False], ids=["dht", "no-dht"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no-h0"])
def test_state_gradients_optional(with_dht, with_h0, device):
    q, k, v, h0 = make_leaves(2, 50, 2, 32, 32, torch.float32, device, state=with_h0)
    check_grads(q, k, v, minimax_slopes(2, 0, 2).to(device), scale=1.7, h0=h0, with_dht=with_dht)


@pytest.mark.parametrize("layer", [0, 7], ids=["strongest-decay", "weakest-decay"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decay_extremes(layer, dtype, device):
    # MiniMax-01's heads 0, 1, 62, 63 of 64: in layer 0, head 0 decays fastest of all
    # (lambda = exp(-2^(-1/8)) ~ 0.40); in the last layer every lambda is ~ 1 - 1e-5
    q, k, v, h0 = make_leaves(1, 100, 4, 32, 32, dtype, device)
    check_grads(q, k, v, minimax_slopes(64, layer, 8)[[0, 1, 62, 63]].to(device), h0=h0)


def test_decay_beyond_minimax(device):
    # lambda = exp(-10): lambda^BT underflows to 0 in fp32, nothing is divided by it
    q, k, v, h0 = make_leaves(1, 70, 2, 16, 16, torch.float32, device)
    check_grads(q, k, v, torch.tensor([10.0, 0.0], device=device), h0=h0)


@pytest.mark.parametrize("lengths", [[0, 1, 39, 0, 57], [1], [0, 0], [64, 17]], ids=str)
def test_varlen_gradients(lengths, device):
    T = sum(lengths)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    q, k, v, h0 = make_leaves(1, T, 2, 32, 16, torch.float32, device, N=len(lengths))
    check_grads(q, k, v, minimax_slopes(2, 0, 3).to(device), scale=0.5, h0=h0, cu_seqlens=cu)


def test_empty_sequence_state_gradient_passes_through(device):
    q, k, v, h0 = make_leaves(1, 0, 2, 16, 16, torch.float32, device)
    o, ht = lightning_attn(q, k, v, minimax_slopes(2, 0, 2).to(device), initial_state=h0, output_final_state=True)
    dht = torch.randn_like(ht)
    (dh0,) = torch.autograd.grad((ht * dht).sum(), [h0])
    assert torch.equal(dh0, dht)


@pytest.fixture(scope="module")
def config_case():
    """One input set and its float64 reference gradients, shared by the config tests."""
    B, T, H, D, E = 1, 150, 2, 64, 32
    q, k, v, h0 = make_leaves(B, T, H, D, E, torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu")
    s = minimax_slopes(H, 2, 4).to(q.device)
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    want = reference_grads(q, k, v, s, scale=0.8, h0=h0, cu_seqlens=None, do=do, dht=dht)
    return [x.detach() for x in (q, k, v, s, h0, do, dht)], want


@pytest.mark.parametrize("BT,BV,num_warps,num_stages", [(16, 16, 4, 2), (32, 64, 8, 2), (128, 32, 4, 3), (64, 128, 4, 2)])
def test_every_config_computes_the_same(BT, BV, num_warps, num_stages, config_case):
    (q, k, v, s, h0, do, dht), want = config_case
    cfg = dict(BT=BT, BV=BV, num_warps=num_warps, num_stages=num_stages)
    assert valid_config(cfg, q.shape[-1], v.shape[-1])
    got = lightning_attn_bwd(q, k, v, s, 0.8, h0, None, do, dht, config=cfg)
    for name, g, w in zip(NAMES, got, want):
        assert_close(f"{name} {cfg}", g, w, TOLERANCE[torch.bfloat16])


def test_invalid_config_is_refused(device):
    q, k, v, _ = make_leaves(1, 8, 1, 16, 32, torch.float32, device, state=False)
    do = torch.randn_like(v)
    assert not valid_config(dict(BT=8, BV=16, num_warps=4, num_stages=2), 16, 32)
    with pytest.raises(ValueError, match="cannot launch"):
        lightning_attn_bwd(q, k, v, minimax_slopes(1, 0, 2), 1.0, None, None, do, None,
                           config=dict(BT=16, BV=16, num_warps=4, num_stages=1))
    assert valid_config(default_config(256, 16), 256, 16)


def test_non_contiguous_inputs_and_gradients(device):
    B, T, H, D = 2, 45, 2, 32
    qkv = torch.randn(B, T, H, 3 * D, device=device, requires_grad=True)
    q, k, v = qkv.split(D, dim=-1)  # strided views, unit last stride
    s = minimax_slopes(H, 0, 2).to(device)
    o, _ = lightning_attn(q, k, v, s, scale=0.9)
    do = torch.randn(B, T, D, H, device=device).transpose(-1, -2)  # do with a non-unit last stride
    (got,) = torch.autograd.grad(o, qkv, do)
    ref_qkv = qkv.detach().double().requires_grad_()
    ro, _ = lightning_attn_ref(*ref_qkv.split(D, dim=-1), s, scale=0.9)
    (want,) = torch.autograd.grad(ro, ref_qkv, do.double())
    assert_close("dqkv", got, want, TOLERANCE[torch.float32])


def test_tma_and_pointer_loads_agree(device):
    # 16-bit fixed-length tensors go through TMA descriptors, others through pointer loads;
    # gradients must come out bit for bit the same (ragged T: a zero-filled last chunk)
    q, k, v, h0 = make_leaves(2, 45, 2, 32, 64, torch.bfloat16, device)
    s = minimax_slopes(2, 1, 4).to(device)
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    cfg = dict(BT=16, BV=32, num_warps=4, num_stages=2)
    args = [x.detach() for x in (q, k, v)]
    got = lightning_attn_bwd(*args, s, 0.6, h0.detach(), None, do, dht, config=cfg)
    ptr = lightning_attn_bwd(*(strided_copy(x) for x in args), s, 0.6, h0.detach(), None, strided_copy(do), dht,
                             config=cfg)
    for name, g, p in zip(NAMES, got, ptr):
        assert torch.equal(g, p), name
    want = reference_grads(q, k, v, s, scale=0.6, h0=h0, cu_seqlens=None, do=do, dht=dht)
    for name, g, w in zip(NAMES, got, want):
        assert_close(name, g, w, TOLERANCE[torch.bfloat16])


def test_expanded_output_gradient(device):
    # o.sum() hands the backward a do of all-zero strides
    q, k, v, _ = make_leaves(1, 20, 1, 16, 16, torch.float32, device, state=False)
    s = minimax_slopes(1, 0, 2).to(device)
    o, _ = lightning_attn(q, k, v, s)
    got = torch.autograd.grad(o.sum(), [q, k, v])
    want = reference_grads(q, k, v, s, scale=1.0, h0=None, cu_seqlens=None, do=torch.ones_like(v), dht=None)
    for name, g, w in zip(NAMES, got, want):
        assert_close(name, g, w, TOLERANCE[torch.float32])


def test_only_final_state_used(device):
    # o unused: its gradient arrives as None (grads are not materialised); dq must be exactly 0
    q, k, v, h0 = make_leaves(1, 30, 2, 16, 32, torch.float32, device)
    s = minimax_slopes(2, 0, 2).to(device)
    _, ht = lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True)
    dht = torch.randn_like(ht)
    got = torch.autograd.grad((ht * dht).sum(), [q, k, v, h0])
    want = reference_grads(q, k, v, s, scale=1.0, h0=h0, cu_seqlens=None, do=torch.zeros_like(v), dht=dht)
    assert torch.equal(got[0], torch.zeros_like(q))
    for name, g, w in list(zip(NAMES, got, want))[1:]:
        assert_close(name, g, w, TOLERANCE[torch.float32])


def test_only_requested_gradients_are_computed(device):
    q, k, v, h0 = make_leaves(1, 40, 1, 16, 16, torch.float32, device)
    k, v, h0 = k.detach(), v.detach(), h0.detach()
    s = minimax_slopes(1, 0, 2).to(device)
    do = torch.randn_like(v)
    o, _ = lightning_attn(q, k, v, s, initial_state=h0)
    (dq,) = torch.autograd.grad(o, q, do)
    want = reference_grads(q, k, v, s, scale=1.0, h0=h0, cu_seqlens=None, do=do, dht=None)
    assert_close("dq", dq, want[0], TOLERANCE[torch.float32])
    none = lightning_attn_bwd(q.detach(), k, v, s, 1.0, h0, None, do, None, needs=(True, False, False, False))
    assert none[1:] == (None, None, None)


def test_saved_tensors_are_inputs_only(device):
    """The memory rule: nothing of size O(T * D * E) beyond the inputs lives between passes."""
    B, T, H, D, E = 1, 64, 2, 16, 32
    q, k, v, h0 = make_leaves(B, T, H, D, E, torch.float32, device)
    s = minimax_slopes(H, 0, 2).to(device)
    o, ht = lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True)
    saved = [t for t in o.grad_fn.saved_tensors if t is not None]
    inputs = {x.data_ptr() for x in (q, k, v, s, h0)}
    assert all(t.data_ptr() in inputs for t in saved), "saved a tensor that is not an input"
    assert sum(t.numel() for t in saved) <= q.numel() + k.numel() + v.numel() + h0.numel() + H


def test_initial_state_gradient_keeps_its_dtype(device):
    q, k, v, _ = make_leaves(1, 10, 1, 16, 16, torch.bfloat16, device, state=False)
    h0 = torch.randn(1, 1, 16, 16, device=device, dtype=torch.float64, requires_grad=True)
    o, _ = lightning_attn(q, k, v, minimax_slopes(1, 0, 2).to(device), initial_state=h0)
    (dh0,) = torch.autograd.grad(o.float().sum(), [h0])
    assert dh0.dtype == torch.float64 and torch.isfinite(dh0).all()

"""Lightning attention forward vs the float64 token-by-token reference (Triton interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch

from kernels.lightning_attn import lightning_attn, minimax_slopes
from kernels.lightning_attn.forward import lightning_attn_fwd, tma_viewable
from reference.lightning_attn import lightning_attn_ref
from tests.helpers import TOLERANCE, assert_close, strided_copy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(B, T, H, D, E, dtype, device, *, state=False, N=None):
    q = torch.randn(B, T, H, D, device=device).to(dtype)
    k = torch.randn(B, T, H, D, device=device).to(dtype)
    v = torch.randn(B, T, H, E, device=device).to(dtype)
    h0 = torch.randn(N or B, H, D, E, device=device) if state else None
    return q, k, v, h0


def check(q, k, v, slopes, *, scale=1.0, h0=None, cu_seqlens=None, config=None):
    tol = TOLERANCE[q.dtype]
    if config is None:
        o, ht = lightning_attn(q, k, v, slopes, scale=scale, initial_state=h0,
                               output_final_state=True, cu_seqlens=cu_seqlens)
    else:
        o, ht = lightning_attn_fwd(q, k, v, slopes, scale, h0, True, cu_seqlens, config=config)
    ref_o, ref_ht = lightning_attn_ref(q, k, v, slopes, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens)
    assert o.dtype == q.dtype and ht.dtype == torch.float32
    assert_close("o", o, ref_o, tol)
    assert_close("final_state", ht, ref_ht, tol)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(
    "B,T,H,D,E",
    [(1, 1, 1, 16, 16), (2, 77, 3, 32, 64), (1, 128, 2, 64, 64), (3, 33, 2, 16, 128), (1, 70, 1, 128, 32)],
    ids=lambda x: str(x),
)
def test_forward_matches_reference(B, T, H, D, E, dtype, device):
    q, k, v, h0 = make_inputs(B, T, H, D, E, dtype, device, state=True)
    check(q, k, v, minimax_slopes(H, 1, 4).to(device), scale=0.3, h0=h0)


@pytest.mark.parametrize("layer", [0, 7], ids=["strongest-decay", "weakest-decay"])
def test_decay_extremes(layer, device):
    # layer 0, head 0 decays fastest (lambda ~ 0.4 at H=4); the last layer barely decays
    q, k, v, h0 = make_inputs(1, 100, 4, 32, 32, torch.float32, device, state=True)
    check(q, k, v, minimax_slopes(4, layer, 8).to(device), h0=h0)


def test_head_dim_256(device):
    q, k, v, _ = make_inputs(1, 20, 1, 256, 16, torch.bfloat16, device)
    check(q, k, v, minimax_slopes(1, 0, 2).to(device))


@pytest.mark.parametrize("lengths", [[0, 1, 39, 0, 57], [1], [0, 0], [64, 17]], ids=str)
def test_varlen_matches_per_sequence_reference(lengths, device):
    T = sum(lengths)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    q, k, v, h0 = make_inputs(1, T, 2, 32, 32, torch.float32, device, state=True, N=len(lengths))
    check(q, k, v, minimax_slopes(2, 0, 3).to(device), h0=h0, cu_seqlens=cu)


@pytest.mark.parametrize("BT,BV,num_warps,num_stages", [(16, 16, 4, 2), (32, 64, 8, 2), (128, 32, 4, 3)])
def test_every_config_computes_the_same(BT, BV, num_warps, num_stages, device):
    q, k, v, h0 = make_inputs(2, 150, 2, 64, 64, torch.bfloat16, device, state=True)
    cfg = dict(BT=BT, BV=BV, num_warps=num_warps, num_stages=num_stages)
    check(q, k, v, minimax_slopes(2, 2, 4).to(device), h0=h0, config=cfg)


def test_non_contiguous_inputs(device):
    B, T, H, D = 2, 45, 2, 32
    qkv = torch.randn(B, T, H, 3 * D, device=device)
    q, k, v = qkv.split(D, dim=-1)  # strided views, unit last stride
    v = v.transpose(1, 2).contiguous().transpose(1, 2)  # another stride order
    qt = torch.randn(B, T, D, H, device=device).transpose(-1, -2)  # last dim not contiguous
    assert not q.is_contiguous() and not qt.is_contiguous()
    check(q, k, v, minimax_slopes(H, 0, 2).to(device))
    check(qt, k, v, minimax_slopes(H, 0, 2).to(device))


def test_tma_and_pointer_loads_agree(device):
    # 16-bit fixed-length inputs go through TMA descriptors, others through pointer loads:
    # the same arithmetic, so the same bits; ragged T covers the zero-filled last chunk
    q, k, v, h0 = make_inputs(2, 77, 3, 32, 64, torch.bfloat16, device, state=True)
    s = minimax_slopes(3, 0, 4).to(device)
    cfg = dict(BT=32, BV=32, num_warps=4, num_stages=2)
    strided = [strided_copy(x) for x in (q, k, v)]
    assert all(tma_viewable(x) for x in (q, k, v)) and not any(tma_viewable(x) for x in strided)
    o, ht = lightning_attn_fwd(q, k, v, s, 0.7, h0, True, None, config=cfg)
    o_ptr, ht_ptr = lightning_attn_fwd(*strided, s, 0.7, h0, True, None, config=cfg)
    assert torch.equal(o, o_ptr) and torch.equal(ht, ht_ptr)
    check(q, k, v, s, scale=0.7, h0=h0, config=cfg)


def test_strides_a_descriptor_cannot_take(device):
    # a batch expanded with stride 0 and odd token strides go through pointer loads; size-1
    # dims with any stride still go through TMA
    s = minimax_slopes(2, 0, 4).to(device)
    q, k, v, _ = make_inputs(1, 40, 2, 16, 32, torch.bfloat16, device)
    expanded = [x.expand(3, -1, -1, -1) for x in (q, k, v)]
    odd_q = torch.randn(1400, dtype=torch.bfloat16, device=device).as_strided((1, 40, 2, 16), (1400, 35, 16, 1))
    single = torch.randn(1, 1, 2, 16, dtype=torch.bfloat16, device=device).as_strided((1, 1, 2, 16), (7, 3, 16, 1))
    assert not tma_viewable(expanded[0]) and not tma_viewable(odd_q) and tma_viewable(single)
    check(*expanded, s)
    check(odd_q, k, v, s)
    check(single, single, single[..., :16], s)


def test_batches_do_not_leak_into_each_other(device):
    # the last chunk of batch row 0 is ragged; rows past T must read as zeros, not as row 1's tokens
    q, k, v, _ = make_inputs(2, 37, 2, 16, 32, torch.bfloat16, device)
    for x in (q, k, v):
        x[1] = float("nan")
    s = minimax_slopes(2, 0, 4).to(device)
    o, ht = lightning_attn(q, k, v, s, output_final_state=True)
    ref_o, ref_ht = lightning_attn_ref(q[:1], k[:1], v[:1], s)
    assert_close("o", o[:1], ref_o, TOLERANCE[q.dtype])
    assert_close("final_state", ht[:1], ref_ht, TOLERANCE[q.dtype])


def test_empty_sequence_state_passes_through(device):
    q, k, v, h0 = make_inputs(1, 0, 2, 16, 16, torch.float32, device, state=True, N=1)
    o, ht = lightning_attn(q, k, v, minimax_slopes(2, 0, 2).to(device), initial_state=h0, output_final_state=True)
    assert o.shape == (1, 0, 2, 16)
    assert torch.equal(ht, h0)


def test_no_final_state_unless_asked(device):
    q, k, v, _ = make_inputs(1, 5, 1, 16, 16, torch.float32, device)
    _, ht = lightning_attn(q, k, v, minimax_slopes(1, 0, 2).to(device))
    assert ht is None


def test_minimax_slopes():
    s = minimax_slopes(8, 0, 4)
    expected = torch.tensor([2.0 ** (-(h + 1)) for h in range(8)]) * (1 + 1e-5)
    torch.testing.assert_close(s, expected)
    assert s.dtype == torch.float32
    last = minimax_slopes(8, 3, 4)
    torch.testing.assert_close(last, expected / (1 + 1e-5) * 1e-5)
    # non power of two: 4 slopes of H=4, then every other slope of H=8
    s6 = minimax_slopes(6, 0, 2) / (1 + 1e-5)
    torch.testing.assert_close(s6, torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], dtype=torch.float32))
    with pytest.raises(ValueError, match="layer_idx"):
        minimax_slopes(8, 4, 4)
    with pytest.raises(TypeError, match="num_heads"):
        minimax_slopes(8.0, 0, 4)


def _good(device):
    q, k, v, h0 = make_inputs(1, 8, 2, 16, 16, torch.float32, device, state=True)
    return dict(q=q, k=k, v=v, slopes=minimax_slopes(2, 0, 2).to(device), initial_state=h0)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: {"q": a["q"][0]}, ValueError, "q must be"),
        (lambda a: {"k": a["k"][:, :4]}, ValueError, "k must have the shape"),
        (lambda a: {"v": a["v"][:, :, :1]}, ValueError, "v must be"),
        (lambda a: {"q": a["q"].double()}, TypeError, "q must be float32"),
        (lambda a: {"k": a["k"].half()}, TypeError, "share a dtype"),
        (lambda a: {"slopes": a["slopes"][:1]}, ValueError, "slopes must be"),
        (lambda a: {"slopes": a["slopes"].long()}, TypeError, "slopes must be a float"),
        (lambda a: {"initial_state": a["initial_state"][..., :8]}, ValueError, "initial_state must be"),
        (lambda a: {"q": torch.randn(1, 8, 2, 24), "k": torch.randn(1, 8, 2, 24)}, ValueError, "D \\(head dim"),
        (lambda a: {"cu_seqlens": torch.tensor([0, 5, 3, 8], dtype=torch.int32)}, ValueError, "non-decreasing"),
        (lambda a: {"cu_seqlens": torch.tensor([0, 4, 7], dtype=torch.int32)}, ValueError, "non-decreasing from 0 to T=8"),
        (lambda a: {"cu_seqlens": torch.tensor([0, 4.0, 8.0])}, ValueError, "cu_seqlens must be a 1-D int"),
        (lambda a: {"q": "x"}, TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_before_launch(change, error, match, device):
    args = _good(device)
    args.update(change(args))
    if "cu_seqlens" in args and args["initial_state"] is not None and args["initial_state"].shape[0] == 1:
        args["initial_state"] = None
    with pytest.raises(error, match=match):
        lightning_attn(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("slopes"), **args)


def test_cu_seqlens_needs_batch_one(device):
    q, k, v, _ = make_inputs(2, 8, 1, 16, 16, torch.float32, device)
    with pytest.raises(ValueError, match="batch size is expected to be 1 rather than 2"):
        lightning_attn(q, k, v, minimax_slopes(1, 0, 2), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_gradients_flow(device):
    # the full gradient checks are in test_lightning_attn_bwd.py; here: every leaf gets a finite gradient
    q, k, v, h0 = make_inputs(1, 4, 1, 16, 16, torch.float32, device, state=True)
    for x in (q, k, v, h0):
        x.requires_grad_()
    o, ht = lightning_attn(q, k, v, minimax_slopes(1, 0, 2).to(device), initial_state=h0, output_final_state=True)
    (o.sum() + ht.sum()).backward()
    for name, x in zip(("q", "k", "v", "initial_state"), (q, k, v, h0)):
        assert x.grad is not None and x.grad.shape == x.shape, name
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name


def test_chunked_reference_matches_token_loop():
    from reference.lightning_attn import lightning_attn_chunked_ref

    q, k, v, h0 = make_inputs(2, 75, 3, 8, 4, torch.float64, "cpu", state=True)
    s = minimax_slopes(3, 0, 2)
    want_o, want_s = lightning_attn_ref(q, k, v, s, scale=0.7, initial_state=h0)
    got_o, got_s = lightning_attn_chunked_ref(q, k, v, s, scale=0.7, initial_state=h0, chunk=16)
    assert_close("o", got_o, want_o, 1e-12)
    assert_close("state", got_s, want_s, 1e-12)


def test_outputs_are_poisoned_in_tests():
    # the conftest fixture that makes unwritten kernel outputs fail must be active here
    assert torch.empty(4).isnan().all()

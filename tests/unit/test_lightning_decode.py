"""Lightning attention decode step vs the float64 token step (Triton interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch

from kernels.lightning_attn import lightning_attn, lightning_decode, minimax_slopes
from kernels.lightning_attn.decode import default_config, valid_config
from reference.lightning_attn import lightning_decode_ref
from tests.helpers import TOLERANCE, assert_close

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_step(B, H, D, E, dtype, device):
    q = torch.randn(B, H, D, device=device).to(dtype)
    k = torch.randn(B, H, D, device=device).to(dtype)
    v = torch.randn(B, H, E, device=device).to(dtype)
    state = torch.randn(B, H, D, E, device=device)
    return q, k, v, state


def check_step(q, k, v, slopes, state, *, scale=1.0, config=None):
    want_o, want_state = lightning_decode_ref(q, k, v, slopes, state.clone(), scale=scale)
    ptr = state.data_ptr()
    o, new_state = lightning_decode(q, k, v, slopes, state, scale=scale, config=config)
    assert new_state is state and state.data_ptr() == ptr, "state must be updated in place"
    assert o.dtype == q.dtype and o.shape == (q.shape[0], q.shape[1], v.shape[-1])
    # the state update is fp32 elementwise (lambda S + k v) from exact inputs: fp32 tolerance for every dtype
    assert_close("state", state, want_state, TOLERANCE[torch.float32])
    assert_close("o", o, want_o, TOLERANCE[q.dtype])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("B,H,D,E", [(1, 1, 16, 16), (3, 2, 32, 64), (1, 4, 128, 32), (3, 1, 64, 256)], ids=str)
def test_step_matches_reference(B, H, D, E, dtype, device):
    q, k, v, state = make_step(B, H, D, E, dtype, device)
    check_step(q, k, v, minimax_slopes(H, 1, 4).to(device), state, scale=0.3)


@pytest.mark.parametrize("BV,num_warps", [(4, 1), (16, 4), (64, 8)])
def test_every_config_computes_the_same(BV, num_warps, device):
    q, k, v, state = make_step(3, 2, 32, 64, torch.float32, device)
    cfg = dict(BV=BV, num_warps=num_warps)
    assert valid_config(cfg, 32, 64)
    check_step(q, k, v, minimax_slopes(2, 0, 2).to(device), state, config=cfg)


@pytest.mark.parametrize("layer", [0, 7], ids=["strongest-decay", "weakest-decay"])
def test_decay_extremes(layer, device):
    q, k, v, state = make_step(1, 4, 32, 32, torch.float32, device)
    check_step(q, k, v, minimax_slopes(64, layer, 8)[[0, 1, 62, 63]].to(device), state)


def test_non_contiguous_inputs(device):
    B, H, D = 3, 2, 32
    qkv = torch.randn(B, H, 3 * D, device=device)
    q, k, v = qkv.split(D, dim=-1)  # strided views, unit last stride
    qt = torch.randn(B, D, H, device=device).transpose(1, 2)  # last dim not contiguous
    slopes = minimax_slopes(2 * H, 0, 2).to(device)[::2]  # strided slopes
    state = torch.randn(B, H, D, D, device=device)
    check_step(q, k, v, slopes, state)
    check_step(qt, k, v, slopes, state)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_then_decode_equals_forward(B, dtype, device):
    """lightning_attn over T0 tokens, then T - T0 decode steps == lightning_attn over T tokens."""
    T, T0, H, D, E = 40, 29, 2, 32, 64
    q = torch.randn(B, T, H, D, device=device).to(dtype)
    k = torch.randn(B, T, H, D, device=device).to(dtype)
    v = torch.randn(B, T, H, E, device=device).to(dtype)
    h0 = torch.randn(B, H, D, E, device=device)
    s = minimax_slopes(H, 1, 4).to(device)
    want_o, want_state = lightning_attn(q, k, v, s, scale=0.6, initial_state=h0, output_final_state=True)
    o0, state = lightning_attn(q[:, :T0], k[:, :T0], v[:, :T0], s, scale=0.6, initial_state=h0, output_final_state=True)
    steps = [lightning_decode(q[:, t], k[:, t], v[:, t], s, state, scale=0.6)[0] for t in range(T0, T)]
    o = torch.cat([o0, torch.stack(steps, dim=1)], dim=1)
    tol = TOLERANCE[dtype]
    assert_close("o", o, want_o.float(), tol)
    assert_close("state", state, want_state, tol)


def test_empty_batch(device):
    q, k, v, state = make_step(0, 2, 16, 16, torch.float32, device)
    o, new_state = lightning_decode(q, k, v, minimax_slopes(2, 0, 2).to(device), state)
    assert o.shape == (0, 2, 16) and new_state is state


def test_default_config_is_valid():
    for D in (16, 64, 128, 256):
        for E in (16, 64, 128, 256):
            assert valid_config(default_config(D, E), D, E)
    assert not valid_config(dict(BV=24, num_warps=4), 16, 48)
    assert not valid_config(dict(BV=64, num_warps=4), 256, 64)  # 16K fp32 state elements per program


def _good(device):
    q, k, v, state = make_step(2, 2, 16, 32, torch.float32, device)
    return dict(q=q, k=k, v=v, slopes=minimax_slopes(2, 0, 2).to(device), state=state)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: {"q": a["q"][None]}, ValueError, "q must be \\[B, H, D\\]"),
        (lambda a: {"k": a["k"][:1]}, ValueError, "k must have the shape"),
        (lambda a: {"v": a["v"][:, :1]}, ValueError, "v must be"),
        (lambda a: {"q": a["q"].double(), "k": a["k"].double()}, TypeError, "q must be float32"),
        (lambda a: {"v": a["v"].half()}, TypeError, "share a dtype"),
        (lambda a: {"slopes": a["slopes"][:1]}, ValueError, "slopes must be"),
        (lambda a: {"slopes": a["slopes"].long()}, TypeError, "slopes must be a float"),
        (lambda a: {"state": a["state"].double()}, TypeError, "state must be float32"),
        (lambda a: {"state": a["state"][..., :16]}, ValueError, "state must be \\[B, H, D, E\\]"),
        (lambda a: {"state": a["state"].transpose(-1, -2).contiguous().transpose(-1, -2)}, ValueError, "contiguous"),
        (lambda a: {"q": torch.randn(2, 2, 24), "k": torch.randn(2, 2, 24)}, ValueError, "D \\(head dim"),
        (lambda a: {"state": "x"}, TypeError, "state must be a torch.Tensor"),
        (lambda a: {"config": dict(BV=12, num_warps=4)}, ValueError, "cannot launch"),
    ],
)
def test_bad_input_raises_before_launch(change, error, match, device):
    args = _good(device)
    args.update(change(args))
    state = args["state"]
    before = state.clone() if isinstance(state, torch.Tensor) else None
    with pytest.raises(error, match=match):
        lightning_decode(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("slopes"), args.pop("state"), **args)
    if before is not None:
        assert torch.equal(state, before), "a refused call must not touch the state"

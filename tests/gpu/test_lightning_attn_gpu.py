"""Lightning attention forward on the GPU at real sizes vs the float64 chunked reference."""
import pytest
import torch

from kernels.lightning_attn import lightning_attn, minimax_slopes
from kernels.lightning_attn.forward import lightning_attn_fwd
from reference.lightning_attn import lightning_attn_chunked_ref, lightning_attn_ref
from tests.helpers import TOLERANCE, assert_close

pytestmark = pytest.mark.gpu


def _inputs(B, T, H, D, E, dtype):
    return (torch.randn(B, T, H, D, device="cuda", dtype=dtype), torch.randn(B, T, H, D, device="cuda", dtype=dtype),
            torch.randn(B, T, H, E, device="cuda", dtype=dtype))


@pytest.mark.parametrize(
    "B,T,H,D,E,layer",
    [(1, 65536, 8, 128, 128, 3), (1, 16384, 64, 128, 128, 0), (2, 4133, 16, 64, 64, 7), (3, 1000, 4, 256, 256, 1),
     (1, 1, 4, 128, 128, 0)],
    ids=lambda x: str(x),
)
def test_bf16_large_matches_reference(B, T, H, D, E, layer):
    q, k, v = _inputs(B, T, H, D, E, torch.bfloat16)
    s = minimax_slopes(H, layer, 8).cuda()
    h0 = torch.randn(B, H, D, E, device="cuda")
    o, ht = lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True)
    ro, rh = lightning_attn_chunked_ref(q, k, v, s, initial_state=h0)
    assert_close("o", o, ro, TOLERANCE[torch.bfloat16])
    assert_close("final_state", ht, rh, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_other_dtypes(dtype):
    q, k, v = _inputs(2, 3000, 8, 64, 128, dtype)
    s = minimax_slopes(8, 2, 8).cuda()
    o, ht = lightning_attn(q, k, v, s, scale=0.5, output_final_state=True)
    ro, rh = lightning_attn_chunked_ref(q, k, v, s, scale=0.5)
    assert_close("o", o, ro, TOLERANCE[dtype])
    assert_close("final_state", ht, rh, TOLERANCE[dtype])


def test_varlen_on_gpu():
    lengths = [0, 1, 700, 0, 2049, 64]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = _inputs(1, sum(lengths), 4, 64, 64, torch.float32)
    s = minimax_slopes(4, 0, 8).cuda()
    h0 = torch.randn(len(lengths), 4, 64, 64, device="cuda")
    o, ht = lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    ro, rh = lightning_attn_ref(q.cpu(), k.cpu(), v.cpu(), s.cpu(), initial_state=h0.cpu(), cu_seqlens=cu.cpu())
    assert_close("o", o.cpu(), ro, TOLERANCE[torch.float32])
    assert_close("final_state", ht.cpu(), rh, TOLERANCE[torch.float32])


@pytest.mark.parametrize("BT", [32, 64, 128])
@pytest.mark.parametrize("BV", [16, 32, 64, 128])
@pytest.mark.parametrize("num_warps", [4, 8])
def test_every_valid_config_is_correct(BT, BV, num_warps):
    """The tuner's space (num_stages >= 2): any config it may pick computes the function."""
    q, k, v = _inputs(1, 2500, 8, 128, 128, torch.bfloat16)
    s = minimax_slopes(8, 1, 8).cuda()
    ro, _ = lightning_attn_chunked_ref(q, k, v, s)
    for stages in (2, 3):
        cfg = dict(BT=BT, BV=BV, num_warps=num_warps, num_stages=stages)
        try:
            o, _ = lightning_attn_fwd(q, k, v, s, 1.0, None, False, None, config=cfg)
        except Exception as exc:  # out of shared memory is a compile-time refusal, not a wrong answer
            if "OutOfResources" in type(exc).__name__:
                continue
            raise
        assert_close(f"o {cfg}", o, ro, TOLERANCE[torch.bfloat16])

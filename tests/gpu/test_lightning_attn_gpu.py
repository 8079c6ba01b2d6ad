"""Lightning attention forward on the GPU at real sizes vs the float64 chunked reference."""
import threading

import pytest
import torch

from autotune import lightning as tunable
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


SHAPE_128 = {"D": 128, "E": 128, "dtype": "bf16"}  # the config tests' head dims, as the tuner prunes them


@pytest.mark.parametrize("BT", [32, 64, 128])
@pytest.mark.parametrize("BV", [16, 32, 64, 128])
@pytest.mark.parametrize("num_warps", [4, 8])
def test_every_valid_config_is_correct(BT, BV, num_warps):
    """The tuner's space (num_stages >= 2): any config it may pick computes the function."""
    q, k, v = _inputs(1, 2500, 8, 128, 128, torch.bfloat16)
    s = minimax_slopes(8, 1, 8).cuda()
    ro, _ = lightning_attn_chunked_ref(q, k, v, s)
    for stages in (2, 3, 4, 5):  # the tuner's stages; 4 won on an H100 with TMA loads
        cfg = dict(BT=BT, BV=BV, num_warps=num_warps, num_stages=stages)
        if not tunable.is_valid(cfg, SHAPE_128):  # pruned before compiling, never launched
            continue
        try:
            o, _ = lightning_attn_fwd(q, k, v, s, 1.0, None, False, None, config=cfg)
        except Exception as exc:  # out of shared memory is a compile-time refusal, not a wrong answer
            if "OutOfResources" in type(exc).__name__:
                continue
            raise
        assert_close(f"o {cfg}", o, ro, TOLERANCE[torch.bfloat16])


# ---- backward (issue 4) --------------------------------------------------------------------

def _ref_grads(q, k, v, s, *, scale, h0, do, dht):
    """float64 autograd through the chunked reference of <o, do> + <final_state, dht>."""
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)] + ([h0.detach().double().requires_grad_()] if h0 is not None else [])
    ro, rh = lightning_attn_chunked_ref(*ref[:3], s, scale=scale, initial_state=ref[3] if h0 is not None else None)
    loss = (ro * do.double()).sum() + ((rh * dht.double()).sum() if dht is not None else 0.0)
    return torch.autograd.grad(loss, ref)


def _grads_vs_chunked_ref(q, k, v, s, *, scale=1.0, h0=None, with_dht=True):
    """Pairs (name, ours, float64 reference) for dq, dk, dv (and dh0), through lightning_attn's autograd."""
    B, T, H, D = q.shape
    do = torch.randn_like(v)
    dht = torch.randn(B, H, D, v.shape[-1], device="cuda") if with_dht else None
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)] + ([h0.detach().clone().requires_grad_()] if h0 is not None else [])
    o, ht = lightning_attn(*leaves[:3], s, scale=scale, initial_state=leaves[3] if h0 is not None else None,
                           output_final_state=with_dht)
    loss = (o.float() * do.float()).sum() + ((ht * dht).sum() if with_dht else 0.0)
    got = torch.autograd.grad(loss, leaves)
    return list(zip(("dq", "dk", "dv", "dh0"), got, _ref_grads(q, k, v, s, scale=scale, h0=h0, do=do, dht=dht)))


@pytest.mark.parametrize(
    "B,T,H,D,E,layer",
    [(1, 65536, 4, 128, 128, 3), (1, 16384, 16, 128, 128, 0), (2, 4133, 16, 64, 64, 7), (3, 1000, 4, 256, 256, 1),
     (1, 1, 4, 128, 128, 0)],
    ids=lambda x: str(x),
)
def test_backward_bf16_large_matches_reference(B, T, H, D, E, layer):
    q, k, v = _inputs(B, T, H, D, E, torch.bfloat16)
    h0 = torch.randn(B, H, D, E, device="cuda")
    for name, g, w in _grads_vs_chunked_ref(q, k, v, minimax_slopes(H, layer, 8).cuda(), scale=D**-0.5, h0=h0):
        assert_close(name, g, w, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_other_dtypes(dtype):
    q, k, v = _inputs(2, 3000, 8, 64, 128, dtype)
    h0 = torch.randn(2, 8, 64, 128, device="cuda")
    for name, g, w in _grads_vs_chunked_ref(q, k, v, minimax_slopes(8, 2, 8).cuda(), scale=0.5, h0=h0):
        assert_close(name, g, w, TOLERANCE[dtype])


def test_backward_varlen_on_gpu():
    lengths = [0, 1, 300, 0, 513, 64]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (x.requires_grad_() for x in _inputs(1, sum(lengths), 2, 64, 64, torch.float32))
    s = minimax_slopes(2, 0, 8).cuda()
    h0 = torch.randn(len(lengths), 2, 64, 64, device="cuda", requires_grad=True)
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    o, ht = lightning_attn(q, k, v, s, scale=0.7, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    got = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), [q, k, v, h0])
    ref = [x.detach().cpu().double().requires_grad_() for x in (q, k, v, h0)]
    ro, rh = lightning_attn_ref(*ref[:3], s.cpu(), scale=0.7, initial_state=ref[3], cu_seqlens=cu.cpu())
    want = torch.autograd.grad((ro * do.cpu().double()).sum() + (rh * dht.cpu().double()).sum(), ref)
    for name, g, w in zip(("dq", "dk", "dv", "dh0"), got, want):
        assert_close(name, g.cpu(), w, TOLERANCE[torch.float32])


@pytest.mark.parametrize("BT", [32, 64, 128])
@pytest.mark.parametrize("BV", [16, 32, 64, 128])
@pytest.mark.parametrize("num_warps", [4, 8])
def test_every_valid_backward_config_is_correct(BT, BV, num_warps):
    """Any config the tuner may pick (num_stages >= 2) computes the gradients."""
    from kernels.lightning_attn.backward import lightning_attn_bwd

    q, k, v = _inputs(1, 2500, 8, 128, 128, torch.bfloat16)
    h0 = torch.randn(1, 8, 128, 128, device="cuda")
    s = minimax_slopes(8, 1, 8).cuda()
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    want = _ref_grads(q, k, v, s, scale=1.0, h0=h0, do=do, dht=dht)
    for stages in (2, 3, 4, 5):  # the tuner's stages; 4 won on an H100 with TMA loads
        cfg = dict(BT=BT, BV=BV, num_warps=num_warps, num_stages=stages)
        if not tunable.is_valid_bwd(cfg, SHAPE_128):  # pruned before compiling, never launched
            continue
        try:
            got = lightning_attn_bwd(q, k, v, s, 1.0, h0, None, do, dht, config=cfg)
        except Exception as exc:  # out of shared memory is a compile-time refusal, not a wrong answer
            if "OutOfResources" in type(exc).__name__:
                continue
            raise
        for name, g, w in zip(("dq", "dk", "dv", "dh0"), got, want):
            assert_close(f"{name} {cfg}", g, w, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("B,T", [(1, 16384), (8, 4096)], ids=["B1-T16K", "B8-T4K"])
def test_forward_backward_memory_at_most_5x_q(B, T):
    """Issue 4's memory target: forward + backward allocate at most 5x the size of q on top of
    q, k, v, do (fla: 12x). Ours: o, dq, dk, dv and [N, H, D, E] states."""
    H, D = 64, 128
    q, k, v = (x.requires_grad_() for x in _inputs(B, T, H, D, D, torch.bfloat16))
    do = torch.randn_like(v)
    s = minimax_slopes(H, 0, 8).cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    o, _ = lightning_attn(q, k, v, s)
    o.backward(do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 5 * q.nbytes, f"forward+backward allocated {extra / q.nbytes:.2f}x the size of q"


# ---- decode (issue 4) ----------------------------------------------------------------------

def _decode_configs(D: int, E: int) -> list[dict]:
    """Every config the decode tuner may try at (D, E), both backends (CuPy where installed)."""
    from autotune.lightning_decode import TUNABLE
    from kernels.lightning_attn.decode import valid_config

    return [c for c in TUNABLE.configs() if valid_config(c, D, E)]


def _check_decode(B, H, D, E, dtype, config, *, slopes_dtype=torch.float32, strided=False):
    from kernels.lightning_attn import lightning_decode
    from reference.lightning_attn import lightning_decode_ref

    q, k = (torch.randn(B, H, 2 * D if strided else D, device="cuda", dtype=dtype)[..., :D] for _ in range(2))
    v = torch.randn(B, H, E, device="cuda", dtype=dtype)
    state = torch.randn(B, H, D, E, device="cuda")
    s = minimax_slopes(H, 0, 8).cuda().to(slopes_dtype)
    want_o, want_state = lightning_decode_ref(q, k, v, s, state.clone(), scale=D**-0.5)
    o, new_state = lightning_decode(q, k, v, s, state, scale=D**-0.5, config=config)
    assert new_state is state
    assert_close(f"state {config}", state, want_state, TOLERANCE[torch.float32])
    assert_close(f"o {config}", o, want_o, TOLERANCE[dtype])


@pytest.mark.parametrize("B", [1, 16, 256])
def test_decode_matches_reference(B):
    _check_decode(B, 64, 128, 128, torch.bfloat16, None)


@pytest.mark.parametrize("D,E", [(128, 128), (64, 256), (256, 16)], ids=lambda x: str(x))
def test_every_decode_config_is_correct(D, E):
    """Both backends, every config of the tuner's space that is valid at (D, E)."""
    configs = _decode_configs(D, E)
    assert any(c["backend"] == "triton" for c in configs)
    for config in configs:
        _check_decode(5, 8, D, E, torch.bfloat16, config)


@pytest.mark.parametrize("dtype,slopes_dtype", [(torch.float32, torch.float64), (torch.float16, torch.bfloat16)],
                         ids=["fp32-slopes64", "fp16-slopes-bf16"])
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_decode_dtypes_and_strides(dtype, slopes_dtype, backend):
    configs = [c for c in _decode_configs(128, 64) if c["backend"] == backend]
    if not configs:
        pytest.skip(f"{backend} backend not available (CuPy not installed)")
    _check_decode(3, 4, 128, 64, dtype, configs[len(configs) // 2], slopes_dtype=slopes_dtype, strided=True)


def test_prefill_then_decode_on_gpu():
    from kernels.lightning_attn import lightning_decode

    B, T, T0, H, D = 2, 4104, 4096, 16, 128
    q, k, v = _inputs(B, T, H, D, D, torch.bfloat16)
    s = minimax_slopes(H, 1, 8).cuda()
    want_o, want_state = lightning_attn(q, k, v, s, output_final_state=True)
    _, state = lightning_attn(q[:, :T0], k[:, :T0], v[:, :T0], s, output_final_state=True)
    steps = torch.stack([lightning_decode(q[:, t], k[:, t], v[:, t], s, state)[0] for t in range(T0, T)], dim=1)
    assert_close("o", steps, want_o[:, T0:].float(), TOLERANCE[torch.bfloat16])
    assert_close("state", state, want_state, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_decode_step_captures_in_a_cuda_graph(backend):
    """No host sync and no allocation outside the graph pool: the step captures and replays."""
    from kernels.lightning_attn import lightning_decode

    configs = [c for c in _decode_configs(128, 128) if c["backend"] == backend]
    if not configs:
        pytest.skip(f"{backend} backend not available (CuPy not installed)")
    config = configs[0]
    B, H, D = 16, 64, 128
    q, k, v = (torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    s = minimax_slopes(H, 0, 8).cuda()
    state = torch.randn(B, H, D, D, device="cuda")
    eager_state = state.clone()
    lightning_decode(q, k, v, s, state.clone(), config=config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, _ = lightning_decode(q, k, v, s, state, config=config)
    state.copy_(eager_state)
    for _ in range(3):
        graph.replay()
        want, _ = lightning_decode(q, k, v, s, eager_state, config=config)
    torch.cuda.synchronize()
    assert torch.equal(state, eager_state)
    assert torch.equal(o, want)


def test_tma_launch_on_a_thread_without_a_cuda_context():
    # autograd runs the backward on its own thread, where no CUDA context may be current when
    # every allocation comes from torch's cache: the TMA descriptors must still be made there
    # (kernels/_tma.py; this failed a benchmark run on an H100 before the fix)
    q, k, v = (x.requires_grad_() for x in _inputs(2, 1000, 4, 128, 128, torch.bfloat16))
    s = minimax_slopes(4, 1, 8).cuda()
    do = torch.randn_like(v)
    want = torch.autograd.grad(lightning_attn(q, k, v, s)[0], (q, k, v), do)  # frees blocks into the cache
    result = {}

    def run():
        try:
            result["got"] = torch.autograd.grad(lightning_attn(q, k, v, s)[0], (q, k, v), do)
        except Exception as e:  # noqa: BLE001 (re-raised below, on the test's thread)
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the launch on a fresh thread did not finish in 120 s"
    if "error" in result:
        raise result["error"]
    for name, g, w in zip(("dq", "dk", "dv"), result["got"], want):
        assert torch.equal(g, w), name


def test_forward_with_tma_descriptors_captures_in_a_cuda_graph():
    # kernels/_tma.py must not query a stream that is being captured
    q, k, v = _inputs(1, 1000, 4, 128, 128, torch.bfloat16)
    s = minimax_slopes(4, 1, 8).cuda()
    want, _ = lightning_attn(q, k, v, s)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got, _ = lightning_attn(q, k, v, s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)

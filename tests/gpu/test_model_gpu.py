"""The hybrid decoder on the GPU in bf16 at MiniMax-Text-01's per-layer sizes: 2 layers of the
bench config (1 lightning + 1 softmax, hidden 6144, 64 heads of 128, 32 experts of 9216),
kernels vs the float64 references, and prefill + decode vs one forward.

The two models share one set of weights (27 GB in bf16; the reference model is built on the
meta device and takes the kernels model's tensors with ``load_state_dict(assign=True)``).

Every token goes to all 32 experts (``top_k = num_experts``), so the MoE is a continuous
function of its input. With top-2, the two computations (kernels vs references, or the
chunked kernel vs the decode step) differ by bf16 rounding before each router, which flips the
choice of the second expert for a near-tie token: by our estimate about 1 token in 200 per
layer, and such a token's logits move by tens of percent, far beyond bf16 tolerance. Top-2
routing at these sizes is checked by tests/gpu/test_moe_gemm_gpu.py on fixed logits.

bf16 tolerance 1e-2 (relative Frobenius error, DESIGN.md): every stored activation is rounded
to bf16 in both implementations, with fp32 (kernels) or float64 (references) arithmetic.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model import HybridDecoder, get_config
from tests.helpers import TOLERANCE, assert_close

pytestmark = pytest.mark.gpu
BF16 = TOLERANCE[torch.bfloat16]
BENCH = get_config("bench")
CONFIG = dataclasses.replace(BENCH, name="bench-2-layers", num_layers=2, softmax_every=2, top_k=BENCH.num_experts)


@pytest.fixture(scope="module")
def models() -> tuple[HybridDecoder, HybridDecoder]:
    kernels = HybridDecoder(CONFIG, impl="kernels", device="cuda", dtype=torch.bfloat16)
    reference = HybridDecoder(CONFIG, impl="reference", device="meta")
    reference.load_state_dict(kernels.state_dict(), assign=True)
    return kernels, reference


def random_ids(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (B, T), device="cuda")


@torch.no_grad()
def test_kernels_match_reference_bf16(models):
    kernels, reference = models
    ids = random_ids(2, 100)  # not a multiple of the lightning kernel's 64-token chunk
    logits, _ = kernels(ids)
    want, _ = reference(ids)
    assert logits.dtype == torch.bfloat16
    assert_close("logits", logits, want, BF16)


@torch.no_grad()
def test_prefill_then_decode_equals_one_forward_bf16(models):
    kernels, _ = models
    B, T, T0 = 2, 80, 70
    ids = random_ids(B, T)
    want, _ = kernels(ids)
    first, cache = kernels(ids[:, :T0], use_cache=True)
    steps = [kernels(ids[:, t:t + 1], cache=cache, use_cache=True)[0] for t in range(T0, T)]
    assert cache.seq_len == T
    assert_close("logits", torch.cat([first, *steps], dim=1), want, BF16)

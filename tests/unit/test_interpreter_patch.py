"""The interpreter's bfloat16 fixes (kernels/_interpreter.py) do what compiled kernels do."""
import os

import pytest
import torch
import triton
import triton.language as tl

import kernels  # noqa: F401  (installs the patch)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")


@triton.jit
def _dot_and_cast(a, b, c, d, M: tl.constexpr):
    o = tl.arange(0, M)
    offs = o[:, None] * M + o[None, :]
    x, y = tl.load(a + offs), tl.load(b + offs)
    tl.store(c + offs, tl.dot(x, y))
    tl.store(d + offs, tl.load(c + offs).to(tl.bfloat16))


def test_bf16_dot_and_round_to_nearest_even():
    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    c, d = torch.empty(16, 16), torch.empty(16, 16, dtype=torch.bfloat16)
    _dot_and_cast[(1,)](a, b, c, d, M=16)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-6, atol=1e-5)
    assert torch.equal(d, c.bfloat16())  # torch rounds to nearest even

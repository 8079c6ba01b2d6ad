"""`kwb check`: every kernel vs its reference, and a NaN never passes."""
import math

from autotune.check import CheckResult, run_checks


def test_every_kernel_passes_its_check():
    results = run_checks()
    assert {r.kernel for r in results} >= {"lightning_attn_fwd", "lightning_attn_bwd", "lightning_decode", "grouped_gemm", "moe_ffn"}
    failed = [(r.kernel, r.case, r.rel_err) for r in results if not r.ok]
    assert not failed, failed


def test_nan_never_passes():
    assert not CheckResult("k", "c", "float32", math.nan, 1e-5, 0.0).ok
    assert not CheckResult("k", "c", "float32", 2e-5, 1e-5, 0.0).ok
    assert CheckResult("k", "c", "float32", 1e-6, 1e-5, 0.0).ok

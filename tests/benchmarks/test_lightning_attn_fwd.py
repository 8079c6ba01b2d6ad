"""pytest-benchmark: lightning attention forward vs fla, SDPA and the HBM floor (H100).

Run with ``pytest tests/benchmarks --benchmark-enable``. The trusted numbers are CUDA-event
medians on rotated inputs (``profiling.bench``), appended to
``$KWB_RESULTS_DIR/lightning_attn_fwd.jsonl`` (default ``results/``) and shown in the
pytest-benchmark table's extra_info; the table's own wall-clock rounds include a sync each.
"""
import os

import pytest
import torch

from autotune.benchmarks import LIGHTNING_FWD_SHAPES, LightningFwdCase, save, shape_id

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("provider", ["ours", "fla", "sdpa"])
@pytest.mark.parametrize("shape", LIGHTNING_FWD_SHAPES, ids=shape_id)
def test_lightning_attn_fwd(benchmark, shape, provider):
    case = LightningFwdCase(shape, provider)
    if not case.available:
        pytest.skip(f"{provider} is not installed")
    record = case.measure()
    err = record.extra.get("rel_err_vs_ref")
    assert err is None or err < 1e-2, f"{provider} disagrees with the float64 reference: {err:.3e}"
    save([record], os.environ.get("KWB_RESULTS_DIR", "results"))
    benchmark.extra_info.update(median_ms=record.median_ms, p20_ms=record.p20_ms, p80_ms=record.p80_ms,
                                floor_ms=record.floor_ms, x_floor=record.median_ms / record.floor_ms)

    def call_and_sync():
        case.call(0)
        torch.cuda.synchronize()

    benchmark.pedantic(call_and_sync, rounds=10, warmup_rounds=2)

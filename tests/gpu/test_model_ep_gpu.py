"""The tiny hybrid decoder with its experts sharded over 2 GPUs (NCCL): logits and every
gradient equal one process running the full model (the CPU test's worker, on CUDA)."""
from __future__ import annotations

import pytest
import torch

from tests.unit.test_model_ep import check_expert_parallel_model

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_expert_parallel_model_on_nccl(tmp_path):
    check_expert_parallel_model({"W": 2, "backend": "nccl"}, tmp_path)

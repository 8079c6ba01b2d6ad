"""The hybrid decoder with its experts sharded over 2 gloo ranks (expert parallelism), on CPU
through the interpreter: each rank runs its own batch rows; the logits, the expert weights'
gradients (each rank's shard) and the replicated weights' gradients (summed over ranks)
equal one process running the full model on all rows."""
from __future__ import annotations

import datetime
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import assert_close  # noqa: E402
from tests.ranks import spawn_ranks  # noqa: E402

TOL = 1e-4  # fp32 kernels on both sides; the EP path sums a token's k copies in the same order
B, T = 2, 6


def _worker(rank: int, port: int, case: dict) -> dict:
    """One rank; ``case["backend"]`` "gloo" (CPU, interpreter) or "nccl" (one GPU per rank)."""
    import torch.distributed as dist

    nccl = case.get("backend") == "nccl"
    kwargs = {}
    if nccl:
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    else:
        os.environ["TRITON_INTERPRET"] = "1"
    device = f"cuda:{rank}" if nccl else "cpu"
    dist.init_process_group(case.get("backend", "gloo"), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=case["W"], timeout=datetime.timedelta(seconds=60), **kwargs)
    from model import HybridDecoder, get_config, shard_experts
    from model.moe import is_expert_weight

    config = get_config("tiny")
    W = case["W"]
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(3)  # the same full weights on every rank
    full = HybridDecoder(config, "kernels").to(device)
    ids = torch.randint(0, config.vocab_size, (W * B, T), generator=g).to(device)
    probe = torch.randn(W * B, T, config.vocab_size, generator=g).to(device)
    ep = HybridDecoder(config, "kernels", ep_group=dist.group.WORLD, device=device)
    ep.load_state_dict(shard_experts(full.state_dict(), rank, W))
    rows = slice(rank * B, (rank + 1) * B)
    logits, _ = ep(ids[rows])
    (logits * probe[rows]).sum().backward()
    grads = {}
    for name, p in ep.named_parameters():
        grad = p.grad.clone()
        if not is_expert_weight(name):
            dist.all_reduce(grad)  # replicated weights: each rank saw its own tokens only
        grads[name] = grad
    result = {"logits": logits.detach().cpu(), "grads": {n: t.cpu() for n, t in grads.items()}}
    if rank == 0:
        want, _ = full(ids)
        (want * probe).sum().backward()
        result["full"] = {"logits": want.detach().cpu(), "grads": {n: p.grad.cpu() for n, p in full.named_parameters()}}
    if nccl:
        torch.cuda.synchronize()
    dist.destroy_process_group()
    return result


def check_expert_parallel_model(case: dict, tmp_path) -> None:
    """Spawn ``case["W"]`` ranks of :func:`_worker` and compare with the full model."""
    from model.moe import shard_experts

    W = case["W"]
    results = spawn_ranks(_worker, case, tmp_path, 240)
    full = results[0]["full"]
    assert_close("logits", torch.cat([r["logits"] for r in results]), full["logits"], TOL)
    shards = [shard_experts(full["grads"], r, W) for r in range(W)]
    for name in full["grads"]:
        for r, res in enumerate(results):
            assert_close(f"rank {r} grad {name}", res["grads"][name], shards[r][name], TOL)


@pytest.mark.timeout(300)
def test_expert_parallel_model_equals_the_full_model(tmp_path):
    check_expert_parallel_model({"W": 2, "backend": "gloo"}, tmp_path)


def test_bad_expert_parallel_arguments():
    from model import HybridDecoder, shard_experts

    with pytest.raises(ValueError, match="not initialised"):
        HybridDecoder("tiny", "kernels", ep_group=object())
    with pytest.raises(ValueError, match="rank must be in"):
        shard_experts({}, 2, 2)
    with pytest.raises(ValueError, match="do not split over 3 ranks"):
        shard_experts({"layers.0.moe.w_down": torch.zeros(4, 2, 2)}, 0, 3)

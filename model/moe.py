"""The mixture-of-experts FFN sublayer: an fp32 router and top-k SwiGLU experts, on one
process or with the experts sharded over a process group (expert parallelism)."""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.impl import Impl

_EXPERT_WEIGHT = re.compile(r"(^|\.)moe\.(w_gate_up|w_down)$")


class MoEFeedForward(nn.Module):
    """``moe(x, x W_router, w_gate_up, w_down, top_k)``: softmax over the experts' logits, the
    top_k experts per token with renormalised weights, ``(silu(x W_g) * (x W_u)) W_down`` per
    expert (see ``kernels.moe_gemm.moe_ffn``).

    The router runs in float32 (MiniMax-01 keeps its gate weight and logits in float32): its
    weight is created float32 whatever ``dtype`` the rest of the layer gets. The expert
    weights are stored in the kernel's layout: ``w_gate_up [num_experts, hidden, 2F]`` (gate
    columns then up columns) and ``w_down [num_experts, F, hidden]``.

    With ``ep_group`` (a ``torch.distributed`` process group of W ranks, W dividing
    num_experts) this rank holds only its experts ``[r * E/W, (r + 1) * E/W)`` (``[E/W, ...]``
    weights; :func:`shard_experts` cuts them from a full state dict) and the sublayer runs
    ``kernels.a2a_overlap.moe_ffn_ep``: every rank of the group must run the layer together.
    The router is replicated.
    """

    def __init__(self, config: ModelConfig, impl: Impl, *, ep_group=None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.impl, self.top_k, self.ep_group = impl, config.top_k, ep_group
        E, Hd, F_ = config.num_experts, config.hidden_size, config.expert_hidden_size
        E_local = E // expert_parallel_size(ep_group, E)
        self.router = nn.Linear(Hd, E, bias=False, device=device, dtype=torch.float32)
        self.w_gate_up = nn.Parameter(torch.empty(E_local, Hd, 2 * F_, device=device, dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(E_local, F_, Hd, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, hidden]`` -> ``[B, T, hidden]`` in x's dtype."""
        tokens = x.reshape(-1, x.shape[-1])  # [B*T, hidden]
        logits = F.linear(tokens.float(), self.router.weight.float())  # [B*T, num_experts] float32
        if self.ep_group is None:
            out = self.impl.moe(tokens, logits, self.w_gate_up, self.w_down, self.top_k)
        else:
            out = self.impl.moe_ep(tokens, logits, self.w_gate_up, self.w_down, self.top_k, self.ep_group)
        return out.view(x.shape)


def expert_parallel_size(ep_group, num_experts: int) -> int:
    """W of ``ep_group`` (1 for None); ValueError unless torch.distributed is initialised and
    W divides ``num_experts``."""
    if ep_group is None:
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("ep_group was given but torch.distributed is not initialised")
    W = dist.get_world_size(ep_group)
    if num_experts % W:
        raise ValueError(f"ep_group has {W} ranks, which does not divide num_experts = {num_experts}")
    return W


def is_expert_weight(name: str) -> bool:
    """Whether a state-dict / parameter name is an expert weight (sharded under expert
    parallelism; every other weight is replicated)."""
    return _EXPERT_WEIGHT.search(name) is not None


def shard_experts(state_dict: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """A full model's state dict -> rank ``rank``'s of ``world_size``: every ``*.moe.w_gate_up``
    and ``*.moe.w_down`` cut to experts ``[rank * E/W, (rank + 1) * E/W)`` (views, no copy);
    everything else as is."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    out = {}
    for name, t in state_dict.items():
        if is_expert_weight(name):
            if t.shape[0] % world_size:
                raise ValueError(f"{name}: {t.shape[0]} experts do not split over {world_size} ranks")
            n = t.shape[0] // world_size
            t = t[rank * n:(rank + 1) * n]
        out[name] = t
    return out

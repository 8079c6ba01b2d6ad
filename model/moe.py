"""The mixture-of-experts FFN sublayer: an fp32 router and top-k SwiGLU experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.impl import Impl


class MoEFeedForward(nn.Module):
    """``moe(x, x W_router, w_gate_up, w_down, top_k)``: softmax over the experts' logits, the
    top_k experts per token with renormalised weights, ``(silu(x W_g) * (x W_u)) W_down`` per
    expert (see ``kernels.moe_gemm.moe_ffn``).

    The router runs in float32 (MiniMax-01 keeps its gate weight and logits in float32): its
    weight is created float32 whatever ``dtype`` the rest of the layer gets. The expert
    weights are stored in the kernel's layout: ``w_gate_up [num_experts, hidden, 2F]`` (gate
    columns then up columns) and ``w_down [num_experts, F, hidden]``.
    """

    def __init__(self, config: ModelConfig, impl: Impl, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.impl, self.top_k = impl, config.top_k
        E, Hd, F_ = config.num_experts, config.hidden_size, config.expert_hidden_size
        self.router = nn.Linear(Hd, E, bias=False, device=device, dtype=torch.float32)
        self.w_gate_up = nn.Parameter(torch.empty(E, Hd, 2 * F_, device=device, dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(E, F_, Hd, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, hidden]`` -> ``[B, T, hidden]`` in x's dtype."""
        tokens = x.reshape(-1, x.shape[-1])  # [B*T, hidden]
        logits = F.linear(tokens.float(), self.router.weight.float())  # [B*T, num_experts] float32
        return self.impl.moe(tokens, logits, self.w_gate_up, self.w_down, self.top_k).view(x.shape)

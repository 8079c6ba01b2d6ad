"""RMSNorm as in MiniMax-01 (and Mixtral): statistics in float32, scaled in the input dtype."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim.

    Args:
        dim: size of the last dim; ``weight`` is ``[dim]``, initialised to ones.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., dim]`` -> ``[..., dim]`` in x's dtype (mean square in float32)."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

"""MiniMax-01's per-head decay rates for lightning attention."""
from __future__ import annotations

import math

import torch


def _alibi_slopes(n: int) -> list[float]:
    """ALiBi slopes: ``2^(-8(h+1)/n)`` for n a power of two; otherwise those of the
    nearest lower power of two followed by every other slope of the next one."""
    if n & (n - 1) == 0:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    lower = 2 ** math.floor(math.log2(n))
    return _alibi_slopes(lower) + _alibi_slopes(2 * lower)[0::2][: n - lower]


def minimax_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Decay rates of one lightning layer: float32 ``[num_heads]``.

    Head h decays its state by ``lambda_h = exp(-slopes[h])`` per token. The ALiBi slopes are
    scaled by ``1 - layer_idx / (num_layers - 1) + 1e-5``: layer 0 decays fastest and the last
    layer barely decays. A one-layer model uses the factor ``1 + 1e-5``.
    """
    for name, value in (("num_heads", num_heads), ("layer_idx", layer_idx), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if num_layers < 1 or not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, num_layers), got layer_idx={layer_idx}, num_layers={num_layers}")
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    factor = 1.0 - depth + 1e-5
    return torch.tensor(_alibi_slopes(num_heads), dtype=torch.float32) * factor

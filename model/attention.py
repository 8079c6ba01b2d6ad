"""The two attention sublayers of the hybrid decoder: lightning (linear) and softmax (GQA).

Both map the normed hidden states ``x [B, T, hidden]`` to ``[B, T, hidden]`` in x's dtype,
continuing from a per-layer cache entry when one is given (see ``cache.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.lightning_attn import minimax_slopes
from model.cache import KVCache, LightningState
from model.config import ModelConfig
from model.impl import Impl
from model.norm import RMSNorm


class LightningAttention(nn.Module):
    """MiniMax-01 lightning attention layer.

    ``q, k, v = SiLU(x W_qkv)`` (per head: q, k, v side by side), lightning attention with the
    layer's ``minimax_slopes`` and scale 1, RMSNorm over all heads' outputs together
    (``H * head_dim``), times ``sigmoid(x W_gate)``, then ``W_out``.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, impl: Impl, **factory):
        super().__init__()
        self.impl = impl
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        inner = config.num_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * inner, bias=False, **factory)
        self.output_gate = nn.Linear(config.hidden_size, inner, bias=False, **factory)
        self.norm = RMSNorm(inner, config.rms_norm_eps, **factory)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=False, **factory)
        # float32 [H]; not a buffer, so that casting the module's dtype leaves it float32.
        # Moved to the input's device on first use.
        self._slopes = minimax_slopes(config.num_heads, layer_idx, config.num_layers)

    def slopes(self, device: torch.device) -> torch.Tensor:
        """The layer's decay rates, float32 ``[H]`` on ``device``."""
        if self._slopes.device != device:
            self._slopes = self._slopes.to(device)
        return self._slopes

    def forward(self, x: torch.Tensor, cache: LightningState | None = None) -> torch.Tensor:
        """x ``[B, T, hidden]`` -> ``[B, T, hidden]``.

        Without a cache: one pass from a zero state. With one: from ``cache.state``, which is
        replaced by the state after the last token (T > 1: the chunked kernel) or updated in
        place (T = 1: the decode step).
        """
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = F.silu(self.qkv_proj(x)).view(B, T, H, 3 * D).split(D, dim=-1)  # [B, T, H, D] each
        slopes = self.slopes(x.device)
        if cache is None:
            o, _ = self.impl.lightning(q, k, v, slopes, None, False)
        elif T == 1:
            o = self.impl.lightning_step(q[:, 0], k[:, 0], v[:, 0], slopes, cache.state)[:, None]
        else:
            o, final_state = self.impl.lightning(q, k, v, slopes, cache.state, True)
            cache.state = final_state.detach()
        o = self.norm(o.reshape(B, T, H * D)) * torch.sigmoid(self.output_gate(x))
        return self.out_proj(o)


def rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of each head (halves paired, as GPT-NeoX/MiniMax).

    x ``[B, T, heads, head_dim]``, positions int ``[T]`` -> x's shape and dtype (angles and
    the rotation in float32).
    """
    inv_freq = theta ** -(torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq  # [T, rotary_dim / 2]
    cos, sin = (f(angles).repeat(1, 2)[:, None, :] for f in (torch.cos, torch.sin))  # [T, 1, rotary_dim]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), rest], dim=-1)


class SoftmaxAttention(nn.Module):
    """Causal grouped-query softmax attention with a partial rotary embedding, through torch SDPA
    (the same code in both implementations: there is no kernel of ours for it)."""

    def __init__(self, config: ModelConfig, **factory):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False, **factory)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False, **factory)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False, **factory)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x ``[B, T, hidden]`` -> ``[B, T, hidden]``.

        Without a cache x holds positions ``0 .. T-1``. With one, x follows the S cached tokens
        (positions ``S .. S+T-1``), its keys and values are appended to the cache in place
        (``KVCache.append``: no copy of the cache per step) and its queries attend to every
        cached token; with autograd on, the new keys and values stay in the graph.
        """
        B, T, _ = x.shape
        offset = 0 if cache is None else cache.key.shape[1]
        positions = torch.arange(offset, offset + T, device=x.device)
        q = rotary(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), positions, self.rotary_dim, self.rope_theta)
        k = rotary(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), positions, self.rotary_dim, self.rope_theta)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        mask = None
        if cache is not None:
            cached_k, cached_v = cache.key, cache.value  # [B, S, kv heads, head_dim]
            cache.append(k.detach(), v.detach())
            if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
                # the new tokens' keys and values must stay in the graph
                k, v = torch.cat([cached_k, k], dim=1), torch.cat([cached_v, v], dim=1)
            else:
                k, v = cache.key, cache.value  # views of the cache's buffers: no copy
            # k, v: [B, S+T, kv heads, head_dim]
            # query i (position offset + i) sees keys 0 .. offset + i. SDPA's is_causal aligns
            # queries and keys at the start, which is right only when nothing precedes x.
            mask = torch.arange(offset + T, device=x.device) <= positions[:, None]  # [T, S+T]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, enable_gqa=True,
        )  # [B, H, T, head_dim]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

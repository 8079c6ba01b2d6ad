"""The MiniMax-Text-01-style hybrid decoder: embedding, layers, final norm, LM head.

Per layer (``x`` the normed hidden states, MiniMax-01's residual form; see ``config.py``)::

    x = attn_norm(h);  h = attn_alpha * x + attn_beta * attn(x)     attn: lightning or softmax
    x = ffn_norm(h);   h = mlp_alpha * x + mlp_beta * moe(x)

``HybridDecoder(config, impl="kernels")`` runs lightning attention and the MoE FFN on the
Triton kernels, ``impl="reference"`` on the float64 references; parameter names are the same,
so one state_dict loads into both.
"""
from __future__ import annotations

import torch
from torch import nn

from model.attention import LightningAttention, SoftmaxAttention
from model.cache import Cache, KVCache, LightningState
from model.config import LIGHTNING, ModelConfig, get_config
from model.impl import IMPLS
from model.moe import MoEFeedForward, expert_parallel_size
from model.norm import RMSNorm

INPUT_ID_DTYPES = (torch.int64, torch.int32)


class DecoderLayer(nn.Module):
    """One layer: an attention sublayer (lightning or softmax, by ``config.layer_kind``) and the
    MoE FFN, each behind an RMSNorm with MiniMax-01's alpha/beta residual."""

    def __init__(self, config: ModelConfig, layer_idx: int, impl: str, *, ep_group=None, **factory):
        super().__init__()
        self.kind = config.layer_kind(layer_idx)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        if self.kind == LIGHTNING:
            self.attn = LightningAttention(config, layer_idx, IMPLS[impl], **factory)
        else:
            self.attn = SoftmaxAttention(config, **factory)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.moe = MoEFeedForward(config, IMPLS[impl], ep_group=ep_group, **factory)
        self.attn_alpha, self.attn_beta = config.attn_alpha, config.attn_beta
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha, config.mlp_beta

    def forward(self, h: torch.Tensor, cache: LightningState | KVCache | None = None) -> torch.Tensor:
        """h ``[B, T, hidden]`` -> ``[B, T, hidden]``; ``cache`` is this layer's entry (updated)."""
        x = self.attn_norm(h)
        h = self.attn_alpha * x + self.attn_beta * self.attn(x, cache)
        x = self.ffn_norm(h)
        return self.mlp_alpha * x + self.mlp_beta * self.moe(x)


class HybridDecoder(nn.Module):
    """MiniMax-Text-01-style decoder (7 lightning layers, then 1 softmax layer, repeated; MoE FFNs).

    Args:
        config: a :class:`ModelConfig` or the name of a registered one (``get_config``).
        impl: ``"kernels"`` (Triton kernels, launch configs from ``kernels/_config.py``) or
            ``"reference"`` (the float64 references in ``reference/``).
        device, dtype: where and in which dtype to create the parameters (the router stays
            float32).
        ep_group: a ``torch.distributed`` process group to shard the experts over (expert
            parallelism; see :class:`~model.moe.MoEFeedForward`), or None. Every rank of the
            group runs the model together, each on its own tokens; the expert weights of a
            full checkpoint load through :func:`model.moe.shard_experts`. ``device="meta"`` creates none, e.g. to ``load_state_dict(sd, assign=True)``
            another model's tensors without a copy.

    Parameters are initialised by :meth:`reset_parameters`. Untied embedding and LM head.
    """

    def __init__(self, config: ModelConfig | str, impl: str = "kernels", *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, ep_group=None):
        super().__init__()
        if isinstance(config, str):
            config = get_config(config)
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig or a config name, got {type(config).__name__}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
        self.config, self.impl = config, impl
        expert_parallel_size(ep_group, config.num_experts)  # ValueError before any parameter exists
        factory = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(config, i, impl, ep_group=ep_group, **factory)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every weight ~ N(0, config.init_std^2), norm weights 1."""
        for p in self.parameters():
            p.normal_(0.0, self.config.init_std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def new_cache(self, batch_size: int) -> Cache:
        """An empty :class:`Cache` for ``batch_size`` sequences on the model's device and dtype."""
        weight = self.embed_tokens.weight
        return Cache.new(self.config, batch_size, device=weight.device, dtype=weight.dtype)

    def _check_inputs(self, input_ids: torch.Tensor, cache: Cache | None, use_cache: bool) -> None:
        """Raise TypeError/ValueError naming the argument, before anything launches."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in INPUT_ID_DTYPES:
            raise TypeError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, T] with B, T >= 1, got shape {tuple(input_ids.shape)}")
        weight = self.embed_tokens.weight
        if input_ids.device != weight.device:
            raise ValueError(f"input_ids must be on the model's device {weight.device}, got {input_ids.device}")
        low, high = input_ids.min().item(), input_ids.max().item()  # one host read: a bad id would fault on a GPU
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"input_ids must be token ids in [0, {self.config.vocab_size}), got values in [{low}, {high}]")
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")
        if cache is None:
            return
        if not use_cache:
            raise ValueError("use_cache must be True when a cache is given (the cache is updated in place)")
        if not isinstance(cache, Cache):
            raise TypeError(f"cache must be a model.Cache (see HybridDecoder.new_cache), got {type(cache).__name__}")
        cache.check(self.config, input_ids.shape[0], device=weight.device, dtype=weight.dtype)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Cache | None]:
        """Logits of every position.

        Args:
            input_ids: int64 or int32 ``[B, T]`` token ids in ``[0, vocab_size)``.
            cache: continue after the tokens this cache has seen (positions ``cache.seq_len``
                onwards); it is updated in place. T = 1 runs the lightning decode step.
            use_cache: return a cache (the given one, or a new one) to continue from.

        Returns:
            logits ``[B, T, vocab_size]`` in the model's dtype, and the cache (None unless
            ``use_cache``). Differentiable in every parameter; the cache carries no gradient.
        """
        self._check_inputs(input_ids, cache, use_cache)
        if use_cache and cache is None:
            cache = self.new_cache(input_ids.shape[0])
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return self.lm_head(self.norm(h)), cache

"""Model configurations: MiniMax-Text-01 and two smaller models with the same layer pattern.

Layer ``i`` is a softmax-attention layer when ``(i + 1) % softmax_every == 0`` and a lightning
attention layer otherwise (MiniMax-Text-01: ``softmax_every = 8``, so 7 lightning layers then
1 softmax layer, 80 layers in all). Every layer's FFN is the top-k mixture of SwiGLU experts.

Residuals follow MiniMax-Text-01's released code (``postnorm`` on, as the Hugging Face port
hard-codes): with ``x = RMSNorm(h)``, a sublayer f updates ``h <- alpha * x + beta * f(x)``.
MiniMax names alpha/beta ``layernorm_{full,linear}_attention_{alpha,beta}`` (one value for
both attention kinds, here ``attn_alpha``/``attn_beta``) and ``layernorm_mlp_{alpha,beta}``
(here ``mlp_alpha``/``mlp_beta``). MiniMax-Text-01 uses DeepNorm's ``alpha = (2N)^(1/4)`` for
N = 80 layers and ``beta = 1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

LIGHTNING = "lightning"
SOFTMAX = "softmax"
HEAD_DIMS = (16, 32, 64, 128, 256)  # what the lightning kernels support (checks.HEAD_DIMS)


def deepnorm_alpha(num_layers: int) -> float:
    """DeepNorm's residual scale for a decoder of ``num_layers`` layers: ``(2N)^(1/4)``."""
    return (2 * num_layers) ** 0.25


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and constants of a MiniMax-Text-01-style hybrid decoder (validated on creation).

    Lightning layers use ``num_heads`` heads of ``head_dim`` for q, k and v; softmax layers use
    ``num_heads`` query heads and ``num_kv_heads`` key/value heads of ``head_dim``, with a
    rotary embedding on the first ``rotary_dim`` dims of each head.
    """

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    num_experts: int
    top_k: int
    expert_hidden_size: int
    rotary_dim: int
    softmax_every: int = 8
    rope_theta: float = 1e7
    rms_norm_eps: float = 1e-5
    attn_alpha: float = deepnorm_alpha(80)
    attn_beta: float = 1.0
    mlp_alpha: float = deepnorm_alpha(80)
    mlp_beta: float = 1.0
    init_std: float = 0.02  # normal init of every weight but the norms' (MiniMax's initializer_range)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "name":
                if not isinstance(value, str) or not value:
                    raise TypeError(f"name must be a non-empty str, got {value!r}")
            elif f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{f.name} must be a positive int, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{f.name} must be a positive finite number, got {value!r}")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {HEAD_DIMS} (the lightning kernels' head dims), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads = {self.num_heads}, got {self.num_kv_heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim must be even and at most head_dim = {self.head_dim}, got {self.rotary_dim}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be at most num_experts = {self.num_experts}, got {self.top_k}")

    def layer_kind(self, layer_idx: int) -> str:
        """``"softmax"`` when ``(layer_idx + 1) % softmax_every == 0``, else ``"lightning"``."""
        return SOFTMAX if (layer_idx + 1) % self.softmax_every == 0 else LIGHTNING

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple(self.layer_kind(i) for i in range(self.num_layers))


MINIMAX_TEXT_01 = ModelConfig(
    name="minimax-text-01", vocab_size=200064, hidden_size=6144, num_layers=80, num_heads=64, head_dim=128,
    num_kv_heads=8, num_experts=32, top_k=2, expert_hidden_size=9216, rotary_dim=64,
)

CONFIGS: dict[str, ModelConfig] = {
    # MiniMax-Text-01 (456B parameters): defined for kernel plans, never instantiated whole
    "minimax-text-01": MINIMAX_TEXT_01,
    # MiniMax-Text-01's layers, sizes and constants, 8 of them (7 lightning + 1 softmax).
    # Each layer's experts hold 5.4B parameters (10.9 GB in bf16): the whole model does not
    # fit one 80 GB GPU; take fewer layers with dataclasses.replace(..., num_layers=...).
    "bench": replace(MINIMAX_TEXT_01, name="bench", num_layers=8),
    # CPU tests through the Triton interpreter: the same pattern (7 lightning + 1 softmax),
    # init_std = hidden_size^-1/2 so that every sublayer's output is O(1)
    "tiny": ModelConfig(
        name="tiny", vocab_size=97, hidden_size=64, num_layers=8, num_heads=4, head_dim=16, num_kv_heads=2,
        num_experts=4, top_k=2, expert_hidden_size=32, rotary_dim=8,
        attn_alpha=deepnorm_alpha(8), mlp_alpha=deepnorm_alpha(8), init_std=64**-0.5,
    ),
}


def get_config(name: str) -> ModelConfig:
    """The registered config called ``name`` (see :data:`CONFIGS`)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]

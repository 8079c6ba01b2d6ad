"""Lightning attention: forward and backward kernels (Triton), decode step, MiniMax decay slopes."""
from kernels.lightning_attn.api import lightning_attn
from kernels.lightning_attn.decode import lightning_decode
from kernels.lightning_attn.slopes import minimax_slopes

__all__ = ["lightning_attn", "lightning_decode", "minimax_slopes"]

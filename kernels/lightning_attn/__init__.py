"""Lightning attention: forward kernel (Triton), MiniMax decay slopes."""
from kernels.lightning_attn.api import lightning_attn
from kernels.lightning_attn.slopes import minimax_slopes

__all__ = ["lightning_attn", "minimax_slopes"]

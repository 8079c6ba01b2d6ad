"""Public lightning attention API: input checks, then the kernels (forward.py, backward.py)."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.lightning_attn.backward import lightning_attn_bwd
from kernels.lightning_attn.checks import check_qkv_slopes
from kernels.lightning_attn.forward import lightning_attn_fwd



def _check_inputs(q, k, v, slopes, initial_state, cu_seqlens) -> None:
    """Raise TypeError/ValueError naming the argument, before anything launches."""
    B, T, H, D, E = check_qkv_slopes(q, k, v, slopes, lead="B, T, H",
                                     extra={"initial_state": initial_state, "cu_seqlens": cu_seqlens})
    N = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [N+1] with N >= 1, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"batch size is expected to be 1 rather than {B} when using cu_seqlens")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, got {bounds}")
        N = len(bounds) - 1
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"initial_state must be a torch.Tensor, got {type(initial_state).__name__}")
        if initial_state.shape != (N, H, D, E):
            raise ValueError(f"initial_state must be [N, H, D, E] = [{N}, {H}, {D}, {E}], got {tuple(initial_state.shape)}")


class LightningAttnFunction(torch.autograd.Function):
    """Saves only the inputs (q, k, v, slopes, initial_state, cu_seqlens): the backward
    recomputes the states chunk by chunk instead of keeping O(T * D * E) per head."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens):
        o, final_state = lightning_attn_fwd(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens)
        ctx.save_for_backward(q, k, v, slopes, initial_state, cu_seqlens)
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # an unused o or final state arrives as None, not zeros
        return o, final_state

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        q, k, v, slopes, initial_state, cu_seqlens = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dk, dv, dh0 = lightning_attn_bwd(
            q, k, v, slopes, ctx.scale, initial_state, cu_seqlens, do, dht, needs=(need[0], need[1], need[2], need[5])
        )
        return dq, dk, dv, None, None, dh0, None, None


def lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning attention (linear attention with per-head exponential decay).

    Per head h: ``S_t = exp(-slopes[h]) * S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, E]``; float32, bfloat16 or float16 (one dtype),
            D and E powers of two in 16..256. Any strides.
        slopes: float ``[H]`` decay rates, e.g. ``minimax_slopes(H, layer_idx, num_layers)``.
        scale: multiplies the output.
        initial_state: float ``[N, H, D, E]``, N = B, or the number of sequences with cu_seqlens.
        output_final_state: also return the fp32 state after the last token.
        cu_seqlens: int32/int64 ``[N+1]`` offsets of N sequences packed into one row (B = 1).

    Returns:
        ``o [B, T, H, E]`` in the input dtype (fp32 accumulation), and the final state
        ``[N, H, D, E]`` float32, or None.

    Differentiable in q, k, v and initial_state (not slopes), including through the final
    state. The backward keeps nothing but the inputs from the forward and recomputes the
    states (see ``backward.py``).
    """
    _check_inputs(q, k, v, slopes, initial_state, cu_seqlens)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    slopes = slopes.to(torch.float32).contiguous()
    return LightningAttnFunction.apply(q, k, v, slopes, float(scale), initial_state, bool(output_final_state), cu_seqlens)

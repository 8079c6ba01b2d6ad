"""Public MoE API: input checks, the autograd Functions, ``grouped_gemm`` and ``moe_ffn``.

Pipeline of :func:`moe_ffn` (T tokens, E experts, top k, M = T*k rows; index arrays are
defined in ``routing.py``)::

    route(logits, k)            -> weights [T,k], row_to_token [M], copy_to_row [T,k], offsets [E]
    MoEExpertsFunction          -> y [M,Hd], rows in expert order
        gather_gemm_swiglu      h[p] = silu(g)*u, [g,u] = x[row_to_token[p]] @ w_gate_up[e]   (ONE launch:
                                gather fused into the A loads, SwiGLU into the epilogue)
        grouped_gemm_fwd        y[p] = h[p] @ w_down[e]                                        (ONE launch)
    MoECombineFunction          -> out[t] = sum_j weights[t,j] * y[copy_to_row[t,j]]           (slot order, fp32)

Backward (each piece its own Function, so every input gets its gradient from the piece that
used it; the router logits get theirs through ``weights`` by torch autograd of the softmax,
the gather of the top-k probabilities and the renormalisation)::

    combine_bwd                 dy[copy_to_row[t,j]] = weights[t,j] * dout[t]; dweights[t,j] = dout[t] . y[row]
    grouped_gemm_dw             dw_down[e] = h_e^T dy_e
    gemm_swiglu_bwd             dgu = SwiGLU'(dy @ w_down[e]^T)                  (SwiGLU backward in the epilogue)
    grouped_gemm_dw             dw_gate_up[e] = xs_e^T dgu_e, xs = x[row_to_token]   (a gather copy first:
                                faster than gathering inside the dW loop, docs/perf-notes.md)
    grouped_gemm_dx + combine   dx[t] = sum_j (dgu @ w_gate_up[e]^T)[copy_to_row[t,j]]  (deterministic, no atomics)

Saved for the backward beyond the inputs: h ``[M, F]`` and, when x or w_gate_up need a
gradient, the pre-activations ``gu [M, 2F]`` (written by the first GEMM's epilogue). The
backward of w_gate_up holds one transient ``[M, Hd]`` copy of the gathered tokens.

Host syncs: none in ``moe_ffn`` (its offsets come from ``route``, valid by construction).
``grouped_gemm`` reads its caller's ``offsets`` on the host once to check them (E integers);
``check_offsets=False`` skips that for offsets known to be valid.
"""
from __future__ import annotations

import torch

from kernels.moe_gemm.grouped_gemm import (
    gather_gemm_swiglu,
    gemm_swiglu_bwd,
    grouped_gemm_dw,
    grouped_gemm_dx,
    grouped_gemm_fwd,
)
from kernels.moe_gemm.routing import combine, combine_bwd, route

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = "float32, bfloat16 or float16"


def _require_tensor(name: str, x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _require_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be {_DTYPE_NAMES}, got {x.dtype}")


def _require_one_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_grouped_gemm(x, w, offsets, check_offsets: bool) -> None:
    """Raise TypeError/ValueError naming the argument, before anything launches."""
    for name, t in (("x", x), ("w", w), ("offsets", offsets)):
        _require_tensor(name, t)
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K] (2 dims), got shape {tuple(x.shape)}")
    if w.dim() != 3:
        raise ValueError(f"w must be [E, K, N] (3 dims), got shape {tuple(w.shape)}")
    _require_float("x", x)
    if w.dtype != x.dtype:
        raise TypeError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    M, K = x.shape
    E = w.shape[0]
    if E < 1:
        raise ValueError(f"w must hold at least one expert, got shape {tuple(w.shape)}")
    if w.shape[1] != K:
        raise ValueError(f"w must be [E, K, N] with K = {K} (x's columns), got shape {tuple(w.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be an int32 (or int64) tensor of group ends, got {offsets.dtype}")
    if offsets.shape != (E,):
        raise ValueError(f"offsets must be [E] = [{E}] group ends (one per expert of w), got shape {tuple(offsets.shape)}")
    _require_one_device(x=x, w=w, offsets=offsets)
    if check_offsets:
        ends = offsets.tolist()  # the one host read (E integers); see the module docstring
        if ends[0] < 0 or any(b < a for a, b in zip(ends, ends[1:])) or ends[-1] != M:
            raise ValueError(f"offsets must be non-decreasing group ends from >= 0 to M = {M} (x's rows), got {ends}")
    if M >= 2**31:
        raise ValueError(f"x has {M} rows; int32 offsets address fewer than 2**31")


def _check_moe(x, router_logits, w_gate_up, w_down, top_k) -> None:
    """Raise TypeError/ValueError naming the argument, before anything launches."""
    for name, t in (("x", x), ("router_logits", router_logits), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        _require_tensor(name, t)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, Hd] (2 dims), got shape {tuple(x.shape)}")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E] (2 dims), got shape {tuple(router_logits.shape)}")
    if w_gate_up.dim() != 3:
        raise ValueError(f"w_gate_up must be [E, Hd, 2F] (3 dims), got shape {tuple(w_gate_up.shape)}")
    if w_down.dim() != 3:
        raise ValueError(f"w_down must be [E, F, Hd] (3 dims), got shape {tuple(w_down.shape)}")
    _require_float("x", x)
    if not router_logits.is_floating_point():
        raise TypeError(f"router_logits must be a float tensor, got {router_logits.dtype}")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {w.dtype}")
    T, Hd = x.shape
    if router_logits.shape[0] != T:
        raise ValueError(f"router_logits must be [T, E] with T = {T} (x's rows), got shape {tuple(router_logits.shape)}")
    E = router_logits.shape[1]
    if E < 1:
        raise ValueError(f"router_logits must have at least one expert column, got shape {tuple(router_logits.shape)}")
    E2, Hd2, F2 = w_gate_up.shape
    if E2 != E or Hd2 != Hd or F2 % 2 != 0 or F2 == 0:
        raise ValueError(f"w_gate_up must be [E, Hd, 2F] = [{E}, {Hd}, 2F] with F >= 1 (gate then up), got shape {tuple(w_gate_up.shape)}")
    F = F2 // 2
    if w_down.shape != (E, F, Hd):
        raise ValueError(f"w_down must be [E, F, Hd] = [{E}, {F}, {Hd}], got shape {tuple(w_down.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be between 1 and E = {E} (the number of experts), got {top_k}")
    _require_one_device(x=x, router_logits=router_logits, w_gate_up=w_gate_up, w_down=w_down)
    if T * top_k >= 2**31:
        raise ValueError(f"T * top_k = {T * top_k} rows; int32 offsets address fewer than 2**31")


class GroupedGemmFunction(torch.autograd.Function):
    """y = grouped x @ w; saves x, w, offsets. dX is the same kernel on w's transposed
    strides, dW the per-expert reduction over rows."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return grouped_gemm_fwd(x, w, offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        dx = grouped_gemm_dx(dy, w, offsets) if need_x else None
        dw = grouped_gemm_dw(x, dy, offsets) if need_w else None
        return dx, dw, None


class MoEExpertsFunction(torch.autograd.Function):
    """y[p] = SwiGLU(x[row_to_token[p]] @ w_gate_up[e]) @ w_down[e] for the rows p of expert e.
    ``row_to_token`` and ``copy_to_row`` None: x's rows are already grouped by expert (y[p]
    from x[p]; the first GEMM loads A by TMA instead of gathering it, and dx needs no combine)."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, row_to_token, copy_to_row, offsets, flags=None):
        # flags: None, or (ready, done) expert flags for the first GEMM's start and the second's end
        # (grouped_gemm.py, "Expert flags"; the flags transport of moe_ffn_ep)
        ready, done = flags if flags is not None else (None, None)
        need_x, need_wgu, need_wd = ctx.needs_input_grad[:3]
        h, gu = gather_gemm_swiglu(x, w_gate_up, offsets, row_to_token, store_preact=need_x or need_wgu, ready=ready)
        y = grouped_gemm_fwd(h, w_down, offsets, done=done)
        ctx.save_for_backward(x, w_gate_up, w_down, row_to_token, copy_to_row, offsets, h if need_wd else None, gu)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gate_up, w_down, row_to_token, copy_to_row, offsets, h, gu = ctx.saved_tensors
        need_x, need_wgu, need_wd = ctx.needs_input_grad[:3]
        dx = dw_gate_up = dw_down = None
        if need_wd:
            dw_down = grouped_gemm_dw(h, dy, offsets)
        if need_x or need_wgu:
            dgu = gemm_swiglu_bwd(dy, w_down, offsets, gu)
            if need_wgu:
                dw_gate_up = grouped_gemm_dw(x if row_to_token is None else x[row_to_token.long()], dgu, offsets)
            if need_x:
                dx = grouped_gemm_dx(dgu, w_gate_up, offsets)
                dx = dx if copy_to_row is None else combine(dx, copy_to_row)
        return dx, dw_gate_up, dw_down, None, None, None, None


class MoECombineFunction(torch.autograd.Function):
    """out[t] = sum_j weights[t, j] * y[copy_to_row[t, j]]; differentiable in y and weights."""

    @staticmethod
    def forward(ctx, y, weights, copy_to_row):
        ctx.save_for_backward(y, weights, copy_to_row)
        return combine(y, copy_to_row, weights)

    @staticmethod
    def backward(ctx, dout):
        y, weights, copy_to_row = ctx.saved_tensors
        dy, dweights = combine_bwd(dout, y, copy_to_row, weights)
        need_y, need_w, _ = ctx.needs_input_grad
        return dy if need_y else None, dweights if need_w else None, None


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, check_offsets: bool = True) -> torch.Tensor:
    """Grouped GEMM: ``y[offsets[e-1]:offsets[e]] = x[offsets[e-1]:offsets[e]] @ w[e]`` (offsets[-1] = 0).

    Args:
        x: ``[M, K]``, rows grouped by expert; float32, bfloat16 or float16. Any strides.
        w: ``[E, K, N]`` in x's dtype. Any strides.
        offsets: int32 (or int64) ``[E]`` group ends, non-decreasing, ``offsets[-1] == M``;
            groups may be empty.
        check_offsets: read offsets on the host to check them (one sync); pass False for
            offsets known to be valid (e.g. from ``routing.route``).

    Returns:
        ``y [M, N]`` in x's dtype (fp32 accumulation; IEEE fp32 dots for fp32 inputs).
        Differentiable in x and w. One kernel launch for all experts, forward and each of
        dX and dW.
    """
    _check_grouped_gemm(x, w, offsets, check_offsets)
    offsets = offsets.to(torch.int32).contiguous()
    return GroupedGemmFunction.apply(x, w, offsets)


def moe_ffn(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int = 2,
) -> torch.Tensor:
    """Mixture-of-experts FFN with SwiGLU experts (MiniMax-01: E = 32, top-2).

    ``p = softmax(router_logits)``; each token keeps its top_k experts (ties: lower expert id),
    weights ``p_j / sum p`` over the kept ones; expert e maps a token to
    ``(silu(x W_g) * (x W_u)) W_down[e]`` with ``[W_g, W_u] = w_gate_up[e]``; the output is the
    weighted sum over the kept experts.

    Args:
        x: ``[T, Hd]``, float32, bfloat16 or float16.
        router_logits: ``[T, E]``, any float dtype (softmax in float32).
        w_gate_up: ``[E, Hd, 2F]`` in x's dtype, gate columns then up columns.
        w_down: ``[E, F, Hd]`` in x's dtype.
        top_k: experts per token, 1 <= top_k <= E.

    Returns:
        ``[T, Hd]`` in x's dtype. Differentiable in x, router_logits, w_gate_up and w_down
        (all of them; with top_k = 1 the renormalised weight is constant 1, so the logits'
        gradient is zero). Deterministic. See the module docstring for the pipeline.
    """
    _check_moe(x, router_logits, w_gate_up, w_down, top_k)
    routing = route(router_logits, top_k)
    y = MoEExpertsFunction.apply(x, w_gate_up, w_down, routing.row_to_token, routing.copy_to_row, routing.offsets)
    return MoECombineFunction.apply(y, routing.weights, routing.copy_to_row)

"""Mixture-of-experts references: a loop over experts, in float64 by default, with autograd.

Definitions every kernel in ``kernels/moe_gemm`` must match::

    grouped GEMM:  y[offsets[e-1]:offsets[e]] = x[offsets[e-1]:offsets[e]] @ w[e]     (offsets[-1] := 0)
    routing:       p = softmax(logits); S_t = the top_k experts of token t by p (ties: lower id)
                   weight[t, j] = p[t, S_t[j]] / sum_i p[t, S_t[i]]
    expert e:      f_e(x) = (silu(x @ Wg_e) * (x @ Wu_e)) @ Wd_e,   [Wg_e, Wu_e] = w_gate_up[e]
    MoE FFN:       out[t] = sum_j weight[t, j] * f_{S_t[j]}(x[t])

Written for clarity, not speed. The expert CHOICE is made on float32 probabilities, as the
kernels make it: the choice is discrete, and float64 could break a near-tie the other way
and pick another expert. The weights and everything after are computed in ``dtype``.
"""
from __future__ import annotations

import torch


def grouped_gemm_ref(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[M, N]`` in ``dtype``: each group's rows times its expert's weights (autograd flows)."""
    ends = [int(e) for e in offsets.tolist()]
    starts = [0] + ends[:-1]
    # converted one expert at a time, so a float32 reference of bf16 MiniMax weights fits a GPU
    pieces = [x[s:e].to(dtype) @ w[i].to(dtype) for i, (s, e) in enumerate(zip(starts, ends))]
    return torch.cat(pieces) if pieces else torch.zeros(0, w.shape[2], dtype=dtype, device=x.device)


def grouped_gemm_dw_ref(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[E, K, N]`` in ``dtype``: ``x[rows of e]^T @ dy[rows of e]`` per expert (zeros for an
    empty group): the weight gradient of :func:`grouped_gemm_ref`."""
    ends = [int(e) for e in offsets.tolist()]
    starts = [0] + ends[:-1]
    return torch.stack([x[s:e].to(dtype).T @ dy[s:e].to(dtype) for s, e in zip(starts, ends)])


def route_ref(router_logits: torch.Tensor, top_k: int, *, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(experts [T, k] int64, weights [T, k] in dtype)``: per token, experts sorted by
    descending float32 probability, lower id first among equals; weights renormalised."""
    probs32 = torch.softmax(router_logits.detach().float(), dim=-1).cpu()
    T, E = probs32.shape
    chosen = [sorted(range(E), key=lambda e: (-probs32[t, e].item(), e))[:top_k] for t in range(T)]
    experts = torch.tensor(chosen, dtype=torch.int64).view(T, top_k).to(router_logits.device)
    probs = torch.softmax(router_logits.to(dtype), dim=-1)
    top = probs.gather(1, experts)
    return experts, top / top.sum(dim=-1, keepdim=True)


def swiglu_expert_ref(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert: ``(silu(x Wg) * (x Wu)) Wd``; w_gate_up ``[Hd, 2F]`` (gate then up), w_down ``[F, Hd]``."""
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ w_down


def moe_ffn_ref(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``[T, Hd]`` in ``dtype``: route, run each expert on the tokens that chose it, add the
    weighted outputs back. Autograd flows to x, router_logits, w_gate_up and w_down."""
    experts, weights = route_ref(router_logits, top_k, dtype=dtype)
    x = x.to(dtype)
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for e in range(w_gate_up.shape[0]):
        tokens, slots = (experts == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        # weights converted one expert at a time (a float32 copy of all MiniMax weights is 22 GB)
        y = swiglu_expert_ref(x[tokens], w_gate_up[e].to(dtype), w_down[e].to(dtype))
        out = out.index_add(0, tokens, weights[tokens, slots, None] * y)
    return out

"""Token-by-token lightning attention: the definition every kernel must match.

Per head h, with decay ``lambda_h = exp(-slopes[h])``::

    S_t = lambda_h * S_{t-1} + k_t^T v_t        S_0 = initial_state (or 0)
    o_t = scale * q_t S_t

Written for clarity, not speed: a Python loop over tokens in float64.
"""
from __future__ import annotations

import torch


def lightning_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference lightning attention.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, E]`` (any float dtype).
        slopes: ``[H]``; the decay of head h is ``exp(-slopes[h])``.
        initial_state: ``[N, H, D, E]`` with N = B, or N = len(cu_seqlens) - 1.
        cu_seqlens: ``[N + 1]`` int offsets of N packed sequences; then B must be 1.

    Returns:
        ``o`` as ``[B, T, H, E]`` float64 and the final state ``[N, H, D, E]`` float64.
        Autograd flows through both (float64), which is what gradient tests compare with.
    """
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    E = v.shape[-1]
    decay = torch.exp(-slopes.to(torch.float64)).view(H, 1, 1)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]

    rows: list[list[torch.Tensor]] = [[] for _ in range(B)]
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is None:
            state = torch.zeros(H, D, E, dtype=torch.float64, device=q.device)
        else:
            state = initial_state[n].to(torch.float64)
        for t in range(start, end):
            state = decay * state + k[b, t, :, :, None] * v[b, t, :, None, :]
            rows[b].append(scale * torch.einsum("hd,hde->he", q[b, t], state))
        finals.append(state)
    empty = q.new_zeros(0, H, E)
    outs = torch.stack([torch.stack(r) if r else empty for r in rows])
    return outs, torch.stack(finals)


def lightning_attn_chunked_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as :func:`lightning_attn_ref` (no ``cu_seqlens``), in float64 but
    chunk by chunk with matrix products, so it can check GPU kernels at T = 64K.

    Within a chunk of n tokens (rows i, columns j from the chunk start, S carried in)::

        o_i = scale * (sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j + lambda^(i+1) q_i S)
        S  <- lambda^n S + sum_j lambda^(n-1-j) k_j^T v_j

    It is tested against the token-by-token loop on the CPU.
    """
    q, k, v = (x.to(torch.float64).transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    B, H, T, D = q.shape
    E = v.shape[-1]
    rate = slopes.to(torch.float64).view(H, 1)
    state = (
        initial_state.to(torch.float64).clone()
        if initial_state is not None
        else q.new_zeros(B, H, D, E)
    )
    out = []
    for start in range(0, T, chunk):
        qc, kc, vc = (x[:, :, start:start + chunk] for x in (q, k, v))
        n = qc.shape[2]
        i = torch.arange(n, dtype=torch.float64, device=q.device)
        gap = i[:, None] - i[None, :]
        intra = torch.exp(-rate[..., None] * gap.clamp(min=0)) * (gap >= 0)  # [H, n, n]
        scores = (qc @ kc.transpose(-1, -2)) * intra
        carried = (qc * torch.exp(-rate * (i + 1))[..., None]) @ state
        out.append(scale * (scores @ vc + carried))
        k_decayed = kc * torch.exp(-rate * (n - 1 - i))[..., None]
        state = torch.exp(-rate * n)[..., None] * state + k_decayed.transpose(-1, -2) @ vc
    o = torch.cat(out, dim=2) if out else q.new_zeros(B, H, 0, E)
    return o.transpose(1, 2), state


def lightning_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: the token loop of :func:`lightning_attn_ref` with T = 1.

    Args:
        q, k: ``[B, H, D]``; v: ``[B, H, E]``; state ``[B, H, D, E]`` (not modified).

    Returns:
        ``o [B, H, E]`` and the new state ``[B, H, D, E]``, both float64.
    """
    o, new_state = lightning_attn_ref(q[:, None], k[:, None], v[:, None], slopes, scale=scale, initial_state=state)
    return o[:, 0], new_state

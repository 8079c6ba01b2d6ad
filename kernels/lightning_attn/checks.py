"""Input checks shared by the lightning attention entry points (chunked and decode).

Each raises TypeError/ValueError naming the argument and what was expected, before anything
launches.
"""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (16, 32, 64, 128, 256)


def check_qkv_slopes(q, k, v, slopes, *, lead: str, extra: dict | None = None) -> tuple[int, ...]:
    """Check q, k ``[*lead, D]``, v ``[*lead, E]`` (one dtype, one device with ``slopes`` and
    the tensors in ``extra``) and slopes ``[H]``; ``lead`` names the leading dims, e.g.
    ``"B, T, H"``. Returns the leading sizes followed by D and E."""
    for name, x in (("q", q), ("k", k), ("v", v), ("slopes", slopes)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    rank = lead.count(",") + 2
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != rank:
            raise ValueError(f"{name} must be [{lead}, {'E' if name == 'v' else 'D'}] ({rank} dims), got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    sizes, D = tuple(q.shape[:-1]), q.shape[-1]
    if tuple(v.shape[:-1]) != sizes:
        raise ValueError(f"v must be [{lead}, E] = [{', '.join(map(str, sizes))}, E] like q, got {tuple(v.shape)}")
    E = v.shape[-1]
    for name, dim in (("D (head dim of q, k)", D), ("E (head dim of v)", E)):
        if dim not in HEAD_DIMS:
            raise ValueError(f"{name} must be one of {HEAD_DIMS}, got {dim}")
    others = [x for x in (extra or {}).values() if isinstance(x, torch.Tensor)]
    devices = {x.device for x in (q, k, v, slopes, *others)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    H = sizes[-1]
    if slopes.shape != (H,):
        raise ValueError(f"slopes must be [H] = [{H}], got {tuple(slopes.shape)}")
    if not slopes.is_floating_point():
        raise TypeError(f"slopes must be a float tensor, got {slopes.dtype}")
    return (*sizes, D, E)

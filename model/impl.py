"""The model's kernel-backed operations, in two implementations with one signature each.

``"kernels"``: the Triton kernels (``kernels.lightning_attn``, ``kernels.moe_gemm``), each
taking its launch config from the one lookup in ``kernels/_config.py``; nothing here passes
a config. ``"reference"``: the naive float64 references (``reference/``), results cast back
to the input dtype, so a model built on them computes the same function with the same
parameters. Everything else in the model (projections, norms, rotary, softmax attention
through torch SDPA) is shared torch code.

The wrappers call the kernel and reference functions through this module's globals, so a
test can replace one (``monkeypatch.setattr(model.impl, "lightning_attn", ...)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.a2a_overlap import moe_ffn_ep
from kernels.lightning_attn import lightning_attn, lightning_decode
from kernels.moe_gemm import moe_ffn
from reference.lightning_attn import lightning_attn_ref, lightning_decode_ref
from reference.moe import moe_ffn_ref
from reference.moe_ep import moe_ffn_ep_ref


@dataclass(frozen=True)
class Impl:
    """One implementation of the three kernel-backed operations (MiniMax: scale 1 everywhere).

    lightning(q, k, v, slopes, initial_state, output_final_state) -> (o, final_state):
        q, k ``[B, T, H, D]``, v ``[B, T, H, E]``, slopes float32 ``[H]``, initial_state
        float32 ``[B, H, D, E]`` or None; o ``[B, T, H, E]`` in q's dtype, final_state float32
        ``[B, H, D, E]`` (None unless asked). Differentiable in q, k, v.
    lightning_step(q, k, v, slopes, state) -> o:
        one token, q, k ``[B, H, D]``, v ``[B, H, E]``; ``state`` float32 ``[B, H, D, E]`` is
        updated in place; o ``[B, H, E]`` in q's dtype. Not differentiable.
    moe(x, router_logits, w_gate_up, w_down, top_k) -> out:
        x ``[N, Hd]``, router_logits ``[N, num_experts]``, w_gate_up ``[num_experts, Hd, 2F]``
        (gate then up), w_down ``[num_experts, F, Hd]``; out ``[N, Hd]`` in x's dtype.
    moe_ep(x, router_logits, w_gate_up_local, w_down_local, top_k, group) -> out:
        the same with the experts sharded over the process group ``group`` of W ranks: this
        rank's ``[num_experts / W, ...]`` shards; every rank of the group must call it.
    """

    name: str
    lightning: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    lightning_step: Callable[..., torch.Tensor]
    moe: Callable[..., torch.Tensor]
    moe_ep: Callable[..., torch.Tensor]


def _kernel_lightning(q, k, v, slopes, initial_state, output_final_state):
    return lightning_attn(q, k, v, slopes, scale=1.0, initial_state=initial_state, output_final_state=output_final_state)


def _kernel_lightning_step(q, k, v, slopes, state):
    return lightning_decode(q, k, v, slopes, state, scale=1.0)[0]


def _kernel_moe(x, router_logits, w_gate_up, w_down, top_k):
    return moe_ffn(x, router_logits, w_gate_up, w_down, top_k=top_k)


def _kernel_moe_ep(x, router_logits, w_gate_up_local, w_down_local, top_k, group):
    return moe_ffn_ep(x, router_logits, w_gate_up_local, w_down_local, top_k, group)


def _reference_lightning(q, k, v, slopes, initial_state, output_final_state):
    o, final_state = lightning_attn_ref(q, k, v, slopes, scale=1.0, initial_state=initial_state)
    return o.to(q.dtype), final_state.float() if output_final_state else None


def _reference_lightning_step(q, k, v, slopes, state):
    o, new_state = lightning_decode_ref(q, k, v, slopes, state, scale=1.0)
    state.copy_(new_state)
    return o.to(q.dtype)


def _reference_moe(x, router_logits, w_gate_up, w_down, top_k):
    return moe_ffn_ref(x, router_logits, w_gate_up, w_down, top_k).to(x.dtype)


def _reference_moe_ep(x, router_logits, w_gate_up_local, w_down_local, top_k, group):
    return moe_ffn_ep_ref(x, router_logits, w_gate_up_local, w_down_local, top_k, group).to(x.dtype)


IMPLS: dict[str, Impl] = {
    "kernels": Impl("kernels", _kernel_lightning, _kernel_lightning_step, _kernel_moe, _kernel_moe_ep),
    "reference": Impl("reference", _reference_lightning, _reference_lightning_step, _reference_moe, _reference_moe_ep),
}

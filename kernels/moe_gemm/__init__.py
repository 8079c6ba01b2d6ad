"""Grouped MoE GEMM for the MiniMax-01 FFN (32 experts, top-2, SwiGLU experts).

Pipeline (T tokens of width Hd, E experts, top k, M = T * k token copies):

1. Routing (``routing.route``: torch's softmax and three Triton launches, no host sync):
   ``probs = softmax(logits)`` in fp32; the k largest per token, ties to the lower expert id
   (what a stable descending sort keeps); ``weights`` ``[T, k]`` = those probabilities
   renormalised to sum 1. The copies ``c = t * k + j`` are stably sorted by expert (a
   counting sort): ``row_to_copy [M]`` (copy of each expert-ordered row),
   ``row_to_token [M]`` int32 (= row_to_copy // k, the gather index), ``copy_to_row [T, k]``
   int32 (the inverse permutation, the combine's index map), ``counts [E]`` and ``offsets
   [E]`` int32 group ends (expert e owns rows ``[offsets[e-1], offsets[e])``).
2. Up projection + SwiGLU (``grouped_gemm.gather_gemm_swiglu``, one launch):
   ``h[p] = silu(g) * u``, ``[g, u] = x[row_to_token[p]] @ w_gate_up[e]``, the gather fused
   into the A loads, SwiGLU into the epilogue (gate and up accumulated side by side).
3. Down projection (``grouped_gemm.grouped_gemm_fwd``, one launch): ``y[p] = h[p] @ w_down[e]``.
4. Combine (``routing.combine``, one launch): ``out[t] = sum_j weights[t, j] *
   y[copy_to_row[t, j]]``, the k copies summed in slot order in fp32 (deterministic).

Grouped GEMM tile schedule: the M tiles of all experts are numbered consecutively; each
program derives its expert from the E group ends (a cumulative sum of per-expert tile
counts in registers), so one launch covers every expert and any group sizes, empty ones
included. The backward uses the same kernel on transposed weight strides for dX (with the
SwiGLU backward fused into the epilogue in moe_ffn) and a per-expert reduction kernel for
dW. Details: ``grouped_gemm.py``; autograd: ``api.py``.

Note: as an attribute of this package, ``grouped_gemm`` is the public function (DESIGN.md's
API), which hides the kernel module of the same name; reach the module's names with
``from kernels.moe_gemm.grouped_gemm import grouped_gemm_fwd, ...`` (that form imports the
module) or ``importlib.import_module("kernels.moe_gemm.grouped_gemm")``.
"""
from kernels.moe_gemm.api import grouped_gemm, moe_ffn
from kernels.moe_gemm.routing import Routing, route

__all__ = ["Routing", "grouped_gemm", "moe_ffn", "route"]

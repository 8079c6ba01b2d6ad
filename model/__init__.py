"""MiniMax-Text-01-style hybrid decoder built from the workbench's kernels.

Out of every 8 layers, 7 use lightning attention and 1 softmax attention (GQA, partial
rotary, torch SDPA); every layer's FFN is a top-2 mixture of SwiGLU experts. ``impl="kernels"``
runs lightning attention and the MoE on the Triton kernels (launch configs from the tuned
files through ``kernels/_config.py``), ``impl="reference"`` on the references in ``reference/``.

    from model import HybridDecoder, get_config, kernel_plan
    model = HybridDecoder("tiny", impl="kernels")                  # or a ModelConfig
    logits, cache = model(input_ids[:, :T0], use_cache=True)       # prefill, [B, T0, vocab]
    logits, cache = model(input_ids[:, T0:T0 + 1], cache=cache, use_cache=True)  # one decode step
    rows = kernel_plan("minimax-text-01", batch=1, seq_len=4096)    # launches, buckets, configs

Expert parallelism: ``HybridDecoder(config, ep_group=group)`` holds this rank's E/W experts
per layer and runs the MoE through ``kernels.a2a_overlap.moe_ffn_ep``; every rank of the group
runs the model together on its own tokens; ``shard_experts(full_state_dict, rank, W)`` cuts a
full checkpoint's expert weights to a rank's shard.
"""
from model.cache import Cache, KVCache, LightningState
from model.config import CONFIGS, LIGHTNING, SOFTMAX, ModelConfig, deepnorm_alpha, get_config
from model.decoder import DecoderLayer, HybridDecoder
from model.moe import shard_experts
from model.plan import PlanRow, kernel_plan

__all__ = [
    "CONFIGS",
    "LIGHTNING",
    "SOFTMAX",
    "Cache",
    "DecoderLayer",
    "HybridDecoder",
    "KVCache",
    "LightningState",
    "ModelConfig",
    "PlanRow",
    "deepnorm_alpha",
    "get_config",
    "kernel_plan",
    "shard_experts",
]

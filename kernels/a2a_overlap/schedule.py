"""The overlap schedule's tunables: how many chunks, which transport, how many SMs NCCL may use.

A config is ``{"num_chunks": C, "comm_ctas": K, "transport": X}``: C chunks, each a group of
the local experts (``C <= E / W``; see ``api.py``); X = ``"nccl"`` (the group's all-to-all;
on NCCL a communicator whose kernels use at most K CTAs, one SM each, ``ncclConfig_t.maxCTAs``,
so the experts' GEMMs keep the rest; ``K = 0`` leaves NCCL's own choice) or ``"copy"`` (copy
engines pulling from the peers' workspaces, ``copy_exchange.py``; K must be 0) or ``"flags"``
(the copy engines and per-expert flags under unchunked GEMMs, ``flags_exchange.py``; C must be
1, K 0). Entries
written before the copy transport existed have no ``transport``: they mean ``"nccl"``. Tuned
per GPU type by ``python -m autotune.ep_bench`` into ``kernels/configs/<gpu-slug>/moe_ffn_ep.json``,
keyed by :func:`bucket_key`.

Every rank must launch the same collectives, so every rank must pick the same config: the
key holds only what all ranks share (world size, expert shapes, dtype) and the LARGEST token
count of any rank (read off the call's count all-gather, which every rank receives whole),
never a rank's own count.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import triton

from kernels import _config
from kernels.a2a_overlap import workspace

KERNEL = "moe_ffn_ep"
# Used when no tuned file applies: the plain pipeline (no chunking, NCCL's own SM count),
# the serial schedule the issue measured as the baseline. Not a measured optimum.
DEFAULT_CONFIG = {"num_chunks": 1, "comm_ctas": 0, "transport": "nccl"}
TRANSPORTS = ("nccl", "copy", "flags")


def bucket_key(W: int, E: int, Hd: int, F: int, T_max: int, dtype: torch.dtype) -> dict:
    """Shape bucket: world size, experts, hidden sizes, dtype, and the largest token count of
    any rank rounded up to a power of two."""
    return {"W": W, "E": E, "Hd": Hd, "F": F, "dtype": str(dtype).removeprefix("torch."),
            "T": triton.next_power_of_2(max(T_max, 1))}


def valid_config(config: dict) -> bool:
    C, K, X = config.get("num_chunks"), config.get("comm_ctas"), config.get("transport", "nccl")
    return (isinstance(C, int) and not isinstance(C, bool) and C >= 1
            and isinstance(K, int) and not isinstance(K, bool) and K >= 0
            and X in TRANSPORTS and (X == "nccl" or K == 0) and (X != "flags" or C == 1))


def tuned_config(counts: list[list[int]], top_k: int, w_down_local: torch.Tensor, dtype: torch.dtype,
                 group, device: torch.device) -> dict:
    """The tuned config for this call, the same on every rank: ``counts`` is every rank's row
    count per expert (``[W][E]``, the call's count all-gather), so rank r holds
    ``sum(counts[r]) / top_k`` tokens and every rank finds the same largest one."""
    W, E = len(counts), len(counts[0])
    F, Hd = w_down_local.shape[1], w_down_local.shape[2]
    key = bucket_key(W, E, Hd, F, max(sum(row) for row in counts) // top_k, dtype)
    config = _config.lookup(KERNEL, key, default=DEFAULT_CONFIG, near=("T",))
    fits = valid_config(config) and config["num_chunks"] <= E // W
    if fits and config.get("transport") in ("copy", "flags") and workspace.supported(group, device):
        fits = False  # tuned where symmetric memory works, run where it does not (the same on every rank)
    return {**DEFAULT_CONFIG, **config} if fits else dict(DEFAULT_CONFIG)


def comm_group(group, comm_ctas: int):
    """The process group the exchanges run on: ``group`` itself unless ``comm_ctas > 0`` on
    NCCL, then a communicator over the same ranks whose kernels use at most ``comm_ctas``
    CTAs. Created once per (group, comm_ctas) and cached; creation is collective over the
    WORLD (``new_group``), which is why every rank must ask for the same configs in the same
    order (the contract of ``moe_ffn_ep``)."""
    if comm_ctas == 0 or dist.get_backend(group) != "nccl":
        return group
    return _nccl_group(tuple(dist.get_process_group_ranks(group or dist.group.WORLD)), comm_ctas)


@functools.lru_cache(maxsize=None)
def _nccl_group(ranks: tuple[int, ...], comm_ctas: int):
    options = dist.ProcessGroupNCCL.Options()
    options.config.max_ctas = comm_ctas
    options.config.min_ctas = 1  # NCCL's own default; must not exceed max_ctas
    return dist.new_group(list(ranks), backend="nccl", pg_options=options)

"""Which kernel launches a model makes, per layer, and the launch config each one gets.

:func:`kernel_plan` walks the layers of a config and, for each kernel launch of a phase
(``prefill``: the forward over ``seq_len`` tokens; ``decode``: one token per sequence;
``backward``: the training backward of the prefill), computes the shape bucket with the
kernel's own ``bucket_key`` and resolves the config exactly as the kernel does: the one
lookup in ``kernels/_config.py`` (exact bucket, nearest bucket, else the kernel's
``default_config``), replaced by that default when the kernel's ``valid_config`` rejects it.
Nothing launches, so a plan for MiniMax-Text-01 costs a few hundred dict lookups.

Launches per layer (M = tokens * top_k rows of the MoE GEMMs; F the expert hidden size):

- lightning layer: ``lightning_attn_fwd`` (prefill), ``lightning_attn_bwd`` (backward: its
  three passes share one config, BV clipped to each pass's width), ``lightning_decode``.
- softmax layer: torch SDPA (no tuned config).
- every layer's MoE: ``grouped_gemm_swiglu`` for ``x @ w_gate_up`` (gathered rows, SwiGLU
  epilogue: the launch halves the config's BLOCK_N), ``grouped_gemm`` for ``h @ w_down``; backward: ``grouped_gemm_dw`` for each
  weight gradient, ``grouped_gemm_dx`` for the SwiGLU backward and for dX. The routing
  combine kernels use a fixed config (``routing.COMBINE_CONFIG``) and are not listed.
- with expert parallelism over W ranks (``ep_size``): first the ``moe_ffn_ep`` schedule
  lookup (keyed by W and the tokens per rank; forward only, the backward runs the forward's
  chunks), then the grouped GEMMs of one chunk of the schedule: E/W/C local experts and,
  assuming balanced routing, M/C rows (a rank receives about tokens * top_k rows in all).
  The call takes the schedule of the largest token count of any rank (read off its count
  all-gather); the plan assumes every rank has ``batch * seq_len`` tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import _config
from kernels.a2a_overlap import schedule as ep_schedule
from kernels.lightning_attn import backward as lightning_bwd
from kernels.lightning_attn import decode as lightning_dec
from kernels.lightning_attn import forward as lightning_fwd
from kernels.moe_gemm.grouped_gemm import (
    KERNEL,
    KERNEL_DW,
    KERNEL_DX,
    KERNEL_SWIGLU,
    bucket_key,
    default_config,
    default_dw_config,
    valid_config,
    valid_dw_config,
    valid_swiglu_config,
)
from model.config import LIGHTNING, ModelConfig, get_config

PHASES = ("prefill", "decode", "backward")
SDPA = "torch.sdpa"


@dataclass(frozen=True)
class PlanRow:
    """One kernel launch of one layer: what it computes and the config it launches with."""

    layer: int
    kind: str  # "lightning" or "softmax"
    phase: str  # "prefill", "decode" or "backward"
    op: str  # what the launch computes, e.g. "moe x @ w_gate_up + SwiGLU"
    kernel: str  # the kernel's config name (its file is <root>/<gpu-slug>/<kernel>.json), or "torch.sdpa"
    key: dict  # the shape bucket the lookup is keyed by ({} for SDPA)
    config_file: str | None  # the file the lookup reads (None for SDPA)
    file_status: str  # "ok", "missing", "corrupt", "stale" (see _config.read_config_file); "untuned" for SDPA
    config: dict  # the config the launch uses ({} for SDPA)
    tuned: bool = False  # whether a file entry (exact or nearest bucket) gave it, rather than the default


@dataclass(frozen=True)
class _Launch:
    phase: str
    op: str
    kernel: str
    key: dict
    default: dict
    valid: Callable[[dict], bool]
    near: tuple[str, ...]


def _lightning_launches(D: int, batch: int, seq_len: int, dtype: torch.dtype) -> list[_Launch]:
    return [
        _Launch("prefill", "lightning attention", lightning_fwd.KERNEL, lightning_fwd.bucket_key(D, D, seq_len, dtype),
                lightning_fwd.default_config(D, D), lambda c: lightning_fwd.valid_config(c, D, D), ("T",)),
        _Launch("decode", "lightning decode step", lightning_dec.KERNEL, lightning_dec.bucket_key(D, D, batch),
                lightning_dec.default_config(D, D), lambda c: lightning_dec.valid_config(c, D, D), ("B",)),
        _Launch("backward", "lightning attention dq, dk, dv", lightning_bwd.KERNEL,
                lightning_bwd.bucket_key(D, D, seq_len, dtype), lightning_bwd.default_config(D, D),
                lambda c: lightning_bwd.valid_config(c, D, D), ("T",)),
    ]


def _ep_launch(config: ModelConfig, phase: str, tokens: int, dtype: torch.dtype, ep_size: int) -> _Launch:
    key = ep_schedule.bucket_key(ep_size, config.num_experts, config.hidden_size, config.expert_hidden_size, tokens, dtype)
    fits = lambda c: ep_schedule.valid_config(c) and c["num_chunks"] <= config.num_experts // ep_size  # noqa: E731
    return _Launch(phase, f"moe expert-parallel schedule (W={ep_size})", ep_schedule.KERNEL, key,
                   dict(ep_schedule.DEFAULT_CONFIG), fits, ("T",))


def _moe_launches(config: ModelConfig, phase: str, tokens: int, dtype: torch.dtype, chunks: int = 1,
                  ep_size: int = 1) -> list[_Launch]:
    """The grouped GEMMs of one MoE call, or of one of its ``chunks`` on one of ``ep_size`` ranks."""
    E = config.num_experts // ep_size // chunks
    Hd, F = config.hidden_size, config.expert_hidden_size
    M = max(tokens * config.top_k // chunks, 1)
    gemm, dw = default_config(E, M), default_dw_config(E, M)
    forward = [
        _Launch(phase, "moe x @ w_gate_up + SwiGLU", KERNEL_SWIGLU, bucket_key(E, 2 * F, Hd, M, dtype), gemm,
                valid_swiglu_config, ("M",)),
        _Launch(phase, "moe h @ w_down", KERNEL, bucket_key(E, Hd, F, M, dtype), gemm, valid_config, ("M",)),
    ]
    if phase != "backward":
        return forward
    return [
        _Launch(phase, "moe dw_down = h^T dy", KERNEL_DW, bucket_key(E, Hd, F, M, dtype), dw, valid_dw_config, ("M",)),
        _Launch(phase, "moe dgu = SwiGLU'(dy @ w_down^T)", KERNEL_DX, bucket_key(E, F, Hd, M, dtype), gemm, valid_config, ("M",)),
        _Launch(phase, "moe dw_gate_up = x^T dgu", KERNEL_DW, bucket_key(E, 2 * F, Hd, M, dtype), dw, valid_dw_config, ("M",)),
        _Launch(phase, "moe dx = dgu @ w_gate_up^T", KERNEL_DX, bucket_key(E, Hd, 2 * F, M, dtype), gemm, valid_config, ("M",)),
    ]


def kernel_plan(
    config: ModelConfig | str,
    batch: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    phases: tuple[str, ...] = ("prefill", "decode"),
    slug: str | None = None,
    ep_size: int = 1,
) -> list[PlanRow]:
    """Every kernel launch of the model, layer by layer, with its bucket and config.

    Args:
        config: a :class:`ModelConfig` or a registered name (``get_config``).
        batch: sequences per call (B); seq_len: tokens per sequence of the prefill (T).
        dtype: the model's dtype (the kernels' buckets include it).
        phases: which of ``prefill``, ``decode`` (one token per sequence), ``backward``.
        slug: plan for this GPU's config folder (default: this machine's, ``cpu`` without a GPU).
        ep_size: ranks the experts are sharded over (``HybridDecoder(ep_group=...)``); 1: none.
            ``batch`` is then the sequences of one rank.

    Returns:
        :class:`PlanRow` s ordered by layer, then phase (in ``phases`` order), then launch order.
    """
    if isinstance(config, str):
        config = get_config(config)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig or a config name, got {type(config).__name__}")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(phases, tuple) or not phases or any(p not in PHASES for p in phases):
        raise ValueError(f"phases must be a non-empty tuple of {PHASES}, got {phases!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or config.num_experts % ep_size:
        raise ValueError(f"ep_size must be a positive int dividing num_experts = {config.num_experts}, got {ep_size!r}")

    status = functools.cache(lambda kernel: _config.read_config_file(_config.config_path(kernel, slug)).status)

    def resolve(launch: _Launch) -> tuple[dict, bool]:
        """What ``_config.lookup_launchable`` gives the kernel, and whether a file entry gave it."""
        found = _config.find_entry(launch.kernel, launch.key, near=launch.near, slug=slug)
        if found is not None and launch.valid(found):
            return found, True
        return dict(launch.default), False

    def row(layer: int, kind: str, launch: _Launch) -> PlanRow:
        path = str(_config.config_path(launch.kernel, slug))
        return PlanRow(layer, kind, launch.phase, launch.op, launch.kernel, launch.key, path, status(launch.kernel),
                       *resolve(launch))

    D = config.head_dim
    lightning = {launch.phase: launch for launch in _lightning_launches(D, batch, seq_len, dtype)}
    moe = {}
    for phase in phases:
        tokens = batch if phase == "decode" else batch * seq_len
        if ep_size == 1:
            moe[phase] = _moe_launches(config, phase, tokens, dtype)
        else:
            # the schedule is looked up in the forward; the backward runs the forward's chunks
            ep = _ep_launch(config, phase, tokens, dtype, ep_size)
            chunks = resolve(ep)[0]["num_chunks"]
            moe[phase] = ([] if phase == "backward" else [ep]) + _moe_launches(config, phase, tokens, dtype, chunks,
                                                                                ep_size)
    rows = []
    for layer, kind in enumerate(config.layer_kinds):
        for phase in phases:
            if kind == LIGHTNING:
                rows.append(row(layer, kind, lightning[phase]))
            else:
                rows.append(PlanRow(layer, kind, phase, "softmax attention", SDPA, {}, None, "untuned", {}))
            rows.extend(row(layer, kind, launch) for launch in moe[phase])
    return rows

"""Lightning attention decode: one new token per sequence, the fp32 state updated in place.

Per (batch row b, head h), ``lambda = exp(-slopes[h])``::

    S <- lambda S + k^T v          (S: [D, E] float32, in place)
    o  = scale * q S               ([E], in the input dtype)

One program per (b, h, slice of E of width BV): it reads its ``[D, BV]`` slice of S once,
writes it back once, and reads q, k (D each) and its BV of v. There are no dots (a rank-1
update and a reduction over D), so BV may be below 16. The step allocates o only, never
syncs with the host and reads the slopes inside the kernel, so it can be captured in a CUDA
graph. Purely memory bound: bytes = 2 * 4 * B*H*D*E (state) + the token's q, k, v, o.

Two backends compute the same step, chosen by the config's ``backend`` field (tuned per
batch bucket, like the block sizes): ``"triton"`` (this module; BV, num_warps) and
``"cupy"`` (CUDA C++ compiled at run time, :mod:`kernels.lightning_attn.decode_cuda`; BV,
ROWS). A config file written on a machine with CuPy that is read on one without falls back
to the Triton default with a warning.
"""
from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from kernels import _config
from kernels.lightning_attn import decode_cuda
from kernels.lightning_attn.checks import check_qkv_slopes

KERNEL = "lightning_decode"

# Used when no tuned file applies. NOT measured (no GPU time when it was written): BV=32
# gives B*H*E/32 programs (256 at B=1, H=64, E=128) of a [D, 32] fp32 slice, 32 registers
# per thread at D=128 and 4 warps. Tune per batch bucket (issue 4).
DEFAULT_CONFIG = {"backend": "triton", "BV": 32, "num_warps": 4}
CONFIG_FIELDS = tuple(DEFAULT_CONFIG)
BACKENDS = ("triton", "cupy")


def default_config(D: int, E: int) -> dict:
    """The documented fallback config for head dims (D, E)."""
    return {**DEFAULT_CONFIG, "BV": min(DEFAULT_CONFIG["BV"], E)}


def bucket_key(D: int, E: int, B: int) -> dict:
    """Shape bucket of the tuned configs: head dims and the batch rounded up to 2^k."""
    return {"D": D, "E": E, "B": triton.next_power_of_2(max(B, 1))}


def valid_config(config: dict, D: int, E: int) -> bool:
    """Whether ``config`` can launch at head dims (D, E) on this machine. Triton: BV a power
    of two dividing E, at most 8192 fp32 state elements (D*BV) per program, num_warps >= 1.
    CuPy: CuPy present and :func:`decode_cuda.valid_config`. A missing backend means Triton."""
    backend = config.get("backend", "triton")
    if backend == "cupy":
        return decode_cuda.available() and decode_cuda.valid_config(config, D, E)
    if backend != "triton":
        return False
    BV, warps = config.get("BV"), config.get("num_warps")
    if not (isinstance(BV, int) and isinstance(warps, int)):
        return False
    return 1 <= BV <= E and BV & (BV - 1) == 0 and E % BV == 0 and D * BV <= 8192 and warps >= 1


def _resolve(config: dict | None, D: int, E: int, B: int) -> dict:
    """An explicit config must be valid (ValueError); a looked-up one that is not (another
    machine's backend, a stale field) is replaced by the default, with a warning once."""
    if config is not None:
        if not valid_config(config, D, E):
            why = " (CuPy or a GPU is missing)" if config.get("backend") == "cupy" and not decode_cuda.available() else ""
            raise ValueError(f"config {config} cannot launch lightning_decode for D={D}, E={E}{why} (see valid_config)")
        return config
    fallback = default_config(D, E)
    found = _config.lookup(KERNEL, bucket_key(D, E, B), default=fallback, near=("B",))
    if valid_config(found, D, E):
        return found
    _warn_once(f"tuned lightning_decode config {found} cannot launch here (backend {found.get('backend')!r}); "
               f"using the default {fallback}")
    return fallback


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@triton.jit
def _lightning_decode_kernel(
    q, k, v, o, slopes, state, scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kd,
    stride_vb, stride_vh, stride_ve,
    stride_ob, stride_oh,
    stride_s,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BV: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, D)
    o_e = i_v * BV + tl.arange(0, BV)
    lam = tl.exp(-tl.load(slopes + i_h * stride_s).to(tl.float32))

    b_q = tl.load(q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + o_d * stride_qd).to(tl.float32)  # [D]
    b_k = tl.load(k + i_b.to(tl.int64) * stride_kb + i_h * stride_kh + o_d * stride_kd).to(tl.float32)  # [D]
    b_v = tl.load(v + i_b.to(tl.int64) * stride_vb + i_h * stride_vh + o_e * stride_ve).to(tl.float32)  # [BV]
    # the state slice S[:, i_v*BV : (i_v+1)*BV] of (b, h), contiguous row-major [D, E]
    p_s = state + i_bh.to(tl.int64) * D * E + o_d[:, None] * E + o_e[None, :]  # [D, BV]

    # one step of the recurrence, written back in place: S = lambda S + k^T v
    b_s = tl.load(p_s) * lam + b_k[:, None] * b_v[None, :]  # [D, BV]
    tl.store(p_s, b_s)
    # o = scale * q S (a reduction over D)
    b_o = tl.sum(b_q[:, None] * b_s, axis=0) * scale  # [BV]
    tl.store(o + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + o_e, b_o.to(o.dtype.element_ty))


def _check_inputs(q, k, v, slopes, state) -> None:
    """Raise TypeError/ValueError naming the argument, before anything launches."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a torch.Tensor, got {type(state).__name__}")
    B, H, D, E = check_qkv_slopes(q, k, v, slopes, lead="B, H", extra={"state": state})
    if state.dtype != torch.float32:
        raise TypeError(f"state must be float32 (it is updated in place), got {state.dtype}")
    if state.shape != (B, H, D, E):
        raise ValueError(f"state must be [B, H, D, E] = [{B}, {H}, {D}, {E}], got {tuple(state.shape)}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place; a copy would not be)")


def lightning_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float = 1.0,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of lightning attention: ``S <- lambda S + k^T v``, ``o = scale q S``.

    Args:
        q, k: ``[B, H, D]``; v: ``[B, H, E]``; float32, bfloat16 or float16 (one dtype), D and
            E powers of two in 16..256, any strides.
        slopes: float ``[H]``, as given to :func:`lightning_attn` (read inside the kernel).
        state: float32 ``[B, H, D, E]``, contiguous; UPDATED IN PLACE (e.g. the final state
            of a prefill with ``lightning_attn(..., output_final_state=True)``).
        scale: multiplies the output.
        config: ``backend`` ("triton": BV, the width of the E slice one program owns, and
            num_warps; "cupy": BV and ROWS, see :mod:`decode_cuda`); overrides the tuned
            lookup (the autotuner passes candidates this way).

    Returns:
        ``o [B, H, E]`` in the input dtype, and ``state`` (the same tensor). Not differentiable.
    """
    _check_inputs(q, k, v, slopes, state)
    B, H, D = q.shape
    E = v.shape[-1]
    config = _resolve(config, D, E, B)
    BV = config["BV"]

    o = torch.empty(B, H, E, dtype=q.dtype, device=q.device)
    if B == 0:
        return o, state
    if config.get("backend") == "cupy":
        decode_cuda.decode_step(q, k, v, o, slopes, state, float(scale), config)
        return o, state
    _lightning_decode_kernel[(E // BV, B * H)](
        q, k, v, o, slopes, state, float(scale),
        *q.stride(), *k.stride(), *v.stride(),
        o.stride(0), o.stride(1),
        slopes.stride(0),
        H=H, D=D, E=E, BV=BV,
        num_warps=config["num_warps"],
    )
    return o, state

"""Benchmarks as data: an operator is an input generator plus named providers (ours, the
peers, the floor), measured the same way and written as one results line each.

Lightning attention, ``mode="fwd"``: ours vs fla's ``chunk_simple_gla`` computing the same
function (``g_gamma = -slopes``), vs causal SDPA (FlashAttention) on the same q, k, v; floor:
read q, k, v once and write o once. ``mode="fwd_bwd"``: the forward then the gradients of q, k,
v for a random ``do`` (``torch.autograd.grad``, nothing accumulates between calls); floor: 11
tensors (the forward's 4, then q, k, v, do read and dq, dk, dv written). Each provider's peak
allocation on top of its inputs is recorded in units of q (issue 4's memory target).

Decode (:class:`DecodeCase`): one step at batch B vs fla's ``fused_recurrent_simple_gla`` on
a one-token sequence with the same state, vs a plain copy of the state (the copy rate).
"""
from __future__ import annotations

from typing import Callable

import torch

from autotune.lightning import reference_bwd
from kernels import _config
from kernels.lightning_attn import backward, decode, forward, lightning_attn, lightning_decode, minimax_slopes
from profiling import Record, TelemetrySampler, Timing, bench, make_rotation, record_from_timing, source_hash
from reference.lightning_attn import lightning_attn_chunked_ref, lightning_decode_ref

LIGHTNING_SHAPES = [
    {"B": 1, "T": 4096, "H": 64, "D": 128, "E": 128},
    {"B": 1, "T": 16384, "H": 64, "D": 128, "E": 128},
    {"B": 1, "T": 65536, "H": 64, "D": 128, "E": 128},
    {"B": 8, "T": 4096, "H": 64, "D": 128, "E": 128},
]
DECODE_SHAPES = [{"B": B, "H": 64, "D": 128, "E": 128} for B in (1, 16, 256)]
LIGHTNING_MODES = {"fwd": forward.KERNEL, "fwd_bwd": backward.KERNEL}
CHECK_HEADS = 8  # gradients are checked against float64 autograd on the first heads only


def shape_id(shape: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in shape.items())


def lightning_bytes(shape: dict, mode: str, itemsize: int = 2) -> int:
    """fwd: q, k, v read, o written. fwd_bwd: that plus q, k, v, do read and dq, dk, dv written."""
    B, T, H, D, E = (shape[k] for k in "BTHDE")
    per_token = 2 * D + 2 * E if mode == "fwd" else (2 * D + 2 * E) + (4 * D + 3 * E)
    return B * T * H * per_token * itemsize


def lightning_flops(shape: dict, mode: str) -> int:
    """The recurrence's own work: k^T v into the state and q S out of it, 2*D*E each per
    token; the backward does about twice the forward's."""
    B, T, H, D, E = (shape[k] for k in "BTHDE")
    return (4 if mode == "fwd" else 12) * B * T * H * D * E


def _fla(name: str) -> Callable | None:
    try:
        import fla.ops.simple_gla as simple_gla
    except ImportError:
        return None
    return getattr(simple_gla, name)


def _ours_fwd(q, k, v, s):
    return lightning_attn(q, k, v, s)[0]


def _fla_fwd(q, k, v, s):
    return _fla("chunk_simple_gla")(q, k, v, g_gamma=-s, scale=1.0)[0]


def _sdpa_fwd(q, k, v, s):
    """Causal softmax attention on the same tensors, output back in [B, T, H, E]."""
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True)
    return o.transpose(1, 2)


LIGHTNING_PROVIDERS = {"ours": _ours_fwd, "fla": _fla_fwd, "sdpa": _sdpa_fwd}


# Every benchmark case runs ~1 s before it is timed, so it is timed at the GPU's sustained
# state: an H100 runs GEMMs at its 700 W power cap, and a case timed after a 25 ms warm-up
# caught it before the cap (forward up projection at 16K tokens: ours at a median SM clock
# of 1980 MHz against 1455 for the dense GEMM timed later, 98% of dense; 90% when the two
# were interleaved at the cap; docs/perf-notes.md, session 8).
HEAT_MS = 1000.0


def checked_timing(case) -> tuple[Timing, dict]:
    """The measuring step every benchmark case shares: ``case.check()`` against its reference
    (a relative error, or None, goes to ``case.extra["rel_err_vs_ref"]``), then ``case.call``
    timed by ``profiling.bench`` after :data:`HEAT_MS` of warm-up, under a telemetry sampler.
    Returns (timing, telemetry summary)."""
    err = case.check()
    if err is not None:
        case.extra["rel_err_vs_ref"] = err
    return heated_timing(case)


def heated_timing(case) -> tuple[Timing, dict]:
    """``case.call`` timed by ``profiling.bench`` after :data:`HEAT_MS` of warm-up (recorded
    in ``case.extra["warmup_ms"]``), under a telemetry sampler."""
    case.extra["warmup_ms"] = HEAT_MS
    with TelemetrySampler() as sampler:
        timing = bench(case.call, warmup_ms=HEAT_MS)
    return timing, sampler.summary()


def kernel_source_hash(*modules) -> str:
    """The sources of the kernel modules a number was measured with, as one short hash."""
    return source_hash(*(m.__file__ for m in modules))


class LightningCase:
    """One (shape, mode, provider) case: rotated inputs over 2x L2 and ``call(i)`` on set i."""

    def __init__(self, shape: dict, provider: str, mode: str = "fwd", *, dtype: torch.dtype = torch.bfloat16,
                 layer: int = 3, num_layers: int = 8):
        if mode not in LIGHTNING_MODES:
            raise ValueError(f"mode must be one of {list(LIGHTNING_MODES)}, got {mode!r}")
        self.shape, self.provider, self.mode, self.dtype = shape, provider, mode, dtype
        self.kernel = LIGHTNING_MODES[mode]
        self.fwd = LIGHTNING_PROVIDERS[provider]
        self.available = provider != "fla" or _fla("chunk_simple_gla") is not None
        self.extra = {"layer": layer, "num_layers": num_layers,
                      "kernel_source": kernel_source_hash(forward, backward)}
        if not self.available:
            return
        B, T, H, D, E = (shape[k] for k in "BTHDE")
        self.slopes = minimax_slopes(H, layer, num_layers).cuda()
        grad = mode == "fwd_bwd"

        def make():
            q, k = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=grad) for _ in range(2))
            v = torch.randn(B, T, H, E, device="cuda", dtype=dtype, requires_grad=grad)
            return (q, k, v, torch.randn(B, T, H, E, device="cuda", dtype=dtype)) if grad else (q, k, v)

        self.sets = make_rotation(make, lightning_bytes(shape, mode, dtype.itemsize), max_sets=8)
        self.extra["rotation_sets"] = len(self.sets)

    def call(self, i: int):
        """fwd: o. fwd_bwd: (dq, dk, dv) after the forward."""
        inputs = self.sets[i % len(self.sets)]
        if self.mode == "fwd":
            return self.fwd(*inputs, self.slopes)
        q, k, v, do = inputs
        return torch.autograd.grad(self.fwd(q, k, v, self.slopes), (q, k, v), do)

    def check(self) -> float | None:
        """Relative error vs the float64 reference (None for SDPA, another function): o over
        all heads (fwd); the worst of dq, dk, dv over the first CHECK_HEADS heads (fwd_bwd)."""
        if self.provider == "sdpa":
            return None
        out = self.call(0)
        if self.mode == "fwd":
            ref, _ = lightning_attn_chunked_ref(*(x.detach() for x in self.sets[0]), self.slopes)
            return ((out.double() - ref).norm() / ref.norm()).item()
        heads = slice(0, CHECK_HEADS)
        q, k, v, do = (x.detach()[:, :, heads] for x in self.sets[0])
        want = reference_bwd({"q": q, "k": k, "v": v, "do": do, "slopes": self.slopes[heads], "scale": 1.0})
        return max(((g[:, :, heads].double() - w).norm() / w.norm()).item() for g, w in zip(out, want))

    def peak_extra_over_q(self) -> float:
        """Peak memory one call allocates on top of what is live before it, in units of q."""
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = self.call(0)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        del out
        return extra / self.sets[0][0].nbytes

    def measure(self) -> Record:
        """Check, then time (CUDA events, median/p20/p80) under a telemetry sampler."""
        timing, telemetry = checked_timing(self)
        self.extra["peak_alloc_over_q"] = round(self.peak_extra_over_q(), 3)
        B, T, H, D, E = (self.shape[k] for k in "BTHDE")
        config = {}
        if self.provider == "ours":
            key = forward.bucket_key(D, E, T, self.dtype)  # the configs the kernels launched with
            used = {kernel.KERNEL: _config.lookup_launchable(kernel.KERNEL, key, default=kernel.default_config(D, E),
                                                             valid=lambda c, k=kernel: k.valid_config(c, D, E), near=("T",))
                    for kernel in (forward, backward)}
            config = used[forward.KERNEL] if self.mode == "fwd" else {"fwd": used[forward.KERNEL], "bwd": used[backward.KERNEL]}
        return record_from_timing(
            timing, kernel=self.kernel, provider=self.provider, mode=self.mode, shape=self.shape,
            dtype=str(self.dtype).removeprefix("torch."), config=config, x_name="T", x_value=T,
            bytes=lightning_bytes(self.shape, self.mode, self.dtype.itemsize), flops=lightning_flops(self.shape, self.mode),
            telemetry=telemetry, extra=dict(self.extra),
        )


DECODE_PROVIDERS = ("ours", "ours_triton", "ours_cupy", "fla", "copy")


class DecodeCase:
    """One decode step at batch B: ``ours`` (the tuned lookup), ``ours_triton`` and ``ours_cupy``
    (each backend's default-shaped config), ``fla`` (fused recurrent, T = 1, returns a new
    state), ``copy`` (``dst.copy_(state)``: the same state bytes read and written)."""

    CUPY_CONFIG = {"backend": "cupy", "BV": 32, "ROWS": 16}

    def __init__(self, shape: dict, provider: str, *, dtype: torch.dtype = torch.bfloat16):
        if provider not in DECODE_PROVIDERS:
            raise ValueError(f"provider must be one of {DECODE_PROVIDERS}, got {provider!r}")
        self.shape, self.provider, self.dtype = shape, provider, dtype
        B, H, D, E = (shape[k] for k in "BHDE")
        self.config = {"ours_triton": decode.default_config(D, E), "ours_cupy": self.CUPY_CONFIG}.get(provider)
        if provider == "fla":
            self.available = _fla("fused_recurrent_simple_gla") is not None
        elif provider == "ours_cupy":
            self.available = decode.valid_config(self.CUPY_CONFIG, D, E)
        else:
            self.available = True
        self.extra = {"kernel_source": kernel_source_hash(decode, decode.decode_cuda)}
        if not self.available:
            return
        self.slopes = minimax_slopes(H, 3, 8).cuda()
        self.scale = D**-0.5

        def make():
            return (torch.randn(B, H, D, device="cuda", dtype=dtype), torch.randn(B, H, D, device="cuda", dtype=dtype),
                    torch.randn(B, H, E, device="cuda", dtype=dtype), torch.randn(B, H, D, E, device="cuda"),
                    torch.empty(B, H, D, E, device="cuda"))

        self.sets = make_rotation(make, decode_bytes(shape, dtype.itemsize), max_sets=16)
        self.extra["rotation_sets"] = len(self.sets)

    def call(self, i: int):
        q, k, v, state, spare = self.sets[i % len(self.sets)]
        if self.provider == "copy":
            return spare.copy_(state)
        if self.provider == "fla":
            o, new_state = _fla("fused_recurrent_simple_gla")(
                q[:, None], k[:, None], v[:, None], g_gamma=-self.slopes, scale=self.scale,
                initial_state=state, output_final_state=True)
            return o[:, 0], new_state
        return lightning_decode(q, k, v, self.slopes, state, scale=self.scale, config=self.config)

    def check(self) -> float | None:
        """Relative error of o and the new state vs the float64 step (None for the copy)."""
        if self.provider == "copy":
            return None
        q, k, v, state, _ = self.sets[0]
        want_o, want_state = lightning_decode_ref(q, k, v, self.slopes, state.clone(), scale=self.scale)
        o, new_state = self.call(0)
        return max(((a.double() - b).norm() / b.norm()).item() for a, b in ((o, want_o), (new_state, want_state)))

    def measure(self) -> Record:
        timing, telemetry = checked_timing(self)
        B, H, D, E = (self.shape[k] for k in "BHDE")
        config = self.config or {}
        if self.provider == "ours":
            config = _config.lookup_launchable(decode.KERNEL, decode.bucket_key(D, E, B), default=decode.default_config(D, E),
                                               valid=lambda c: decode.valid_config(c, D, E), near=("B",))
        return record_from_timing(
            timing, kernel=decode.KERNEL, provider=self.provider, mode="decode", shape=self.shape,
            dtype=str(self.dtype).removeprefix("torch."), config=config, x_name="B", x_value=B,
            bytes=decode_bytes(self.shape, self.dtype.itemsize), flops=4 * B * H * D * E,
            telemetry=telemetry, extra=dict(self.extra),
        )


def decode_bytes(shape: dict, itemsize: int = 2) -> int:
    """The fp32 state read and written once, plus the token's q, k, v, o."""
    B, H, D, E = (shape[k] for k in "BHDE")
    return 8 * B * H * D * E + itemsize * B * H * (2 * D + 2 * E)

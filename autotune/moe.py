"""The grouped MoE GEMM as four tunables, and as a benchmark operator.

Tunables (each its own config file;
``kwb tune grouped_gemm|grouped_gemm_swiglu|grouped_gemm_dx|grouped_gemm_dw``):

- ``grouped_gemm``: the forward ``y = x @ w[e]`` per group.
- ``grouped_gemm_swiglu``: moe_ffn's up projection, ``silu(g) * u`` with ``[g, u] =
  x[row_to_token] @ w_gate_up[e]`` in one launch (rows gathered in the kernel; the config
  tiles the [M, 2F] product and the launch halves BLOCK_N for its two accumulators). Its
  shapes are the up projection's (N = 2F); timed without storing g and u (inference).
- ``grouped_gemm_dx``: ``dx = dy @ w[e]^T`` (same kernel, transposed weight strides; moe_ffn's
  fused SwiGLU backward looks up this file too).
- ``grouped_gemm_dw``: ``dw[e] = x_e^T dy_e``, the per-expert reduction over rows.

A shape is ``{"E", "K", "N", "T", "top_k", "routing", "dtype"}``: the FORWARD weight
``[E, K, N]``, T tokens routed to top_k experts each (M = T * top_k rows), routing
``random`` (softmax of standard normal logits) or ``zipf`` (see :func:`routing_logits`).
All four tunables take the same shapes; each bucket is the key its kernel looks up
(``grouped_gemm.bucket_key`` of the product it computes, so dX swaps K and N).

Space: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M (GROUP_K for dW), num_warps, num_stages.
Pruning before compiling: the kernel's launch rule (``valid_config``: powers of two >= 16,
num_stages >= 2), tiles no larger than the problem (next power of two of each dim), and a
shared-memory estimate against the H100's 227 KB. The spaces are a few hundred points:
meant for ``--strategy local`` or ``halving``; exhaustive takes hours per kernel on a GPU.

Benchmark operator (:class:`GroupedGemmCase`, :class:`MoeFfnCase`; run by
``tests/benchmarks/test_moe_gemm.py``): ours vs ``torch._grouped_mm``, a loop of
``torch.mm`` per expert, and one dense ``torch.mm`` of the same FLOPs. Every provider does
``2 * M * K * N`` FLOPs (M = T * top_k rows, each multiplied by one expert's ``[K, N]``
weights), so ``TFLOP/s = 2 * M * K * N / (median_ms * 1e-3) / 1e12``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch

from autotune.benchmarks import checked_timing, heated_timing
from autotune.tunable import Config, Shape, Tunable, parse_shape_text, register
from autotune.worker import rel_error
from kernels.moe_gemm.grouped_gemm import (
    KERNEL,
    KERNEL_DW,
    KERNEL_DX,
    KERNEL_SWIGLU,
    bucket_key,
    default_config,
    default_dw_config,
    gather_gemm_swiglu,
    grouped_gemm_dw,
    grouped_gemm_dx,
    grouped_gemm_fwd,
    valid_config,
    valid_dw_config,
    valid_swiglu_config,
)
from kernels.moe_gemm import moe_ffn, route
from kernels.moe_gemm.routing import Routing
from profiling import Record, make_rotation, record_from_timing, source_hash
from reference.moe import grouped_gemm_dw_ref, grouped_gemm_ref

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROUTINGS = ("random", "zipf")

# Zipf exponent of the skewed routing: with E = 32 and top-2, expert 0 is chosen by half the
# tokens (0.499 of 100K sampled tokens on a CPU; 1.0 gives 0.44, 1.2 gives 0.56), i.e. a
# quarter of all rows, 8x the mean; the least loaded expert gets 0.7% of the rows.
ZIPF_EXPONENT = 1.1

SPACE = {
    "BLOCK_M": [64, 128, 256],
    "BLOCK_N": [64, 128, 256],
    "BLOCK_K": [32, 64, 128],
    "GROUP_M": [1, 8],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4],
}
DW_SPACE = {
    "BLOCK_M": [32, 64, 128],
    "BLOCK_N": [64, 128, 256],
    "BLOCK_K": [64, 128, 256],
    "GROUP_K": [1, 8],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4],
    # 0: one program per output tile; 1: one persistent program per SM (TMA-stored tiles;
    # the one 2-per-SM config of the session-9 probe lost to both at 4K and 16K tokens)
    "PROGRAMS_PER_SM": [0, 1],
}

# Largest dynamic shared memory one block may opt into on sm_90 (H100): 227 KB.
SHARED_MEMORY_LIMIT = 227 * 1024

MINIMAX_PROJECTIONS = {"up": {"K": 6144, "N": 18432}, "down": {"K": 9216, "N": 6144}}
SHAPE_SETS = {
    # MiniMax-01's FFN: 32 experts, top-2; up (hidden 6144 -> gate+up 2 x 9216), down (9216 -> 6144)
    "minimax": [
        {"E": 32, **dims, "T": 2**p, "top_k": 2, "routing": "random", "dtype": "bf16"}
        for dims in MINIMAX_PROJECTIONS.values() for p in range(10, 16)
    ],
    # what each chunk's GEMMs see under expert parallelism (moe_ffn_ep, kernels/a2a_overlap):
    # E = 1, 2, 4 local experts per launch, 512-4096 rows per expert (W ranks x T tokens per
    # rank x top-2 / 32 experts: W=2 at 4K-32K tokens per rank is 512-4096). Without these
    # buckets a chunk's GEMMs run the default config (docs/perf-notes.md, session 4).
    "minimax-ep": [
        {"E": E, **dims, "T": E * rows // min(E, 2), "top_k": min(E, 2), "routing": "random", "dtype": "bf16"}
        for dims in MINIMAX_PROJECTIONS.values() for E in (1, 2, 4) for rows in (512, 1024, 2048, 4096)
    ],
    # tiny enough for the Triton interpreter; N and K not multiples of 64, one skewed routing
    "small": [
        {"E": 4, "K": 48, "N": 80, "T": 24, "top_k": 2, "routing": "random", "dtype": "bf16"},
        {"E": 8, "K": 64, "N": 96, "T": 40, "top_k": 2, "routing": "zipf", "dtype": "bf16"},
    ],
}
_SHAPE_FIELDS = ("E", "K", "N", "T", "top_k", "routing", "dtype")


# --------------------------------------------------------------------------- inputs

def routing_logits(T: int, E: int, routing: str, device: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Router logits ``[T, E]`` float32. ``random``: standard normal, so every expert is about
    equally loaded. ``zipf``: ``log p_e + Gumbel noise`` with ``p_e ~ (e+1)^-ZIPF_EXPONENT``,
    whose top-k is a draw of k distinct experts without replacement in proportion to p."""
    if routing == "random":
        return torch.randn(T, E, device=device, generator=generator)
    if routing == "zipf":
        p = torch.arange(1, E + 1, dtype=torch.float64, device=device) ** -ZIPF_EXPONENT
        u = torch.rand(T, E, dtype=torch.float64, device=device, generator=generator).clamp_(1e-12, 1 - 1e-12)
        return ((p / p.sum()).log() - (-u.log()).log()).float()
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")


def routed(shape: Shape, device: str) -> Routing:
    """T tokens routed top_k by ``shape['routing']``."""
    return route(routing_logits(shape["T"], shape["E"], shape["routing"], device), shape["top_k"])


def routed_offsets(shape: Shape, device: str) -> torch.Tensor:
    """int32 ``[E]`` group ends of T tokens routed top_k by ``shape['routing']``."""
    return routed(shape, device).offsets


def rows(shape: Shape) -> int:
    """M: the rows every grouped GEMM of this shape multiplies (T * top_k token copies)."""
    return shape["T"] * shape["top_k"]


def _weights(shape: Shape, device: str) -> torch.Tensor:
    E, K, N = shape["E"], shape["K"], shape["N"]
    return (torch.randn(E, K, N, device=device) * K**-0.5).to(DTYPES[shape["dtype"]])


def _rows(shape: Shape, width: int, device: str) -> torch.Tensor:
    return torch.randn(rows(shape), width, device=device).to(DTYPES[shape["dtype"]])


def make_inputs_fwd(shape: Shape, device: str) -> dict:
    """x ``[M, K]`` (standard normal), w ``[E, K, N]`` (scaled by K^-1/2), routed offsets."""
    return {"x": _rows(shape, shape["K"], device), "w": _weights(shape, device), "offsets": routed_offsets(shape, device)}


def make_inputs_swiglu(shape: Shape, device: str) -> dict:
    """x ``[T, K]`` tokens, w_gate_up ``[E, K, N]``, the routing's offsets and ``x_rows``
    (int32 ``[M]``: the token each expert-ordered row gathers)."""
    routing = routed(shape, device)
    x = torch.randn(shape["T"], shape["K"], device=device).to(DTYPES[shape["dtype"]])
    return {"x": x, "w": _weights(shape, device), "offsets": routing.offsets, "x_rows": routing.row_to_token}


def make_inputs_dx(shape: Shape, device: str) -> dict:
    """dy ``[M, N]``, w ``[E, K, N]``, routed offsets."""
    return {"dy": _rows(shape, shape["N"], device), "w": _weights(shape, device), "offsets": routed_offsets(shape, device)}


def make_inputs_dw(shape: Shape, device: str) -> dict:
    """x ``[M, K]``, dy ``[M, N]``, routed offsets."""
    return {"x": _rows(shape, shape["K"], device), "dy": _rows(shape, shape["N"], device),
            "offsets": routed_offsets(shape, device)}


# --------------------------------------------------------------------------- launch and reference

def run_fwd(inputs: dict, config: Config) -> torch.Tensor:
    return grouped_gemm_fwd(inputs["x"], inputs["w"], inputs["offsets"], config=config)


def run_swiglu(inputs: dict, config: Config) -> torch.Tensor:
    return gather_gemm_swiglu(inputs["x"], inputs["w"], inputs["offsets"], inputs["x_rows"],
                              store_preact=False, config=config)[0]


def run_dx(inputs: dict, config: Config) -> torch.Tensor:
    return grouped_gemm_dx(inputs["dy"], inputs["w"], inputs["offsets"], config=config)


def run_dw(inputs: dict, config: Config) -> torch.Tensor:
    return grouped_gemm_dw(inputs["x"], inputs["dy"], inputs["offsets"], config=config)


def _ref_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 on the CPU (interpreter shapes), float32 per expert on a GPU (MiniMax shapes)."""
    return torch.float64 if x.device.type == "cpu" else torch.float32


def reference_fwd(inputs: dict) -> torch.Tensor:
    return grouped_gemm_ref(inputs["x"], inputs["w"], inputs["offsets"], dtype=_ref_dtype(inputs["x"]))


def reference_swiglu(inputs: dict) -> torch.Tensor:
    x = inputs["x"]
    gate, up = grouped_gemm_ref(x[inputs["x_rows"].long()], inputs["w"], inputs["offsets"], dtype=_ref_dtype(x)).chunk(2, -1)
    return torch.nn.functional.silu(gate) * up


def reference_dx(inputs: dict) -> torch.Tensor:
    dy = inputs["dy"]
    return grouped_gemm_ref(dy, inputs["w"].transpose(1, 2), inputs["offsets"], dtype=_ref_dtype(dy))


def reference_dw(inputs: dict) -> torch.Tensor:
    return grouped_gemm_dw_ref(inputs["x"], inputs["dy"], inputs["offsets"], dtype=_ref_dtype(inputs["x"]))


def tolerance(shape: Shape) -> float:
    """Relative error bound by dtype (DESIGN.md): 1e-5 for fp32 (IEEE dots), 1e-2 for 16-bit operands."""
    return 1e-5 if shape["dtype"] == "fp32" else 1e-2


def bytes_moved(shape: Shape) -> int:
    """Every kernel reads two of {rows [M, K], rows [M, N], weights [E, K, N]} once and writes
    the third once, plus the E int32 offsets."""
    E, K, N, M = shape["E"], shape["K"], shape["N"], rows(shape)
    return DTYPES[shape["dtype"]].itemsize * (M * K + M * N + E * K * N) + 4 * E


def bytes_moved_swiglu(shape: Shape) -> int:
    """The SwiGLU GEMM reads M gathered rows [M, K] and the weights [E, K, N] once, writes
    h [M, N/2], and reads the M int32 row indices and E offsets."""
    E, K, N, M = shape["E"], shape["K"], shape["N"], rows(shape)
    return DTYPES[shape["dtype"]].itemsize * (M * K + M * N // 2 + E * K * N) + 4 * (M + E)


# --------------------------------------------------------------------------- buckets and pruning

def _dtype(shape: Shape) -> torch.dtype:
    return DTYPES[shape["dtype"]]


def bucket_fwd(shape: Shape) -> dict:
    return bucket_key(shape["E"], shape["N"], shape["K"], rows(shape), _dtype(shape))


def bucket_dx(shape: Shape) -> dict:
    """dX computes ``[M, N] @ [N, K]``: the product's N is the weight's K and vice versa."""
    return bucket_key(shape["E"], shape["K"], shape["N"], rows(shape), _dtype(shape))


def bucket_dw(shape: Shape) -> dict:
    return bucket_key(shape["E"], shape["N"], shape["K"], rows(shape), _dtype(shape))


def _fits(block: int, dim: int) -> bool:
    """A tile no larger than the next power of two of its dim (else it computes only padding)."""
    return block <= max(16, 1 << max(dim - 1, 0).bit_length())


def shared_memory_bytes(config: Config, itemsize: int) -> int:
    """Estimated shared memory of a forward/dX program: ``num_stages`` buffered A ``[BM, BK]``
    and B ``[BK, BN]`` tiles, ``num_stages * itemsize * (BM*BK + BK*BN)``. It matched what
    triton 3.9 allocated compiling the kernel for sm_90 ahead of time (bf16 128 x 256 x 64, 3
    stages: 147456 B; the SwiGLU variant at 128 x 2 x 128 x 64: the same; no GPU involved).
    It prunes what cannot fit; a config that passes yet does not fit fails to compile and is
    recorded as failed."""
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    return config["num_stages"] * itemsize * (BM * BK + BK * BN)


def shared_memory_bytes_dw(config: Config, itemsize: int) -> int:
    """dW: ``num_stages`` buffered A^T ``[BK, BM]`` and dY ``[BM, BN]`` tiles, and for a
    persistent config the ``[BK, BN]`` output tile staged for its TMA store. Triton 3.6
    allocated 147480 B for 64 x 256 x 128 at 3 stages per tile and 214016 B persistent (sm_90,
    compiled on the CPU machine; the estimate: 147456 and 212992)."""
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    staged = itemsize * BK * BN if config.get("PROGRAMS_PER_SM", 0) else 0
    return config["num_stages"] * itemsize * (BK * BM + BM * BN) + staged


def _is_valid_gemm(config: Config, M: int, N: int, K: int, itemsize: int) -> bool:
    return (
        valid_config(config)
        and _fits(config["BLOCK_M"], M) and _fits(config["BLOCK_N"], N) and _fits(config["BLOCK_K"], K)
        and shared_memory_bytes(config, itemsize) <= SHARED_MEMORY_LIMIT
    )


def is_valid_fwd(config: Config, shape: Shape) -> bool:
    return _is_valid_gemm(config, rows(shape), shape["N"], shape["K"], _dtype(shape).itemsize)


def is_valid_swiglu(config: Config, shape: Shape) -> bool:
    """The forward's rules on the [M, 2F] product, and BLOCK_N >= 32 (it is halved)."""
    return valid_swiglu_config(config) and is_valid_fwd(config, shape)


def is_valid_dx(config: Config, shape: Shape) -> bool:
    return _is_valid_gemm(config, rows(shape), shape["K"], shape["N"], _dtype(shape).itemsize)


def is_valid_dw(config: Config, shape: Shape) -> bool:
    return (
        valid_dw_config(config)
        and _fits(config["BLOCK_M"], rows(shape)) and _fits(config["BLOCK_N"], shape["N"]) and _fits(config["BLOCK_K"], shape["K"])
        and shared_memory_bytes_dw(config, _dtype(shape).itemsize) <= SHARED_MEMORY_LIMIT
    )


def default_config_fwd(shape: Shape) -> Config:
    """What the forward and dX launch when no tuned entry applies."""
    return default_config(shape["E"], rows(shape))


def default_config_dw(shape: Shape) -> Config:
    return default_dw_config(shape["E"], rows(shape))


def parse_shape(text: str) -> Shape:
    """``"E=32,K=6144,N=18432,T=4096"`` -> a full shape; top_k=2, routing=random, dtype=bf16 unless given."""
    shape = parse_shape_text(text, what="grouped GEMM", fields=_SHAPE_FIELDS, required=("E", "K", "N", "T"),
                             defaults={"top_k": 2, "routing": "random", "dtype": "bf16"},
                             choices={"dtype": DTYPES, "routing": ROUTINGS})
    if shape["top_k"] > shape["E"]:
        raise ValueError(f"grouped GEMM shape {text!r}: top_k must be at most E")
    return shape


def _tunable(name: str, space: dict, is_valid, bucket, make_inputs, run, reference, default_config, *,
             moved=bytes_moved, shape_sets: dict = SHAPE_SETS) -> Tunable:
    return Tunable(
        name=name, space=space, is_valid=is_valid, bucket=bucket, make_inputs=make_inputs, run=run,
        reference=reference, tolerance=tolerance, bytes_moved=moved, default_config=default_config,
        shape_sets=shape_sets, parse_shape=parse_shape, near=("M",),
    )


TUNABLE_FWD = register(_tunable(KERNEL, SPACE, is_valid_fwd, bucket_fwd, make_inputs_fwd, run_fwd,
                                reference_fwd, default_config_fwd))
# the up projection's shapes only: the SwiGLU GEMM's N is 2F (the small set: 2F = 80 and 96)
SWIGLU_SHAPE_SETS = {
    name: [s for s in shapes if name == "small" or s["N"] == MINIMAX_PROJECTIONS["up"]["N"]]
    for name, shapes in SHAPE_SETS.items()
}
TUNABLE_SWIGLU = register(_tunable(KERNEL_SWIGLU, SPACE, is_valid_swiglu, bucket_fwd, make_inputs_swiglu, run_swiglu,
                                   reference_swiglu, default_config_fwd, moved=bytes_moved_swiglu,
                                   shape_sets=SWIGLU_SHAPE_SETS))
TUNABLE_DX = register(_tunable(KERNEL_DX, SPACE, is_valid_dx, bucket_dx, make_inputs_dx, run_dx,
                               reference_dx, default_config_fwd))
TUNABLE_DW = register(_tunable(KERNEL_DW, DW_SPACE, is_valid_dw, bucket_dw, make_inputs_dw, run_dw,
                               reference_dw, default_config_dw))


# --------------------------------------------------------------------------- benchmark operator

BENCH_TOKENS = (4096, 16384)
BENCH_SHAPES = [
    {"proj": proj, "E": 32, **dims, "T": T, "top_k": 2, "routing": routing}
    for proj, dims in MINIMAX_PROJECTIONS.items() for T in BENCH_TOKENS for routing in ROUTINGS
]
MOE_FFN_BENCH_SHAPES = [
    {"E": 32, "Hd": 6144, "F": 9216, "T": T, "top_k": 2, "routing": routing} for T in BENCH_TOKENS for routing in ROUTINGS
]
MODES = {"fwd": KERNEL, "dx": KERNEL_DX, "dw": KERNEL_DW}
PROVIDERS = ("ours", "torch_grouped_mm", "loop", "dense")


def shape_id(shape: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in shape.items())


def gemm_flops(shape: dict) -> int:
    """``2 * M * K * N`` with ``M = T * top_k``: the FLOPs of every mode and provider."""
    return 2 * rows(shape) * shape["K"] * shape["N"]


def tflop_s(flops: int, median_ms: float) -> float:
    """``flops / (median_ms * 1e-3) / 1e12``."""
    return flops / (median_ms * 1e-3) / 1e12


def kernel_source_hash() -> str:
    """The grouped GEMM package's sources, as one short hash (see ``profiling.source_hash``)."""
    package = Path(importlib.import_module("kernels.moe_gemm.grouped_gemm").__file__).parent
    return source_hash(*sorted(package.glob("*.py")))


def _bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


def _providers(mode: str, bounds: list[tuple[int, int]]) -> dict[str, Callable | None]:
    """name -> fn(inputs) for ``mode``; None where the peer does not exist in this torch.
    The loop and dense peers write into preallocated outputs (``inputs['out']``)."""
    grouped_mm = getattr(torch, "_grouped_mm", None)

    def loop_fwd(i):
        for e, (s, t) in enumerate(bounds):
            if t > s:
                torch.mm(i["x"][s:t], i["w"][e], out=i["out"][s:t])
        return i["out"]

    def loop_dx(i):
        for e, (s, t) in enumerate(bounds):
            if t > s:
                torch.mm(i["dy"][s:t], i["w"][e].T, out=i["out"][s:t])
        return i["out"]

    def loop_dw(i):
        for e, (s, t) in enumerate(bounds):
            torch.mm(i["x"][s:t].T, i["dy"][s:t], out=i["out"][e])  # an empty group writes zeros
        return i["out"]

    table = {
        "fwd": {
            "ours": lambda i: grouped_gemm_fwd(i["x"], i["w"], i["offsets"]),
            "torch_grouped_mm": grouped_mm and (lambda i: grouped_mm(i["x"], i["w"], offs=i["offsets"])),
            "loop": loop_fwd,
            "dense": lambda i: torch.mm(i["x"], i["w"][0], out=i["out"]),
        },
        "dx": {
            "ours": lambda i: grouped_gemm_dx(i["dy"], i["w"], i["offsets"]),
            "torch_grouped_mm": grouped_mm and (lambda i: grouped_mm(i["dy"], i["w"].transpose(1, 2), offs=i["offsets"])),
            "loop": loop_dx,
            "dense": lambda i: torch.mm(i["dy"], i["w"][0].T, out=i["out"]),
        },
        "dw": {
            "ours": lambda i: grouped_gemm_dw(i["x"], i["dy"], i["offsets"]),
            "torch_grouped_mm": grouped_mm and (lambda i: grouped_mm(i["x"].T, i["dy"], offs=i["offsets"])),
            "loop": loop_dw,
            "dense": lambda i: torch.mm(i["x"].T, i["dy"], out=i["out"][0]),
        },
    }
    return table[mode]


class GroupedGemmCase:
    """One (shape, mode, provider) case on rotated inputs; ``call(i)`` runs set i.

    ``shape``: ``{"proj", "E", "K", "N", "T", "top_k", "routing"}`` (the forward weight [E, K, N]);
    ``mode``: ``fwd`` (y = x w), ``dx`` (dy w^T) or ``dw`` (x^T dy per expert). The dense peer
    multiplies all M rows by one ``[K, N]`` matrix: the same FLOPs, no grouping.
    """

    def __init__(self, shape: dict, mode: str, provider: str, *, dtype: torch.dtype = torch.bfloat16,
                 device: str = "cuda"):
        self.shape, self.mode, self.provider, self.dtype = shape, mode, provider, dtype
        self.kernel = MODES[mode]
        tshape = {**{k: shape[k] for k in ("E", "K", "N", "T", "top_k", "routing")},
                  "dtype": next(n for n, d in DTYPES.items() if d == dtype)}
        self.tshape = tshape
        make = {"fwd": make_inputs_fwd, "dx": make_inputs_dx, "dw": make_inputs_dw}[mode]
        M, E, K, N = rows(tshape), shape["E"], shape["K"], shape["N"]
        out_shape = {"fwd": (M, N), "dx": (M, K), "dw": (E, K, N)}[mode]

        def make_set():
            inputs = make(tshape, device)
            inputs["out"] = torch.empty(out_shape, dtype=dtype, device=device)
            return inputs

        # on a CPU (the providers checked through the interpreter) one set, no L2 to defeat
        self.sets = make_rotation(make_set, bytes_moved(tshape), max_sets=4,
                                  l2_bytes=None if device.startswith("cuda") else 0)
        counts = torch.diff(self.sets[0]["offsets"], prepend=self.sets[0]["offsets"].new_zeros(1))
        self.extra = {
            "kernel_source": kernel_source_hash(), "rotation_sets": len(self.sets),
            "max_expert_share": counts.max().item() / max(M, 1), "empty_experts": int((counts == 0).sum().item()),
        }
        # every set has its own routing; the loop peer needs each set's bounds on the host
        self._fns = [_providers(mode, _bounds(s["offsets"]))[provider] for s in self.sets]
        self.fn = self._fns[0]

    @property
    def available(self) -> bool:
        return self.fn is not None

    def call(self, i: int):
        j = i % len(self.sets)
        return self._fns[j](self.sets[j])

    def check(self) -> float | None:
        """Relative error vs the float32 per-expert reference (None for dense: another function)."""
        if self.provider == "dense":
            return None
        inputs = self.sets[0]
        ref = {"fwd": reference_fwd, "dx": reference_dx, "dw": reference_dw}[self.mode](inputs)
        return rel_error(self.call(0), ref)  # float64 a chunk at a time: a MiniMax dW is 3.6e9 elements

    def measure(self) -> Record:
        """Check, then time (CUDA events, median/p20/p80) under a telemetry sampler."""
        timing, telemetry = checked_timing(self)
        config = {}
        if self.provider == "ours":
            key = {"fwd": bucket_fwd, "dx": bucket_dx, "dw": bucket_dw}[self.mode](self.tshape)
            default = default_config_dw(self.tshape) if self.mode == "dw" else default_config_fwd(self.tshape)
            valid = valid_dw_config if self.mode == "dw" else valid_config
            from kernels import _config

            config = _config.lookup_launchable(self.kernel, key, default=default, valid=valid, near=("M",))  # as launched
        flops = gemm_flops(self.shape)
        self.extra["tflop_s"] = tflop_s(flops, timing.median_ms)
        return record_from_timing(
            timing, kernel=self.kernel, provider=self.provider, mode="fwd" if self.mode == "fwd" else "bwd",
            shape=dict(self.shape), dtype=str(self.dtype).removeprefix("torch."), config=config,
            x_name="T", x_value=self.shape["T"], bytes=bytes_moved(self.tshape), flops=flops,
            telemetry=telemetry, extra=dict(self.extra),
        )


class MoeFfnCase:
    """The whole moe_ffn forward (``ours``) vs its two grouped GEMMs alone (``two_gemms``: the
    up projection to 2F on pre-gathered rows and the down projection, no routing, gather,
    SwiGLU or combine). Both do ``2 * M * Hd * 2F + 2 * M * F * Hd`` FLOPs."""

    def __init__(self, shape: dict, provider: str, *, dtype: torch.dtype = torch.bfloat16):
        self.shape, self.provider, self.dtype = shape, provider, dtype
        E, Hd, F, T, k = (shape[n] for n in ("E", "Hd", "F", "T", "top_k"))
        self.w_gate_up = (torch.randn(E, Hd, 2 * F, device="cuda") * Hd**-0.5).to(dtype)
        self.w_down = (torch.randn(E, F, Hd, device="cuda") * F**-0.5).to(dtype)
        self.x = torch.randn(T, Hd, device="cuda").to(dtype)
        self.logits = routing_logits(T, E, shape["routing"], "cuda")
        routing = route(self.logits, k)
        self.offsets = routing.offsets
        self.rows_x = self.x[routing.row_to_token.long()]
        self.rows_h = torch.randn(T * k, F, device="cuda").to(dtype)
        self.extra = {"kernel_source": kernel_source_hash()}

    def call(self, i: int):
        with torch.no_grad():
            if self.provider == "ours":
                return moe_ffn(self.x, self.logits, self.w_gate_up, self.w_down, top_k=self.shape["top_k"])
            grouped_gemm_fwd(self.rows_x, self.w_gate_up, self.offsets)
            return grouped_gemm_fwd(self.rows_h, self.w_down, self.offsets)

    def flops(self) -> int:
        M = self.shape["T"] * self.shape["top_k"]
        return 2 * M * self.shape["Hd"] * 2 * self.shape["F"] + 2 * M * self.shape["F"] * self.shape["Hd"]

    def measure(self) -> Record:
        timing, telemetry = heated_timing(self)
        itemsize = self.dtype.itemsize
        E, Hd, F, T, k = (self.shape[n] for n in ("E", "Hd", "F", "T", "top_k"))
        nbytes = itemsize * (T * Hd * 2 + E * Hd * 2 * F + E * F * Hd) + 4 * T * E  # x, out, weights, logits
        self.extra["tflop_s"] = tflop_s(self.flops(), timing.median_ms)
        return record_from_timing(
            timing, kernel="moe_ffn", provider=self.provider, mode="fwd", shape=dict(self.shape),
            dtype=str(self.dtype).removeprefix("torch."), config={}, x_name="T", x_value=T,
            bytes=nbytes, flops=self.flops(), telemetry=telemetry, extra=dict(self.extra),
        )

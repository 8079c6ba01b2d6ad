"""The lightning attention forward and backward kernels as tunables (registered as
``lightning_attn_fwd`` and ``lightning_attn_bwd``; the decode step is in
:mod:`autotune.lightning_decode`).

Space: chunk length BT, width BV of the slice of E one program owns, num_warps, num_stages.
Pruning before compiling: the kernel's own launch rule (:func:`forward.valid_config`: BV
divides E, dot tiles of at least 16, num_stages >= 2 since triton 3.6 miscompiles one stage)
and a shared-memory estimate against the H100 limit.
Buckets are the kernel's :func:`forward.bucket_key`, so the tuner writes exactly the keys the
kernel looks up. Inputs are random (never zero) with MiniMax slopes of a middle layer; the
reference is the float64 chunked recurrence, fast enough on a GPU at T = 64K.

The backward shares the forward's space, shapes and shared-memory estimate (its passes load
three ``[BT, *]`` tiles per chunk like the forward); its candidates are checked on dq, dk, dv
against float64 autograd through the chunked reference, a group of heads at a time so the
float64 graph stays a few GB at T = 64K, H = 64.
"""
from __future__ import annotations

import torch

from autotune.tunable import Config, Shape, Tunable, parse_shape_text, register
from kernels.lightning_attn import backward, forward, minimax_slopes
from reference.lightning_attn import lightning_attn_chunked_ref

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

SPACE = {
    "BT": [32, 64, 128],
    "BV": [16, 32, 64, 128],
    "num_warps": [4, 8],
    # 5: with TMA loads BT=64 BV=64 fits (sm_90, triton 3.6: 221 KB, 223 registers, no spill)
    "num_stages": [1, 2, 3, 4, 5],
}

# Largest dynamic shared memory one block may opt into on sm_90 (H100): 227 KB. A GPU with
# less fails such candidates at compile time (OutOfResources), which the runner records.
SHARED_MEMORY_LIMIT = 227 * 1024

SHAPE_SETS = {
    # MiniMax-01's lightning layers: 64 heads of 128, bf16, one sequence from 1K to 64K tokens
    "minimax": [{"B": 1, "T": 2**p, "H": 64, "D": 128, "E": 128, "dtype": "bf16"} for p in range(10, 17)],
    # tiny enough for the Triton interpreter (a few seconds per shape on a CPU)
    "small": [
        {"B": 1, "T": 64, "H": 2, "D": 16, "E": 16, "dtype": "bf16"},
        {"B": 1, "T": 100, "H": 1, "D": 32, "E": 32, "dtype": "bf16"},
    ],
}
_SHAPE_FIELDS = ("B", "T", "H", "D", "E", "dtype")


def shared_memory_bytes(config: Config, D: int, E: int, itemsize: int) -> int:
    """Estimated shared memory of one program, in bytes.

    The loads of one chunk, q ``[BT, D]``, k^T ``[D, BT]`` and v ``[BT, BV]``, are buffered
    ``num_stages`` deep (elements of ``itemsize`` bytes), the fp32 ``[BT, BT]`` decayed score
    tile passes through shared memory on its way into the second dot, and the ``[BT, BV]``
    output tile is staged there for its TMA store::

        num_stages * itemsize * (BT*D + D*BT + BT*BV) + 4 * BT*BT + itemsize * BT*BV

    An estimate, not Triton's allocation: it prunes what cannot fit before compiling, and a
    config it lets through that does not fit fails to compile and is recorded as failed.
    """
    BT, BV = config["BT"], config["BV"]
    return config["num_stages"] * itemsize * (BT * D + D * BT + BT * BV) + 4 * BT * BT + itemsize * BT * BV


def is_valid(config: Config, shape: Shape) -> bool:
    """The kernel's launch rule for (D, E) and the shared-memory estimate within the limit."""
    D, E = shape["D"], shape["E"]
    itemsize = DTYPES[shape["dtype"]].itemsize
    return forward.valid_config(config, D, E) and shared_memory_bytes(config, D, E, itemsize) <= SHARED_MEMORY_LIMIT


def bucket(shape: Shape) -> dict:
    """The key the kernel looks up at run time for this shape."""
    return forward.bucket_key(shape["D"], shape["E"], shape["T"], DTYPES[shape["dtype"]])


def make_inputs(shape: Shape, device: str) -> dict:
    """Random q, k, v (standard normal, in the shape's dtype), MiniMax slopes of layer 3 of 8."""
    B, T, H, D, E = (shape[n] for n in ("B", "T", "H", "D", "E"))
    dtype = DTYPES[shape["dtype"]]
    return {
        "q": torch.randn(B, T, H, D, device=device, dtype=dtype),
        "k": torch.randn(B, T, H, D, device=device, dtype=dtype),
        "v": torch.randn(B, T, H, E, device=device, dtype=dtype),
        "slopes": minimax_slopes(H, 3, 8).to(device),
        "scale": D**-0.5,
    }


def run(inputs: dict, config: Config) -> torch.Tensor:
    """One forward launch with ``config``; returns o."""
    o, _ = forward.lightning_attn_fwd(
        inputs["q"], inputs["k"], inputs["v"], inputs["slopes"], inputs["scale"], None, False, None, config=config
    )
    return o


def reference(inputs: dict) -> torch.Tensor:
    """o from the float64 chunked reference."""
    o, _ = lightning_attn_chunked_ref(inputs["q"], inputs["k"], inputs["v"], inputs["slopes"], scale=inputs["scale"])
    return o


def tolerance(shape: Shape) -> float:
    """Relative error bound by dtype (DESIGN.md): 1e-5 for fp32, 1e-2 for bf16 and fp16 operands."""
    return 1e-5 if shape["dtype"] == "fp32" else 1e-2


def bytes_moved(shape: Shape) -> int:
    """q and k read (D each), v read and o written (E each), per token and head; plus the slopes."""
    B, T, H, D, E = (shape[n] for n in ("B", "T", "H", "D", "E"))
    return DTYPES[shape["dtype"]].itemsize * B * T * H * (2 * D + 2 * E) + 4 * H


def default_config(shape: Shape) -> Config:
    """What ``lightning_attn_fwd`` launches when no tuned entry applies."""
    return forward.default_config(shape["D"], shape["E"])


def parse_shape(text: str) -> Shape:
    """``"T=4096,H=64,D=128"`` -> a full shape; B=1, E=D and dtype=bf16 unless given."""
    return parse_shape_text(text, what="lightning", fields=_SHAPE_FIELDS, required=("T", "H", "D"),
                            defaults={"B": 1, "E": lambda given: given["D"], "dtype": "bf16"}, choices={"dtype": DTYPES})


def is_valid_bwd(config: Config, shape: Shape) -> bool:
    """The backward's launch rule, and each pass's shared-memory estimate within the limit
    (the dq pass runs on (D, E), the dk and dv passes with the roles of D and E swapped)."""
    D, E = shape["D"], shape["E"]
    itemsize = DTYPES[shape["dtype"]].itemsize
    return backward.valid_config(config, D, E) and all(
        shared_memory_bytes(backward.pass_config(config, w), d, w, itemsize) <= SHARED_MEMORY_LIMIT
        for d, w in ((D, E), (E, D))
    )


def make_inputs_bwd(shape: Shape, device: str) -> dict:
    """The forward's inputs plus a random output gradient do ``[B, T, H, E]``."""
    inputs = make_inputs(shape, device)
    inputs["do"] = torch.randn_like(inputs["v"])
    return inputs


def run_bwd(inputs: dict, config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One backward with ``config`` (no initial or final state, as in training); (dq, dk, dv)."""
    dq, dk, dv, _ = backward.lightning_attn_bwd(
        inputs["q"], inputs["k"], inputs["v"], inputs["slopes"], inputs["scale"], None, None, inputs["do"], None,
        needs=(True, True, True, False), config=config,
    )
    return dq, dk, dv


REFERENCE_HEADS = 8  # heads per float64 autograd graph in reference_bwd


def reference_bwd(inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in float64 by autograd through the chunked reference, REFERENCE_HEADS
    heads at a time (heads are independent)."""
    q, k, v, do, slopes = (inputs[n] for n in ("q", "k", "v", "do", "slopes"))
    grads = [torch.zeros(x.shape, dtype=torch.float64, device=x.device) for x in (q, k, v)]
    H = q.shape[2]
    with torch.enable_grad():
        for h in range(0, H, REFERENCE_HEADS):
            heads = slice(h, h + REFERENCE_HEADS)
            leaves = [x[:, :, heads].double().requires_grad_() for x in (q, k, v)]
            o, _ = lightning_attn_chunked_ref(*leaves, slopes[heads], scale=inputs["scale"])
            for g, piece in zip(grads, torch.autograd.grad(o, leaves, do[:, :, heads].double())):
                g[:, :, heads] = piece
    return tuple(grads)


def bytes_moved_bwd(shape: Shape) -> int:
    """The backward's floor: q, k, v and do read, dq, dk, dv written (7 tensors)."""
    B, T, H, D, E = (shape[n] for n in ("B", "T", "H", "D", "E"))
    return DTYPES[shape["dtype"]].itemsize * B * T * H * (4 * D + 3 * E) + 4 * H


def default_config_bwd(shape: Shape) -> Config:
    """What ``lightning_attn_bwd`` launches when no tuned entry applies."""
    return backward.default_config(shape["D"], shape["E"])


TUNABLE_BWD = register(
    Tunable(
        name=backward.KERNEL,
        space=SPACE,
        is_valid=is_valid_bwd,
        bucket=bucket,
        make_inputs=make_inputs_bwd,
        run=run_bwd,
        reference=reference_bwd,
        tolerance=tolerance,
        bytes_moved=bytes_moved_bwd,
        default_config=default_config_bwd,
        shape_sets=SHAPE_SETS,
        parse_shape=parse_shape,
        near=("T",),
    )
)

TUNABLE = register(
    Tunable(
        name=forward.KERNEL,
        space=SPACE,
        is_valid=is_valid,
        bucket=bucket,
        make_inputs=make_inputs,
        run=run,
        reference=reference,
        tolerance=tolerance,
        bytes_moved=bytes_moved,
        default_config=default_config,
        shape_sets=SHAPE_SETS,
        parse_shape=parse_shape,
        near=("T",),
    )
)

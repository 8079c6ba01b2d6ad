"""The lightning attention decode step as a tunable (registered as ``lightning_decode``).

Space: a union of two products, one per backend. Triton: the slice width BV and num_warps;
CuPy (CUDA C++ through NVRTC): BV and ROWS, the threads down D per block. The winner of each
batch bucket records its backend, and :func:`kernels.lightning_attn.lightning_decode` launches
whichever it names. Without CuPy the CuPy candidates are pruned before anything launches.

The step updates the state in place, so the inputs keep a pristine copy ``state0`` and
:func:`reset` restores the state before each candidate's reference check; timed calls keep
stepping the state, which stays finite (``|lambda| < 1``).
"""
from __future__ import annotations

import torch

from autotune.lightning import DTYPES
from autotune.tunable import Config, Shape, Tunable, parse_shape_text, register
from kernels.lightning_attn import decode, minimax_slopes
from reference.lightning_attn import lightning_decode_ref

POW2 = [4, 8, 16, 32, 64, 128]
SPACE = [
    {"backend": ["triton"], "BV": POW2, "num_warps": [1, 2, 4, 8]},
    {"backend": ["cupy"], "BV": POW2, "ROWS": [1, 2, 4, 8, 16, 32]},
]

SHAPE_SETS = {
    # MiniMax-01's lightning layers at decode: 64 heads of 128, bf16 tokens, fp32 state
    "minimax": [{"B": B, "H": 64, "D": 128, "E": 128, "dtype": "bf16"} for B in (1, 4, 16, 64, 256)],
    "small": [{"B": 2, "H": 2, "D": 16, "E": 16, "dtype": "bf16"}],
}
_SHAPE_FIELDS = ("B", "H", "D", "E", "dtype")


def is_valid(config: Config, shape: Shape) -> bool:
    """The step's own launch rule for (D, E), which also drops CuPy where it is missing."""
    return decode.valid_config(config, shape["D"], shape["E"])


def bucket(shape: Shape) -> dict:
    """The key the step looks up at run time."""
    return decode.bucket_key(shape["D"], shape["E"], shape["B"])


def make_inputs(shape: Shape, device: str) -> dict:
    """Random q, k ``[B, H, D]``, v ``[B, H, E]`` in the shape's dtype, an fp32 state and its
    pristine copy, MiniMax slopes of layer 3 of 8."""
    B, H, D, E = (shape[n] for n in ("B", "H", "D", "E"))
    dtype = DTYPES[shape["dtype"]]
    state0 = torch.randn(B, H, D, E, device=device)
    return {
        "q": torch.randn(B, H, D, device=device, dtype=dtype),
        "k": torch.randn(B, H, D, device=device, dtype=dtype),
        "v": torch.randn(B, H, E, device=device, dtype=dtype),
        "slopes": minimax_slopes(H, 3, 8).to(device),
        "state0": state0,
        "state": state0.clone(),
        "scale": D**-0.5,
    }


def reset(inputs: dict) -> None:
    """Undo the in-place steps of earlier calls."""
    inputs["state"].copy_(inputs["state0"])


def run(inputs: dict, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """One step with ``config``: (o, the updated state)."""
    return decode.lightning_decode(inputs["q"], inputs["k"], inputs["v"], inputs["slopes"], inputs["state"],
                                   scale=inputs["scale"], config=config)


def reference(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, state) of one step from the pristine state, in float64."""
    return lightning_decode_ref(inputs["q"], inputs["k"], inputs["v"], inputs["slopes"], inputs["state0"].clone(),
                                scale=inputs["scale"])


def tolerance(shape: Shape) -> float:
    """1e-5 for fp32 tokens, 1e-2 for bf16/fp16 (o is rounded to them; the state stays fp32)."""
    return 1e-5 if shape["dtype"] == "fp32" else 1e-2


def bytes_moved(shape: Shape) -> int:
    """The fp32 state read and written once, plus the token's q, k, v and o."""
    B, H, D, E = (shape[n] for n in ("B", "H", "D", "E"))
    return 8 * B * H * D * E + DTYPES[shape["dtype"]].itemsize * B * H * (2 * D + 2 * E)


def default_config(shape: Shape) -> Config:
    """What ``lightning_decode`` launches when no tuned entry applies."""
    return decode.default_config(shape["D"], shape["E"])


def parse_shape(text: str) -> Shape:
    """``"B=16,H=64,D=128"`` -> a full shape; E=D and dtype=bf16 unless given."""
    return parse_shape_text(text, what="decode", fields=_SHAPE_FIELDS, required=("B", "H", "D"),
                            defaults={"E": lambda given: given["D"], "dtype": "bf16"}, choices={"dtype": DTYPES})


TUNABLE = register(
    Tunable(
        name=decode.KERNEL,
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
        near=("B",),
        reset=reset,
    )
)

"""Make the Triton interpreter (``TRITON_INTERPRET=1``, how CI runs every kernel) compute
bfloat16 ``tl.dot`` correctly.

The interpreter stores bfloat16 as raw uint16 bits and its ``create_dot`` multiplies those
bits as integers (triton-lang/triton#11584; upstream says bf16 is unsupported there). We widen
bf16 dot operands to float32 first, which is exact, and leave everything else alone. Compiled
(GPU) kernels are untouched: this only runs when the interpreter is on.
"""
from __future__ import annotations

import os


def _bf16_bits_to_f32(data):
    import numpy as np

    return (data.astype(np.uint32) << 16).view(np.float32)


def patch_bf16_dot() -> bool:
    """Install the fix once; returns whether it is installed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_kwb_bf16", False):
        return True
    create_dot = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_bf16_bits_to_f32(handle.data), tl.float32)
        return handle

    def create_dot_bf16(self, a, b, d, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), d, *args, **kwargs)

    create_dot_bf16._kwb_bf16 = True
    builder.create_dot = create_dot_bf16
    return True

"""Make the Triton interpreter (``TRITON_INTERPRET=1``, how CI runs every kernel) treat
bfloat16 the way compiled kernels do.

The interpreter stores bfloat16 as raw uint16 bits, and

- its ``create_dot`` multiplies those bits as integers (triton-lang/triton#11584; upstream
  says bf16 is unsupported there): we widen bf16 dot operands to float32 first, exactly;
- its float32 -> bfloat16 cast truncates, where compiled kernels round to nearest even,
  which doubles the rounding error of every bf16 intermediate: we round to nearest even.

Compiled (GPU) kernels are untouched: this only runs when the interpreter is on.
"""
from __future__ import annotations

import os


def _bf16_bits_to_f32(bits):
    import numpy as np

    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(values):
    """Round to nearest even; NaN stays a quiet NaN."""
    import numpy as np

    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def patch_bf16() -> bool:
    """Install both fixes once; returns whether they are installed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_kwb_bf16", False):
        return True
    create_dot, cast_impl = builder.create_dot, builder.cast_impl

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_bf16_bits_to_f32(handle.data), tl.float32)
        return handle

    def create_dot_bf16(self, a, b, d, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), d, *args, **kwargs)

    def cast_rne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_f32_to_bf16_bits(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    create_dot_bf16._kwb_bf16 = True
    builder.create_dot = create_dot_bf16
    builder.cast_impl = cast_rne
    return True

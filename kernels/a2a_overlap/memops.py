"""CUDA driver calls torch does not expose, for the flags transport (``flags_exchange.py``):
copies issued by raw pointer and stream memory operations, none of which uses an SM.

- :func:`copy`: ``cuMemcpyAsync`` on a stream. Between two GPUs with peer access it runs on
  a copy engine and completes while a spinning kernel holds every SM; a copy within ONE GPU
  does not (it waited behind the spin on H200s:
  ``results/raw/spin_copy_probe_session11_h200.json``), so the flags transport never issues
  one where a spin could block it.
- :func:`write_value32`: ``cuStreamWriteValue32``: the stream sets a 32-bit word once its
  earlier work is done (an expert's rows have landed: its ``ready`` flag).
- :func:`wait_value32_geq`: ``cuStreamWaitValue32`` (GEQ): later work on the stream waits
  until a 32-bit counter reaches a value (a GEMM's ``done`` count for an expert).

All take tensors (for their device pointers) and a ``torch.cuda.Stream``; errors raise
``RuntimeError`` with the driver's result code.
"""
from __future__ import annotations

import ctypes
import functools

import torch

_WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ
_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT


@functools.lru_cache(maxsize=None)
def _fn(name: str, argtypes: tuple):
    lib = ctypes.CDLL("libcuda.so.1")
    for symbol in (name + "_v2", name):  # the versioned entry point where the driver has one
        if hasattr(lib, symbol):
            f = getattr(lib, symbol)
            f.restype, f.argtypes = ctypes.c_int, list(argtypes)
            return f
    raise RuntimeError(f"libcuda has no {name}")


def _check(name: str, rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"{name} failed: CUresult {rc}")


def _stream(stream: torch.cuda.Stream) -> ctypes.c_void_p:
    return ctypes.c_void_p(stream.cuda_stream)


def copy(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """``dst <- src`` (contiguous, the same byte count; any GPUs the process can address)."""
    if not (dst.is_contiguous() and src.is_contiguous()) or dst.nbytes != src.nbytes:
        raise ValueError(f"memops.copy needs contiguous tensors of equal size, got {dst.nbytes} and {src.nbytes} bytes")
    f = _fn("cuMemcpyAsync", (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p))
    _check("cuMemcpyAsync", f(dst.data_ptr(), src.data_ptr(), dst.nbytes, _stream(stream)))


def write_value32(word: torch.Tensor, value: int, stream: torch.cuda.Stream) -> None:
    """``word`` (one int32 element of device memory) ``= value`` once ``stream``'s earlier work is done."""
    f = _fn("cuStreamWriteValue32", (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint))
    _check("cuStreamWriteValue32", f(_stream(stream), word.data_ptr(), value, _DEFAULT))


def wait_value32_geq(word: torch.Tensor, value: int, stream: torch.cuda.Stream) -> None:
    """``stream``'s later work waits until ``word`` (one int32 element of device memory) ``>= value``."""
    f = _fn("cuStreamWaitValue32", (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint))
    _check("cuStreamWaitValue32", f(_stream(stream), word.data_ptr(), value, _WAIT_GEQ))

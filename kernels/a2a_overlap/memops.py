"""Copies and flags by raw address, for the flags transport (``flags_exchange.py``): CUDA
driver calls torch does not expose, none of which uses an SM, and their host equivalents.

Addresses are ``data_ptr()`` values plus byte offsets: the transport computes every block's
address once and issues each copy with one driver call, no tensor view (a view and a
``copy_`` cost the host several times a driver call, and the issue sits between the count
exchange and the GEMMs' launch).

- :func:`copy`: ``cuMemcpyAsync`` on a stream. Between two GPUs with peer access it runs on
  a copy engine and completes while a spinning kernel holds every SM; a copy within ONE GPU
  does not (it waited behind the spin on H200s:
  ``results/raw/spin_copy_probe_session11_h200.json``), so the flags transport never issues
  one where a spin could block it.
- :func:`write_value32`: ``cuStreamWriteValue32``: the stream sets a 32-bit word once its
  earlier work is done (an expert's rows have landed: its ``ready`` flag).
- :func:`wait_value32_geq`: ``cuStreamWaitValue32`` (GEQ): later work on the stream waits
  until a 32-bit counter reaches a value (a GEMM's ``done`` count for an expert).

``stream=None`` (:func:`copy`, :func:`write_value32`) does the same on the host at once, for
CPU tensors (the gloo tests run the transport's own address arithmetic). Driver errors raise
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


def copy(dst: int, src: int, nbytes: int, stream: torch.cuda.Stream | None) -> None:
    """``nbytes`` from address ``src`` to ``dst`` (any GPUs the process can address), after
    ``stream``'s earlier work; ``stream`` None: host memory, now."""
    if stream is None:
        ctypes.memmove(dst, src, nbytes)
        return
    f = _fn("cuMemcpyAsync", (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p))
    _check("cuMemcpyAsync", f(dst, src, nbytes, ctypes.c_void_p(stream.cuda_stream)))


def write_value32(address: int, value: int, stream: torch.cuda.Stream | None) -> None:
    """The int32 word at ``address`` ``= value`` once ``stream``'s earlier work is done;
    ``stream`` None: host memory, now."""
    if stream is None:
        ctypes.c_int32.from_address(address).value = value
        return
    f = _fn("cuStreamWriteValue32", (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint))
    _check("cuStreamWriteValue32", f(ctypes.c_void_p(stream.cuda_stream), address, value, _DEFAULT))


def wait_value32_geq(address: int, value: int, stream: torch.cuda.Stream) -> None:
    """``stream``'s later work waits until the int32 word at ``address`` (device memory) ``>= value``."""
    f = _fn("cuStreamWaitValue32", (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint))
    _check("cuStreamWaitValue32", f(ctypes.c_void_p(stream.cuda_stream), address, value, _WAIT_GEQ))

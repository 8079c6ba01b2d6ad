"""Host-side TMA descriptors, made where the CUDA context they need is current.

Triton (3.6) encodes a host-side ``TensorDescriptor`` into a CUDA tensor map as it launches the
kernel, before its launcher makes the device's context current. On a thread that has made no
CUDA runtime call yet no context is current, and the encode fails with "Failed to create tensor
map descriptor: invalid device context". autograd runs backward passes on a thread of its own,
and when every allocation there is served from torch's cache nothing has bound the context yet:
on an H100 the lightning backward failed this way inside a benchmark process and passed when
run alone. A stream query (no synchronisation) binds the device's primary context first, once
per thread and device: a thread keeps a current context once it has one.
"""
from __future__ import annotations

import threading

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

_bound = threading.local()  # .devices: the CUDA devices whose context this thread has bound


def tensor_descriptor(t: torch.Tensor, block_shape: list[int], shape: list[int] | None = None,
                      strides: list[int] | None = None) -> TensorDescriptor:
    """A descriptor over ``t`` (or over the view ``shape`` / ``strides`` of its storage, in
    elements) loading and storing ``block_shape`` tiles; binds ``t``'s CUDA context to this
    thread first."""
    if t.is_cuda:
        _bind_context(t.device)
    return TensorDescriptor(t, list(t.shape) if shape is None else shape,
                            list(t.stride()) if strides is None else strides, block_shape)


def _bind_context(device: torch.device) -> None:
    devices = _bound.__dict__.setdefault("devices", set())
    # (a stream being captured into a CUDA graph may not be queried; its thread has a context)
    if device not in devices and not torch.cuda.is_current_stream_capturing():
        torch.cuda.current_stream(device).query()
        devices.add(device)

"""Peer-readable workspaces: one buffer of the same size on every rank of a process group,
which every rank can read (and the copy engines can copy from) directly.

- CUDA (NCCL group): torch symmetric memory (``torch.distributed._symmetric_memory``): the
  peers' buffers are mapped into this process over NVLink; ``barrier`` is a one-CTA kernel on
  the current stream that waits for every rank's matching barrier (signal pads, no host).
  NVLink multicast is not used.
- CPU (gloo group, the tests): one shared-memory file per rank (``/dev/shm``), mapped by
  every rank; ``barrier`` is ``dist.barrier``.

:func:`workspace` keeps one workspace per (group, device) and grows it when a call needs
more: growing is collective, so every rank must ask for the same size in the same call
(``copy_exchange`` computes it from counts every rank knows).
"""
from __future__ import annotations

import os
import uuid

import torch
import torch.distributed as dist

# A rank that waits at a barrier longer than this fails with a device-side error naming the
# barrier (symmetric memory's own timeout): a hung peer does not hang the others forever.
BARRIER_TIMEOUT_MS = 300_000
# Workspaces grow to the next multiple of this, so a slowly growing token count does not
# re-allocate (and re-rendezvous) at every call.
GRANULE_BYTES = 64 * 2**20


class _Workspace:
    """``nbytes`` per rank; ``_bufs[r]`` is rank r's buffer as seen from this process (uint8)."""

    nbytes: int
    _bufs: list[torch.Tensor]

    def rows(self, rank: int, start: int, n: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``[start, start + n)`` of rank's buffer seen as a ``[*, cols]`` matrix of dtype."""
        size = dtype.itemsize
        return self._bufs[rank][start * cols * size:(start + n) * cols * size].view(dtype).view(n, cols)

    def data_ptr(self, rank: int) -> int:
        """The address of rank's buffer in this process (a peer's: mapped here)."""
        return self._bufs[rank].data_ptr()


class _SymmetricWorkspace(_Workspace):
    def __init__(self, nbytes: int, group, device: torch.device):
        import torch.distributed._symmetric_memory as symm

        self.nbytes = nbytes
        buf = symm.empty(nbytes, dtype=torch.uint8, device=device)
        self._handle = symm.rendezvous(buf, group if group is not None else dist.group.WORLD)
        self._bufs = [self._handle.get_buffer(r, (nbytes,), torch.uint8) for r in range(self._handle.world_size)]

    def barrier(self, channel: int) -> None:
        self._handle.barrier(channel=channel, timeout_ms=BARRIER_TIMEOUT_MS)


class _SharedFileWorkspace(_Workspace):
    def __init__(self, nbytes: int, group, device: torch.device):
        self.nbytes, self._group = nbytes, group
        W, rank = dist.get_world_size(group), dist.get_rank(group)
        tag = [uuid.uuid4().hex if rank == 0 else None]
        dist.broadcast_object_list(tag, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        paths = [f"/dev/shm/kwb-ep-{tag[0]}-{r}" for r in range(W)]
        mine = torch.from_file(paths[rank], shared=True, size=nbytes, dtype=torch.uint8)
        try:
            self.barrier(0)  # every file exists
            self._bufs = [mine if r == rank else torch.from_file(p, shared=True, size=nbytes, dtype=torch.uint8)
                          for r, p in enumerate(paths)]
            self.barrier(0)  # every rank has mapped every file: the names can go
        finally:
            os.unlink(paths[rank])  # the mappings outlive the name; a failed rendezvous leaves no file

    def barrier(self, channel: int) -> None:
        try:
            dist.barrier(self._group)
        except RuntimeError as exc:
            raise RuntimeError(f"moe_ffn_ep: copy-transport barrier failed or timed out on rank "
                               f"{dist.get_rank(self._group)} (a peer died or hung): {exc}") from exc


_WORKSPACES: dict[tuple, _Workspace] = {}


def supported(group, device: torch.device) -> str | None:
    """None when the copy transport can run on (group, device), else why not."""
    backend = dist.get_backend(group)
    if device.type == "cuda":
        if backend != "nccl":
            return f"CUDA tensors need an NCCL group for the copy transport, got {backend}"
        try:
            import torch.distributed._symmetric_memory  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the torch build
            return f"torch has no symmetric memory: {exc}"
        return None
    if device.type == "cpu":
        return None if backend == "gloo" and os.path.isdir("/dev/shm") else \
            f"CPU tensors need a gloo group and /dev/shm for the copy transport, got {backend}"
    return f"the copy transport does not run on {device.type}"


def _key(group, device: torch.device) -> tuple:
    return tuple(dist.get_process_group_ranks(group or dist.group.WORLD)), str(device)


def peek(group, device: torch.device, nbytes: int) -> _Workspace | None:
    """The group's current workspace if it holds at least ``nbytes`` (local, no collective)."""
    ws = _WORKSPACES.get(_key(group, device))
    return ws if ws is not None and ws.nbytes >= nbytes else None


def workspace(group, device: torch.device, nbytes: int) -> _Workspace:
    """This rank's handle on the group's workspace of at least ``nbytes`` (collective when it
    has to be created or grown: every rank must pass the same nbytes)."""
    key = _key(group, device)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.nbytes < nbytes:
        size = -(-max(nbytes, 1) // GRANULE_BYTES) * GRANULE_BYTES
        kind = _SymmetricWorkspace if device.type == "cuda" else _SharedFileWorkspace
        if _WORKSPACES.pop(key, None) is not None and device.type == "cuda":
            # work queued into the old buffer (a gather issued before the counts said it is
            # too small) must finish before the buffer is released
            torch.cuda.synchronize(device)
        ws = _WORKSPACES[key] = kind(size, group, device)
    return ws

"""Differentiable uneven all-to-all, split in two autograd Functions so that it can overlap.

``start_exchange(x, send_splits, recv_splits, group)`` issues ``all_to_all_single`` with
``async_op=True`` and returns a :class:`PendingExchange`; ``pending.wait()`` returns the
received rows (an autograd node that waits on the handle). Between the two calls the
caller may compute (the overlap). Backward runs the reverse exchange (the splits swapped):
``_WaitFunction.backward`` starts it, ``_StartFunction.backward`` waits for it.

Collective order: every rank must call ``start_exchange`` the same number of times, in the
same order, with the same ``requires_grad`` status of the exchanged tensor (the backward
collectives are issued by the autograd engine, whose order is a function of the graph
structure only, so identical graphs on all ranks issue identical backward sequences).

Errors: a collective that fails or times out (the process group's ``timeout``, given to
``init_process_group``) is re-raised as a ``RuntimeError`` naming the rank, the exchange
and the splits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _Handle:
    """Shared state of one exchange between its start and wait nodes (fwd and bwd)."""

    __slots__ = ("work", "bwd_work", "bwd_buf", "send_buf", "send_splits", "recv_splits", "group", "name")

    def __init__(self, send_splits, recv_splits, group, name):
        self.send_splits, self.recv_splits, self.group, self.name = send_splits, recv_splits, group, name
        # send_buf keeps the (possibly contiguous-copied) input alive while the op is in flight
        self.work = self.bwd_work = self.bwd_buf = self.send_buf = None


def _issue(out, inp, out_splits, in_splits, group, what):
    try:
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)
    except RuntimeError as exc:  # pragma: no cover - depends on the backend's failure
        raise RuntimeError(f"moe_ffn_ep: {what} failed to start on rank {dist.get_rank(group)}: {exc}") from exc


def _wait(work, what, group):
    try:
        work.wait()
    except RuntimeError as exc:
        raise RuntimeError(
            f"moe_ffn_ep: {what} failed or timed out on rank {dist.get_rank(group)} "
            f"(a peer died, hung, or issued a different sequence of collectives): {exc}"
        ) from exc


class _StartFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle):
        ctx.handle = handle
        out = torch.empty(sum(handle.recv_splits), *x.shape[1:], dtype=x.dtype, device=x.device)
        handle.send_buf = x.contiguous()
        handle.work = _issue(out, handle.send_buf, handle.recv_splits, handle.send_splits, handle.group,
                             f"{handle.name} (forward)")
        return out

    @staticmethod
    def backward(ctx, grad):
        h = ctx.handle
        _wait(h.bwd_work, f"{h.name} (backward)", h.group)
        buf, h.bwd_buf, h.bwd_work, h.send_buf = h.bwd_buf, None, None, None
        return buf, None


class _WaitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, handle):
        ctx.handle = handle
        _wait(handle.work, f"{handle.name} (forward)", handle.group)
        handle.work = handle.send_buf = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        h = ctx.handle
        buf = torch.empty(sum(h.send_splits), *grad.shape[1:], dtype=grad.dtype, device=grad.device)
        h.bwd_buf = buf
        h.send_buf = grad.contiguous()
        h.bwd_work = _issue(buf, h.send_buf, h.send_splits, h.recv_splits, h.group, f"{h.name} (backward)")
        # the gradient of the start node's output; its values are never read (the start
        # node's backward returns the received buffer instead)
        return grad, None


class PendingExchange:
    """An all-to-all in flight; :meth:`wait` returns the received rows (differentiable)."""

    def __init__(self, out, handle):
        self._out, self._handle = out, handle

    def wait(self) -> torch.Tensor:
        return _WaitFunction.apply(self._out, self._handle)


def start_exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, name: str = "all_to_all") -> PendingExchange:
    """Send ``x[sum(send_splits[:r]) : ...]`` to rank r; receive ``recv_splits[r]`` rows from rank r."""
    handle = _Handle(list(send_splits), list(recv_splits), group, name)
    return PendingExchange(_StartFunction.apply(x, handle), handle)


def exchange(x, send_splits, recv_splits, group, name="all_to_all") -> torch.Tensor:
    """Blocking form: ``start_exchange(...).wait()``."""
    return start_exchange(x, send_splits, recv_splits, group, name).wait()

"""Collectives over any process group: the raw calls (in one place, counted) and differentiable ones.

Raw collectives (no autograd; used inside the loss modes' own backward passes):

* ``all_gather(tensors, group)``: each tensor (same shape on every rank) -> its copies from every rank,
  concatenated along dim 0 in group-rank order.
* ``reduce_scatter(tensors, group)``: each tensor (``world * rows`` rows) -> the sum over ranks of this
  rank's block of rows.
* ``all_reduce(tensor, group, op)``: in place, returns the tensor.
* ``ring_exchange_async(tensors, group)``: sends each tensor to the next group rank and receives
  same-shaped tensors from the previous one; ``.wait()`` returns the received list.

They go through ``m2kernels.distributed.coalesced`` (the compiled extension where built, else its
pure-Python path; ``route_through_coalesced(False)`` calls torch.distributed directly instead, with
identical results). Every call is recorded by the active :class:`CommCounter` contexts, with the
bytes this rank sends and receives under a bandwidth-optimal (ring) implementation:
all-gather and reduce-scatter of ``n`` bytes per rank move ``(W-1) n`` bytes each way; an all-reduce
of ``n`` bytes moves ``2 (W-1) n / W`` each way; a ring exchange moves ``n`` each way. ``comm_bytes``
in ``m2kernels.distributed.loss`` gives the same numbers in closed form.

Differentiable collectives (small autograd.Functions with an explicit backward, after xformers'
``differentiable_collectives``): :func:`all_gather_with_grad` (backward: reduce-scatter),
:func:`reduce_scatter_with_grad` (backward: all-gather), :func:`all_reduce_with_grad` (backward:
all-reduce of the gradients), :func:`ring_shift` (send to the next rank; backward: send the gradient
to the previous one).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------------
# Byte counting
# --------------------------------------------------------------------------------------------------


@dataclass
class CommCounter:
    """Counts the bytes this rank sends and receives in the raw collectives while active.

    ``with CommCounter() as c: ...`` then ``c.sent``, ``c.received`` (bytes) and ``c.calls`` (a list
    of ``(kind, bytes_sent, bytes_received)``).
    """

    sent: float = 0.0
    received: float = 0.0
    calls: list = field(default_factory=list)

    def record(self, kind: str, sent: float, received: float) -> None:
        self.sent += sent
        self.received += received
        self.calls.append((kind, sent, received))

    def __enter__(self):
        _COUNTERS.append(self)
        return self

    def __exit__(self, *exc):
        _COUNTERS.remove(self)
        return False


_COUNTERS: list[CommCounter] = []
_LOCK = threading.Lock()


def _record(kind: str, sent: float, received: float) -> None:
    if _COUNTERS:
        with _LOCK:
            for c in _COUNTERS:
                c.record(kind, sent, received)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _size(group) -> int:
    return dist.get_world_size(group)


# --------------------------------------------------------------------------------------------------
# Raw collectives: the only place where torch.distributed is called for data
# --------------------------------------------------------------------------------------------------


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


_USE_COALESCED = [True]


@contextlib.contextmanager
def route_through_coalesced(enabled: bool):
    """Route the raw collectives through ``m2kernels.distributed.coalesced`` (the default: the compiled
    extension where it is built, its pure-Python path otherwise) or straight to torch.distributed.
    Both give identical results; every rank must choose the same."""
    old = _USE_COALESCED[0]
    _USE_COALESCED[0] = bool(enabled)
    try:
        yield
    finally:
        _USE_COALESCED[0] = old


def _coalesced():
    if not _USE_COALESCED[0]:
        return None
    from m2kernels.distributed import coalesced

    return coalesced


def all_gather(tensors: Sequence[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Concatenate each tensor's copies from every rank of ``group`` along dim 0 (rank order)."""
    w = _size(group)
    co = _coalesced()
    if co is not None and w > 1:
        tensors = [t.contiguous() for t in tensors]
        for t in tensors:
            _record("all_gather", (w - 1) * _nbytes(t), (w - 1) * _nbytes(t))
        return [o.detach() for o in co.all_gather_coalesced(tensors, group, check=False)]
    outs = []
    for t in tensors:
        t = t.contiguous()
        if w == 1:
            outs.append(t.clone())
            continue
        out = torch.empty((w * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        _all_gather_single(out, t, group=group)
        _record("all_gather", (w - 1) * _nbytes(t), (w - 1) * _nbytes(t))
        outs.append(out)
    return outs




def reduce_scatter(tensors: Sequence[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Sum each tensor over the ranks of ``group`` and keep this rank's block of ``rows / W`` rows."""
    w = _size(group)
    for t in tensors:
        if t.shape[0] % w:
            raise ValueError(f"reduce_scatter needs a multiple of {w} rows, got {tuple(t.shape)}")
    co = _coalesced()
    if co is not None and w > 1:
        outs = []
        for t in tensors:  # one call per tensor: the coalesced sum needs a single dtype
            t = t.contiguous()
            _record("reduce_scatter", (w - 1) * _nbytes(t) / w, (w - 1) * _nbytes(t) / w)
            outs.append(co.reduce_scatter_coalesced([t], group, check=False)[0].detach())
        return outs
    outs = []
    for t in tensors:
        t = t.contiguous()
        if w == 1:
            outs.append(t.clone())
            continue
        out = torch.empty((t.shape[0] // w, *t.shape[1:]), dtype=t.dtype, device=t.device)
        _reduce_scatter_single(out, t, group=group)
        _record("reduce_scatter", (w - 1) * _nbytes(out), (w - 1) * _nbytes(out))
        outs.append(out)
    return outs


def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over ``group``; returns the tensor."""
    w = _size(group)
    if w > 1:
        dist.all_reduce(tensor, op=op, group=group)
        _record("all_reduce", 2 * (w - 1) * _nbytes(tensor) / w, 2 * (w - 1) * _nbytes(tensor) / w)
    return tensor


class _RingHandle:
    def __init__(self, works, received):
        self._works = works
        self._received = received

    def wait(self) -> list[torch.Tensor]:
        for w in self._works:
            w.wait()
        self._works = []
        return self._received


def ring_exchange_async(tensors: Sequence[torch.Tensor], group=None, reverse: bool = False) -> _RingHandle:
    """Start sending each tensor to the next rank of ``group`` (the previous with ``reverse``) and
    receiving same-shaped tensors from the previous (next) one; ``.wait()`` returns the received ones."""
    w = _size(group)
    tensors = [t.contiguous() for t in tensors]
    if w == 1:
        return _RingHandle([], [t.clone() for t in tensors])
    co = _coalesced()
    if co is not None and not reverse:
        for t in tensors:
            _record("ring_exchange", _nbytes(t), _nbytes(t))
        return co.ring_exchange_async(tensors, group, check=False)
    me = dist.get_rank(group)
    step = -1 if reverse else 1
    dst, src = (me + step) % w, (me - step) % w
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, received):
        if t.numel() == 0:
            continue
        ops.append(dist.P2POp(dist.isend, t, group=group, group_peer=dst))
        ops.append(dist.P2POp(dist.irecv, r, group=group, group_peer=src))
        _record("ring_exchange", _nbytes(t), _nbytes(t))
    works = dist.batch_isend_irecv(ops) if ops else []
    return _RingHandle(works, received)


def ring_exchange(tensors: Sequence[torch.Tensor], group=None, reverse: bool = False) -> list[torch.Tensor]:
    """Blocking :func:`ring_exchange_async`."""
    return ring_exchange_async(tensors, group, reverse).wait()


# --------------------------------------------------------------------------------------------------
# Differentiable collectives
# --------------------------------------------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        w = _size(group)
        if sizes is None:
            return all_gather([x], group)[0]
        rows = max(sizes)
        padded = x.new_zeros((rows, *x.shape[1:]))
        padded[:x.shape[0]] = x
        full = all_gather([padded], group)[0]
        return torch.cat([full[q * rows:q * rows + sizes[q]] for q in range(w)])

    @staticmethod
    def backward(ctx, grad):
        group, sizes = ctx.group, ctx.sizes
        w = _size(group)
        if sizes is None:
            return reduce_scatter([grad], group)[0], None, None
        rows = max(sizes)
        padded = grad.new_zeros((w * rows, *grad.shape[1:]))
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        for q in range(w):
            padded[q * rows:q * rows + sizes[q]] = grad[offsets[q]:offsets[q + 1]]
        out = reduce_scatter([padded], group)[0]
        return out[:sizes[dist.get_rank(group)]], None, None


def all_gather_with_grad(x: torch.Tensor, group=None, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """All-gather along dim 0 whose backward reduce-scatters (sums) the gradient back to the owners.

    ``sizes``: the number of rows on every rank, when they differ (padded on the wire).
    """
    return _AllGather.apply(x, group, None if sizes is None else tuple(int(s) for s in sizes))


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter([x], group)[0]

    @staticmethod
    def backward(ctx, grad):
        return all_gather([grad], ctx.group)[0], None


def reduce_scatter_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Reduce-scatter (sum) along dim 0 whose backward all-gathers the gradient."""
    return _ReduceScatter.apply(x, group)


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.group), None


def all_reduce_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks; backward: the sum over ranks of the upstream gradients."""
    return _AllReduce.apply(x, group)


class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return ring_exchange([x], group)[0]

    @staticmethod
    def backward(ctx, grad):
        return ring_exchange([grad], ctx.group, reverse=True)[0], None


def ring_shift(x: torch.Tensor, group=None) -> torch.Tensor:
    """Send ``x`` to the next rank, return the previous rank's (same shape on every rank).

    Backward runs the other way: the gradient goes back to the rank the tensor came from.
    """
    return _RingShift.apply(x, group)

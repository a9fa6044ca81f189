"""Collectives over any process group: coalesced, counted, and differentiable where a loss needs it.

One module for every collective the library issues. Each call takes a list of tensors and moves them
in one collective (one flat buffer; a reduce-scatter needs one per dtype):

* ``all_gather_coalesced(tensors, group)``: each tensor's copies from every rank, concatenated along
  dim 0 in group-rank order. Differentiable: the backward reduce-scatters (sums) the gradients.
* ``reduce_scatter_coalesced(tensors, group)``: each tensor (``world * rows`` rows) summed over the
  ranks; this rank's block of rows. Differentiable: the backward all-gathers.
* ``ring_exchange_async(tensors, group, reverse=False)`` / ``ring_exchange``: send to group rank + 1
  (rank - 1 with ``reverse``), receive from the other side; ``.wait()`` on the one handle type,
  :class:`RingExchangeHandle`. Not differentiable.
* ``all_reduce(tensor, group, op)``: in place.

The path is chosen once, at import: the compiled ``torch.ops.m2kernels.*`` ops (csrc/, loaded by
``m2kernels._ext``; real dispatcher ops that torch.compile traces, NCCL-native on CUDA where built) or
the same buffer layout over torch.distributed in Python, with identical results. ``M2_DISABLE_EXT=1``
selects the Python path; an extension that is absent or built for another torch gives one warning and
the Python path. ``use_extension=`` on a call overrides the choice (tests and benchmarks compare both).

Every collective passes through :func:`_record`, which :class:`CommCounter` contexts observe: the bytes
of the buffers actually handed to the collective, as a bandwidth-optimal (ring) implementation moves
them (an all-gather or reduce-scatter of n bytes per rank moves (W-1) n each way; an all-reduce
2 (W-1) n / W; a ring step n).

With ``check=True`` (``M2_CHECK_COLLECTIVES=0`` changes the default to False) one small all-gather of a
signature (tensor count, element total, a hash of shapes and dtypes) runs first, so ranks that
disagree get a ValueError naming them instead of a hang or garbage. The loss modes pass
``check=False``: their shapes are agreed once per call by ``m2kernels.distributed.agreement``.

Differentiable helpers on top, each a small autograd Function or built on the two above:
:func:`all_gather_with_grad` (uneven shards allowed), :func:`reduce_scatter_with_grad`,
:func:`all_reduce_with_grad`, :func:`ring_shift`, :func:`mean_grad` (identity whose gradient is
averaged over the group).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from m2kernels import _ext

__all__ = [
    "CommCounter", "RingExchangeHandle", "USE_EXTENSION", "all_gather_coalesced", "all_gather_with_grad",
    "all_reduce", "all_reduce_with_grad", "mean_grad", "reduce_scatter_coalesced", "reduce_scatter_with_grad",
    "ring_exchange", "ring_exchange_async", "ring_shift", "using_extension",
]


def _decide_extension() -> bool:
    if _ext.disabled():
        return False
    loaded = _ext.load()  # one RuntimeWarning when the library is absent or does not match torch
    if loaded:
        _register_autograd()
    return loaded


# --------------------------------------------------------------------------------------------------
# Byte counting
# --------------------------------------------------------------------------------------------------


@dataclass
class CommCounter:
    """Counts the bytes this rank sends and receives in collectives while active.

    ``with CommCounter() as c: ...`` then ``c.sent``, ``c.received`` (bytes) and ``c.calls`` (a list of
    ``(kind, bytes_sent, bytes_received)``).
    """

    sent: float = 0.0
    received: float = 0.0
    calls: list = field(default_factory=list)

    def record(self, kind: str, sent: float, received: float) -> None:
        self.sent += sent
        self.received += received
        self.calls.append((kind, sent, received))

    def __enter__(self):
        with _LOCK:
            _COUNTERS.append(self)
        return self

    def __exit__(self, *exc):
        with _LOCK:
            _COUNTERS.remove(self)
        return False


_COUNTERS: list[CommCounter] = []
_LOCK = threading.Lock()


def _record(kind: str, nbytes: int, world: int) -> None:
    """Account one collective on a buffer of ``nbytes`` bytes per rank (see the module docs)."""
    if not _COUNTERS or world == 1:
        return
    moved = {"all_gather": (world - 1) * nbytes, "reduce_scatter": (world - 1) * nbytes / world,
             "all_reduce": 2 * (world - 1) * nbytes / world, "ring_exchange": nbytes}[kind]
    with _LOCK:
        for c in _COUNTERS:
            c.record(kind, moved, moved)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _resolve_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("m2kernels collectives need torch.distributed to be initialised "
                           "(torch.distributed.init_process_group)")
    return dist.group.WORLD if group is None else group


def _validate(tensors, op: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{op}: expected a list of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{op}: expected a non-empty list of tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: element {i} is a {type(t).__name__}, not a torch.Tensor")
        if t.dim() == 0:
            raise ValueError(f"{op}: tensor {i} is 0-dimensional; every tensor needs a dim 0 to "
                             "concatenate or split along")
        if t.device != tensors[0].device:
            raise ValueError(f"{op}: tensor {i} is on {t.device} but tensor 0 is on {tensors[0].device}")
    return tensors


def _check_default(check: Optional[bool]) -> bool:
    if check is not None:
        return check
    return os.environ.get("M2_CHECK_COLLECTIVES", "1").strip().lower() not in ("0", "false", "no", "off")


def _check_ranks_agree(tensors: list[torch.Tensor], group, op: str) -> None:
    """One small all-gather of (count, numel total, hash of shapes+dtypes); ValueError on mismatch."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    desc = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in tensors)
    device = tensors[0].device  # CPU tensors over gloo, CUDA tensors over NCCL
    sig = torch.tensor([len(tensors), sum(t.numel() for t in tensors), zlib.crc32(desc.encode())],
                       dtype=torch.int64, device=device)
    everyone = torch.empty(world * 3, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(everyone, sig, group=group)
    everyone = everyone.view(world, 3).cpu()
    mine = dist.get_rank(group)
    bad = [r for r in range(world) if not torch.equal(everyone[r], everyone[mine])]
    if bad:
        rows = {r: everyone[r].tolist() for r in sorted({mine, *bad})}
        raise ValueError(
            f"{op}: ranks of the group disagree on the tensors passed (every rank must pass the same "
            f"number of tensors with equal shapes and dtypes). This rank ({mine}) passes {desc}; "
            f"[count, total elements, shape/dtype hash] per group rank: {rows}")


def using_extension(use_extension: Optional[bool] = None) -> bool:
    """Whether a call with this ``use_extension`` argument goes through the compiled extension."""
    if use_extension is None:
        return USE_EXTENSION
    if use_extension and not USE_EXTENSION:
        raise RuntimeError(f"m2kernels: use_extension=True but the extension is unavailable: "
                           f"{_ext.status()['_C'].reason}")
    return bool(use_extension)


# --------------------------------------------------------------------------------------------------
# The Python path (same flat-buffer layout as csrc/collectives.cpp)
# --------------------------------------------------------------------------------------------------


def _pack_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors])


def _unpack_bytes(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, off = [], 0
    for t in like:
        o = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        nb = t.numel() * t.element_size()
        if nb:
            o.view(-1).view(torch.uint8).copy_(flat[off:off + nb])
        off += nb
        out.append(o)
    return out


def _py_all_gather(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    world = dist.get_world_size(group)
    flat = _pack_bytes(tensors)
    n = flat.numel()
    gathered = torch.empty(world * n, dtype=torch.uint8, device=flat.device)
    if world == 1:
        gathered.copy_(flat)
    elif n:
        dist.all_gather_into_tensor(gathered, flat, group=group)
    rows = gathered.view(world, n)
    out, off = [], 0
    for t in tensors:
        o = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        nb = t.numel() * t.element_size()
        if nb:
            o.view(-1).view(torch.uint8).view(world, nb).copy_(rows[:, off:off + nb])
        off += nb
        out.append(o)
    return out


def _py_reduce_scatter(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """One collective for tensors of one dtype."""
    world = dist.get_world_size(group)
    flat = torch.cat([t.detach().contiguous().view(world, t.numel() // world) for t in tensors], dim=1)
    flat = flat.reshape(-1)
    chunk = flat.numel() // world
    reduced = torch.empty(chunk, dtype=flat.dtype, device=flat.device)
    if world == 1:
        reduced.copy_(flat)
    elif chunk:
        dist.reduce_scatter_tensor(reduced, flat, op=dist.ReduceOp.SUM, group=group)
    out, off = [], 0
    for t in tensors:
        c = t.numel() // world
        out.append(reduced[off:off + c].view(t.shape[0] // world, *t.shape[1:]).clone())
        off += c
    return out


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices grouped by dtype in first-appearance order (the same on every rank; a set's is not)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values())


def _metas(outputs) -> list[tuple]:
    return [(o.shape, o.dtype, o.device) for o in outputs]


def _zeros_for_none(grads, metas) -> list[torch.Tensor]:
    return [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads, metas)]


class _PyCollective(torch.autograd.Function):
    """The Python path's all-gather / reduce-scatter; each one's backward is the other."""

    @staticmethod
    def forward(ctx, kind, group, *tensors):
        ctx.kind, ctx.group = kind, group
        run = _py_all_gather if kind == "all_gather" else _py_reduce_scatter
        out = tuple(run(list(tensors), group))
        ctx.metas = _metas(out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        grads = _zeros_for_none(grads, ctx.metas)
        other = reduce_scatter_coalesced if ctx.kind == "all_gather" else all_gather_coalesced
        return (None, None, *other(grads, ctx.group, check=False, use_extension=False))


# The extension ops' autograd formulas: the same two backward rules, through the compiled ops (so that
# torch.compile traces them).

def _setup_meta(ctx, inputs, output):
    ctx.group_name = inputs[1]
    ctx.metas = _metas(output)


def _ext_all_gather_backward(ctx, grads):
    grads = _zeros_for_none(grads, ctx.metas)
    out: list = [None] * len(grads)
    for idxs in _by_dtype(grads):
        for i, r in zip(idxs, torch.ops.m2kernels.reduce_scatter_coalesced([grads[i] for i in idxs],
                                                                            ctx.group_name)):
            out[i] = r
    return out, None


def _ext_reduce_scatter_backward(ctx, grads):
    grads = _zeros_for_none(grads, ctx.metas)
    return list(torch.ops.m2kernels.all_gather_coalesced(grads, ctx.group_name)), None


def _register_autograd() -> None:
    torch.library.register_autograd("m2kernels::all_gather_coalesced", _ext_all_gather_backward,
                                    setup_context=_setup_meta)
    torch.library.register_autograd("m2kernels::reduce_scatter_coalesced", _ext_reduce_scatter_backward,
                                    setup_context=_setup_meta)


# --------------------------------------------------------------------------------------------------
# The collectives
# --------------------------------------------------------------------------------------------------


def all_gather_coalesced(tensors: Sequence[torch.Tensor], group=None, *, check: Optional[bool] = None,
                         use_extension: Optional[bool] = None) -> list[torch.Tensor]:
    """Gathers every tensor from every rank of ``group`` in one collective.

    Output ``i`` is the concatenation along dim 0 of all ranks' ``tensors[i]`` in group-rank order
    (shape ``(world * n_i, ...)``). Differentiable: each rank receives the sum over ranks of the
    gradient of its own rows.
    """
    tensors = _validate(tensors, "all_gather_coalesced")
    group = _resolve_group(group)
    world = dist.get_world_size(group)
    if _check_default(check):
        _check_ranks_agree(tensors, group, "all_gather_coalesced")
    _record("all_gather", sum(t.numel() * t.element_size() for t in tensors), world)
    if using_extension(use_extension):
        return list(torch.ops.m2kernels.all_gather_coalesced(tensors, group.group_name))
    return list(_PyCollective.apply("all_gather", group, *tensors))


def reduce_scatter_coalesced(tensors: Sequence[torch.Tensor], group=None, *, check: Optional[bool] = None,
                             use_extension: Optional[bool] = None) -> list[torch.Tensor]:
    """Sums every tensor over the ranks of ``group`` and returns this rank's dim-0 block of each.

    ``tensors[i]`` has ``world * n_i`` rows; output ``i`` is rows ``[rank * n_i, (rank + 1) * n_i)`` of
    the sum over ranks. One collective per dtype present (a sum needs one dtype per buffer).
    Differentiable (backward = all-gather).
    """
    tensors = _validate(tensors, "reduce_scatter_coalesced")
    group = _resolve_group(group)
    world = dist.get_world_size(group)
    for i, t in enumerate(tensors):
        if t.shape[0] % world:
            raise ValueError(f"reduce_scatter_coalesced: tensor {i} has {t.shape[0]} rows, which is not "
                             f"divisible by the group size {world}")
    if _check_default(check):
        _check_ranks_agree(tensors, group, "reduce_scatter_coalesced")
    ext = using_extension(use_extension)
    out: list = [None] * len(tensors)
    for idxs in _by_dtype(tensors):
        part = [tensors[i] for i in idxs]
        _record("reduce_scatter", sum(t.numel() * t.element_size() for t in part), world)
        reduced = (torch.ops.m2kernels.reduce_scatter_coalesced(part, group.group_name) if ext
                   else _PyCollective.apply("reduce_scatter", group, *part))
        for i, r in zip(idxs, reduced):
            out[i] = r
    return out


def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over ``group``; returns the tensor."""
    group = _resolve_group(group)
    world = dist.get_world_size(group)
    if world > 1:
        _record("all_reduce", tensor.numel() * tensor.element_size(), world)
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class RingExchangeHandle:
    """A ring step in flight; :meth:`wait` returns the tensors received."""

    def __init__(self, wait_fn):
        self._wait_fn = wait_fn
        self._result: Optional[list[torch.Tensor]] = None

    def wait(self) -> list[torch.Tensor]:
        if self._result is None:
            self._result = self._wait_fn()
            self._wait_fn = None
        return self._result

    def is_completed(self) -> bool:
        return self._result is not None


def ring_exchange_async(tensors: Sequence[torch.Tensor], group=None, *, reverse: bool = False,
                        check: Optional[bool] = None,
                        use_extension: Optional[bool] = None) -> RingExchangeHandle:
    """Starts one ring step: sends every tensor to group rank + 1 and receives from rank - 1
    (``reverse=True``: to rank - 1, from rank + 1). Returns at once; compute overlaps until
    ``handle.wait()``, which returns tensors with the shapes and dtypes of the sent ones."""
    tensors = [t.detach() for t in _validate(tensors, "ring_exchange")]
    group = _resolve_group(group)
    world = dist.get_world_size(group)
    if _check_default(check):
        _check_ranks_agree(tensors, group, "ring_exchange")
    shift = -1 if reverse else 1
    _record("ring_exchange", sum(t.numel() * t.element_size() for t in tensors), world)
    if using_extension(use_extension):
        recv, send = torch.ops.m2kernels.ring_exchange_start(tensors, group.group_name, shift)

        def wait_ext():
            torch.ops._c10d_functional.wait_tensor(send)
            torch.ops._c10d_functional.wait_tensor(recv)
            return _unpack_bytes(recv, tensors)

        return RingExchangeHandle(wait_ext)

    send = _pack_bytes(tensors)
    recv = torch.empty_like(send)
    works = []
    if world == 1 or send.numel() == 0:
        recv.copy_(send)
    else:
        rank = dist.get_rank(group)
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, send, group=group, group_peer=(rank + shift) % world),
            dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - shift) % world),
        ])

    def wait_py():
        for w in works:
            w.wait()
        del works[:]
        assert send.numel() == recv.numel()  # the closure keeps the send buffer alive until here
        return _unpack_bytes(recv, tensors)

    return RingExchangeHandle(wait_py)


def ring_exchange(tensors: Sequence[torch.Tensor], group=None, *, reverse: bool = False,
                  check: Optional[bool] = None, use_extension: Optional[bool] = None) -> list[torch.Tensor]:
    """One blocking ring step (see :func:`ring_exchange_async`)."""
    if using_extension(use_extension):
        tensors = [t.detach() for t in _validate(tensors, "ring_exchange")]
        group = _resolve_group(group)
        if _check_default(check):
            _check_ranks_agree(tensors, group, "ring_exchange")
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        _record("ring_exchange", nbytes, dist.get_world_size(group))
        return list(torch.ops.m2kernels.ring_exchange(tensors, group.group_name, -1 if reverse else 1))
    return ring_exchange_async(tensors, group, reverse=reverse, check=check, use_extension=False).wait()


# --------------------------------------------------------------------------------------------------
# Raw (non-differentiable) forms used inside the loss modes' own autograd Functions
# --------------------------------------------------------------------------------------------------


def gather(tensors: Sequence[torch.Tensor], group) -> list[torch.Tensor]:
    """``all_gather_coalesced`` of detached tensors (shapes already agreed: no check)."""
    return all_gather_coalesced([t.detach() for t in tensors], group, check=False)


def scatter_sum(tensors: Sequence[torch.Tensor], group) -> list[torch.Tensor]:
    """``reduce_scatter_coalesced`` of detached tensors (shapes already agreed: no check)."""
    return reduce_scatter_coalesced([t.detach() for t in tensors], group, check=False)


def ring_start(tensors: Sequence[torch.Tensor], group, reverse: bool = False) -> RingExchangeHandle:
    return ring_exchange_async(tensors, group, reverse=reverse, check=False)


# --------------------------------------------------------------------------------------------------
# Differentiable helpers
# --------------------------------------------------------------------------------------------------


def all_gather_with_grad(x: torch.Tensor, group=None, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """All-gather along dim 0 whose backward reduce-scatters (sums) the gradient back to the owners.

    ``sizes``: the number of rows on every rank, when they differ (padded on the wire).
    """
    group = _resolve_group(group)
    if sizes is None:
        return all_gather_coalesced([x], group, check=False)[0]
    sizes = [int(s) for s in sizes]
    rows = max(sizes)
    padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))
    full = all_gather_coalesced([padded], group, check=False)[0]
    return torch.cat([full[q * rows:q * rows + s] for q, s in enumerate(sizes)])


def reduce_scatter_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Reduce-scatter (sum) along dim 0 whose backward all-gathers the gradient."""
    return reduce_scatter_coalesced([x], group, check=False)[0]


class _SumOverRanksGrad(torch.autograd.Function):
    """Backward: the sum over ranks of the gradients (times ``grad_factor``). Forward: the sum over
    ranks (``all_reduce_with_grad``) or the identity (``mean_grad``)."""

    @staticmethod
    def forward(ctx, x, group, reduce_forward: bool, grad_factor: float):
        ctx.group, ctx.factor = group, grad_factor
        return all_reduce(x.clone(), group) if reduce_forward else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.group) * ctx.factor, None, None, None


def all_reduce_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks; backward: the sum over ranks of the upstream gradients."""
    return _SumOverRanksGrad.apply(x, _resolve_group(group), True, 1.0)


def mean_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity whose gradient is the mean over the ranks of ``group`` of the ranks' gradients."""
    group = _resolve_group(group)
    return _SumOverRanksGrad.apply(x, group, False, 1.0 / dist.get_world_size(group))


class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return ring_exchange([x], group, check=False)[0]

    @staticmethod
    def backward(ctx, grad):
        return ring_exchange([grad], ctx.group, reverse=True, check=False)[0], None


def ring_shift(x: torch.Tensor, group=None) -> torch.Tensor:
    """Send ``x`` to the next rank, return the previous rank's (same shape on every rank).

    Backward runs the other way: the gradient goes back to the rank the tensor came from.
    """
    return _RingShift.apply(x, _resolve_group(group))


# Decided once: the compiled extension where it loads, else the Python path (one warning).
USE_EXTENSION: bool = _decide_extension()

"""Coalesced collectives for the distributed loss: several tensors, one collective per call.

Two interchangeable paths with identical results:

- the compiled ``torch.ops.m2kernels.*`` ops (csrc/, loaded by :mod:`m2kernels._ext`): real dispatcher
  ops that torch.compile traces, NCCL-native on CUDA where ``_C_nccl`` is built;
- pure Python over torch.distributed (one flat buffer, one ``all_gather_single`` /
  ``reduce_scatter_single`` / ``batch_isend_irecv`` per call).

``M2_DISABLE_EXT=1`` (or ``use_extension=False``) forces the Python path.

Every rank must pass the same number of tensors with the same shapes and dtypes, in the same order.
With ``check=True`` (the default; ``M2_CHECK_COLLECTIVES=0`` changes the default) one tiny all-gather of
a signature (count, element total, hash of shapes and dtypes) runs first, so a disagreement raises a
ValueError naming the ranks on every rank instead of a hang or silent garbage. Pass ``check=False``
in a hot loop once the shapes are known to agree (and inside torch.compile'd code).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import _ext

__all__ = [
    "RingExchangeHandle",
    "all_gather_coalesced",
    "reduce_scatter_coalesced",
    "ring_exchange",
    "ring_exchange_async",
    "using_extension",
]


def using_extension(use_extension: bool | None = None) -> bool:
    """True when the calls below go through the compiled extension."""
    if use_extension is False or _ext.disabled():
        return False
    loaded = _ext.load()
    if use_extension and not loaded:
        raise RuntimeError(f"m2kernels: use_extension=True but the extension is unavailable: "
                           f"{_ext.status()['_C'].reason}")
    return loaded


# ---------------------------------------------------------------------------------------------
# validation


def _resolve_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("m2kernels collectives need torch.distributed to be initialised "
                           "(torch.distributed.init_process_group)")
    return dist.group.WORLD if group is None else group


def _validate(tensors, op: str, same_dtype: bool) -> list[torch.Tensor]:
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
        if same_dtype and t.dtype != tensors[0].dtype:
            raise TypeError(f"{op}: tensor {i} has dtype {t.dtype} but tensor 0 has {tensors[0].dtype}; "
                            "the summing collective needs one dtype")
    return tensors


def _check_default(check: bool | None) -> bool:
    if check is not None:
        return check
    return os.environ.get("M2_CHECK_COLLECTIVES", "1").strip().lower() not in ("0", "false", "no", "off")


def _check_ranks_agree(tensors: list[torch.Tensor], group, op: str) -> None:
    """One small all-gather of (count, numel total, hash of shapes+dtypes); ValueError on mismatch."""
    desc = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in tensors)
    world = dist.get_world_size(group)
    if world == 1:
        return
    # The signature travels on the tensors' device, except over gloo (CPU collectives).
    device = torch.device("cpu") if dist.get_backend(group) == "gloo" else tensors[0].device
    sig = torch.tensor([len(tensors), sum(t.numel() for t in tensors), zlib.crc32(desc.encode())],
                       dtype=torch.int64, device=device)
    everyone = torch.empty(world * 3, dtype=torch.int64, device=sig.device)
    dist.all_gather_single(everyone, sig, group=group)
    everyone = everyone.view(world, 3).cpu()
    mine = dist.get_rank(group)
    bad = [r for r in range(world) if not torch.equal(everyone[r], everyone[mine])]
    if bad:
        rows = {r: everyone[r].tolist() for r in sorted({mine, *bad})}
        raise ValueError(
            f"{op}: ranks of the group disagree on the tensors passed (every rank must pass the same "
            f"number of tensors with equal shapes and dtypes). This rank ({mine}) passes {desc}; "
            f"[count, total elements, shape/dtype hash] per group rank: {rows}"
        )


# ---------------------------------------------------------------------------------------------
# pure-Python path (same buffer layout as csrc/collectives.cpp)


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
        dist.all_gather_single(gathered, flat, group=group)
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


def _py_reduce_scatter(tensors: list[torch.Tensor], group, op: str) -> list[torch.Tensor]:
    world = dist.get_world_size(group)
    for i, t in enumerate(tensors):
        if t.shape[0] % world:
            raise ValueError(f"{op}: tensor {i} has {t.shape[0]} rows, which is not divisible by the "
                             f"group size {world}")
    flat = torch.cat([t.detach().contiguous().view(world, t.numel() // world) for t in tensors], dim=1)
    flat = flat.reshape(-1)
    chunk = flat.numel() // world
    reduced = torch.empty(chunk, dtype=flat.dtype, device=flat.device)
    if world == 1:
        reduced.copy_(flat)
    elif chunk:
        dist.reduce_scatter_single(reduced, flat, op=dist.ReduceOp.SUM, group=group)
    out, off = [], 0
    for t in tensors:
        c = t.numel() // world
        out.append(reduced[off:off + c].view(t.shape[0] // world, *t.shape[1:]).clone())
        off += c
    return out


class _PyAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(_py_all_gather(list(tensors), group))

    @staticmethod
    def backward(ctx, *grads):
        grads = [torch.zeros_like(g) if g is None else g for g in grads]
        out = [None] * len(grads)
        # One reduce-scatter per dtype, in first-appearance order (identical on every rank; a set's
        # order is not).
        for dtype in dict.fromkeys(g.dtype for g in grads):
            idxs = [i for i, g in enumerate(grads) if g.dtype == dtype]
            for i, r in zip(idxs, _py_reduce_scatter([grads[i] for i in idxs], ctx.group,
                                                     "all_gather_coalesced backward")):
                out[i] = r
        return (None, *out)


class _PyReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(_py_reduce_scatter(list(tensors), group, "reduce_scatter_coalesced"))

    @staticmethod
    def backward(ctx, *grads):
        grads = [torch.zeros_like(g) if g is None else g for g in grads]
        return (None, *_py_all_gather(grads, ctx.group))


def _py_ring_start(tensors: list[torch.Tensor], group, shift: int):
    world = dist.get_world_size(group)
    send = _pack_bytes(tensors)
    recv = torch.empty_like(send)
    shift %= world
    if shift == 0 or send.numel() == 0:
        recv.copy_(send)
        return recv, send, []
    rank = dist.get_rank(group)
    ops = [
        dist.P2POp(dist.isend, send, group=group, group_peer=(rank + shift) % world),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - shift) % world),
    ]
    return recv, send, dist.batch_isend_irecv(ops)


# ---------------------------------------------------------------------------------------------
# public API


def all_gather_coalesced(tensors: Sequence[torch.Tensor], group=None, *, check: bool | None = None,
                         use_extension: bool | None = None) -> list[torch.Tensor]:
    """Gathers every tensor from every rank of ``group`` in one collective.

    Output ``i`` is the concatenation along dim 0 of all ranks' ``tensors[i]`` in group-rank order
    (shape ``(world * n_i, ...)``). Differentiable: the gradient is the reduce-scatter (sum) of the
    output gradients, i.e. each rank receives the sum over ranks of the gradient of its own rows.
    """
    tensors = _validate(tensors, "all_gather_coalesced", same_dtype=False)
    group = _resolve_group(group)
    if _check_default(check):
        _check_ranks_agree(tensors, group, "all_gather_coalesced")
    if using_extension(use_extension):
        return list(torch.ops.m2kernels.all_gather_coalesced(tensors, group.group_name))
    return list(_PyAllGather.apply(group, *tensors))


def reduce_scatter_coalesced(tensors: Sequence[torch.Tensor], group=None, *, check: bool | None = None,
                             use_extension: bool | None = None) -> list[torch.Tensor]:
    """Sums every tensor over the ranks of ``group`` and returns this rank's dim-0 block of each.

    ``tensors[i]`` has ``world * n_i`` rows; output ``i`` is rows ``[rank * n_i, (rank + 1) * n_i)``
    of the sum over ranks. A sum needs one dtype per buffer: the tensors travel in one collective per
    dtype present (one in the usual case). Differentiable (backward = all-gather).
    """
    tensors = _validate(tensors, "reduce_scatter_coalesced", same_dtype=False)
    group = _resolve_group(group)
    world = dist.get_world_size(group)
    for i, t in enumerate(tensors):
        if t.shape[0] % world:
            raise ValueError(f"reduce_scatter_coalesced: tensor {i} has {t.shape[0]} rows, which is not "
                             f"divisible by the group size {world}")
    if _check_default(check):
        _check_ranks_agree(tensors, group, "reduce_scatter_coalesced")
    ext = using_extension(use_extension)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):  # first-appearance order, same on every rank
        idxs = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        part = [tensors[i] for i in idxs]
        if ext:
            reduced = torch.ops.m2kernels.reduce_scatter_coalesced(part, group.group_name)
        else:
            reduced = _PyReduceScatter.apply(group, *part)
        for i, r in zip(idxs, reduced):
            out[i] = r
    return out


class RingExchangeHandle:
    """A ring step in flight; :meth:`wait` returns the tensors received from rank - 1."""

    def __init__(self, wait_fn):
        self._wait_fn = wait_fn
        self._result: list[torch.Tensor] | None = None

    def wait(self) -> list[torch.Tensor]:
        if self._result is None:
            self._result = self._wait_fn()
            self._wait_fn = None
        return self._result

    def is_completed(self) -> bool:
        return self._result is not None


def ring_exchange_async(tensors: Sequence[torch.Tensor], group=None, *, reverse: bool = False,
                        check: bool | None = None, use_extension: bool | None = None) -> RingExchangeHandle:
    """Starts one ring step: sends every tensor to group rank + 1, receives from rank - 1
    (``reverse=True``: sends to rank - 1, receives from rank + 1).

    Returns at once; compute can overlap until ``handle.wait()``. Not differentiable (inputs are
    detached); the received tensors have the shapes and dtypes of the sent ones.
    """
    shift = -1 if reverse else 1
    tensors = [t.detach() for t in _validate(tensors, "ring_exchange", same_dtype=False)]
    group = _resolve_group(group)
    if _check_default(check):
        _check_ranks_agree(tensors, group, "ring_exchange")
    if using_extension(use_extension):
        recv, send = torch.ops.m2kernels.ring_exchange_start(tensors, group.group_name, shift)

        def wait_ext():
            torch.ops._c10d_functional.wait_tensor(send)
            torch.ops._c10d_functional.wait_tensor(recv)
            return _unpack_bytes(recv, tensors)

        return RingExchangeHandle(wait_ext)

    recv, send, works = _py_ring_start(tensors, group, shift)

    def wait_py():
        for w in works:
            w.wait()
        assert send.numel() == recv.numel()  # the closure keeps the send buffer alive until here
        return _unpack_bytes(recv, tensors)

    return RingExchangeHandle(wait_py)


def ring_exchange(tensors: Sequence[torch.Tensor], group=None, *, reverse: bool = False,
                  check: bool | None = None, use_extension: bool | None = None) -> list[torch.Tensor]:
    """One ring step, blocking: returns the tensors sent by group rank - 1 (rank + 1 with ``reverse``);
    see ring_exchange_async."""
    if using_extension(use_extension):
        tensors = [t.detach() for t in _validate(tensors, "ring_exchange", same_dtype=False)]
        group = _resolve_group(group)
        if _check_default(check):
            _check_ranks_agree(tensors, group, "ring_exchange")
        return list(torch.ops.m2kernels.ring_exchange(tensors, group.group_name, -1 if reverse else 1))
    return ring_exchange_async(tensors, group, reverse=reverse, check=check, use_extension=False).wait()

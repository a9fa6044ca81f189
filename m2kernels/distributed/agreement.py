"""Every rank learns every rank's problem before any data moves: one small host-side exchange per call.

A distributed loss call on one rank cannot proceed alone: if one rank has bad input (a 3-D tensor, NaN
with ``check_finite=True``, a wrong ``rank=`` argument, another dtype) and the others enter the
feature collectives, they wait for it forever. So each call first exchanges a few integers per rank
(status, rows, settings) and, only when some rank reports an error, the error messages; then every
rank raises the same error (the bad rank's exception type, naming the rank and the problem) or goes
on with every rank's row count known (uneven shards).

The exchange runs on the host: over the group itself when it is a gloo group, otherwise over a gloo
group with the same ranks (created once and cached). It never waits for the GPU (no device
synchronisation per step); its cost is one small CPU collective.
"""

from __future__ import annotations

import struct
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from m2kernels.distributed import collectives as C
from m2kernels.distributed.topology import alive

_CPU_GROUPS: dict[tuple[int, ...], object] = {}
_ERROR_TYPES = {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError}


def host_group(group):
    """A process group with the members of ``group`` whose collectives run on CPU tensors."""
    if "gloo" in str(dist.get_backend(group)):  # "gloo", or e.g. "cpu:gloo,cuda:nccl"
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _CPU_GROUPS or not alive(_CPU_GROUPS[ranks]):
        _CPU_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    return _CPU_GROUPS[ranks]


def encode_float(value: float) -> int:
    """A float as the int64 with the same bits (exact, NaN included)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def decode_float(value: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(value)))[0]


def agree(group, what: str, error: Optional[BaseException], fields: Sequence[int]) -> list[list[int]]:
    """Exchange ``fields`` (ints) of every rank of ``group``; if any rank has an ``error``, raise on
    every rank (the bad rank keeps its exception type; the others raise the type of the first bad
    rank's error) with a message naming every bad rank and its problem.

    Returns the fields of every rank, in group-rank order: every rank sees the same rows, so checks
    made on them raise on every rank alike.
    """
    cpu = host_group(group)
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    mine = torch.tensor([1 if error is not None else 0, *[int(f) for f in fields]], dtype=torch.int64)
    everyone = C.all_gather_coalesced([mine[None]], cpu, check=False)[0].tolist()
    bad = [q for q in range(world) if everyone[q][0]]
    if bad:
        messages: list = [None] * world
        dist.all_gather_object(messages, None if error is None else (type(error).__name__, str(error)),
                               group=cpu)
        lines = "; ".join(f"rank {q}: {messages[q][0]}: {messages[q][1]}" for q in bad)
        text = (f"invalid inputs to the distributed {what} on rank{'s' if len(bad) > 1 else ''} {bad}: "
                f"{lines} (every rank of the process group raises this error; this is rank {me})")
        name = type(error).__name__ if error is not None else messages[bad[0]][0]
        raise _ERROR_TYPES.get(name, ValueError)(text)
    return [r[1:] for r in everyone]


def disagreement(rows: list[list[int]], index: int) -> Optional[list[int]]:
    """The per-rank values of field ``index`` when they are not all equal, else None."""
    values = [r[index] for r in rows]
    return values if len(set(values)) > 1 else None

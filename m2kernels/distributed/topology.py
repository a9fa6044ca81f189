"""Process-group topology: sub-groups of consecutive ranks, node-local groups, mesh dimensions.

Every helper works relative to a *parent* process group (default: the whole world) and returns
process groups built with ``torch.distributed.new_group``. Groups are cached by their member ranks,
so calling a helper once per training step creates each group only once.

Creating a group is a collective over its members only (``use_local_synchronization=True``): every
rank of the parent group must call the same helper with the same arguments, in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch.distributed as dist

_GROUP_CACHE: dict[tuple[int, ...], object] = {}


def alive(group) -> bool:
    """Whether a cached process group still exists (``destroy_process_group`` removes every group, and
    a later ``init_process_group`` would make cached ones stale)."""
    try:
        return group in dist.distributed_c10d._world.pg_map
    except AttributeError:  # pragma: no cover - a torch without the registry: trust the cache
        return True


def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "first (or use the single-process loss)")


def resolve_group(group=None):
    """The process group itself, or WORLD for ``None``; checks that this rank belongs to it."""
    _require_initialized()
    group = dist.group.WORLD if group is None else group
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("this rank is not a member of the given process group")
    return group


def group_ranks(group=None) -> list[int]:
    """Global ranks of the members of ``group`` (default WORLD), in group-rank order."""
    return list(dist.get_process_group_ranks(resolve_group(group)))


def group_from_ranks(ranks: Sequence[int]):
    """The process group of exactly these global ranks (cached). Only members need to call it.

    With one rank, or with the ranks of the whole world, no new group is created.
    """
    _require_initialized()
    ranks = tuple(int(r) for r in ranks)
    if len(set(ranks)) != len(ranks) or not ranks:
        raise ValueError(f"rank list must be non-empty and without repeats, got {list(ranks)}")
    world = dist.get_world_size()
    if any(r < 0 or r >= world for r in ranks):
        raise ValueError(f"rank list {list(ranks)} has ranks outside the world of size {world}")
    if ranks == tuple(range(world)):
        return dist.group.WORLD
    if dist.get_rank() not in ranks:
        raise ValueError(f"rank {dist.get_rank()} is not in the rank list {list(ranks)}")
    if ranks not in _GROUP_CACHE or not alive(_GROUP_CACHE[ranks]):
        _GROUP_CACHE[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _GROUP_CACHE[ranks]


def node_local_size(default: Optional[int] = None) -> int:
    """Ranks per node: ``LOCAL_WORLD_SIZE`` (set by torchrun), else ``default``; error when neither."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    if value is None:
        if default is None:
            raise ValueError("group_size was not given and LOCAL_WORLD_SIZE is not set (torchrun sets it); "
                             "pass group_size=n explicitly")
        return int(default)
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"LOCAL_WORLD_SIZE must be an integer, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"LOCAL_WORLD_SIZE must be positive, got {n}")
    return n


@dataclass(frozen=True)
class SubGroups:
    """A parent group split into ``num_groups`` sub-groups of ``size`` consecutive ranks.

    ``index`` is this rank's sub-group, ``local_rank`` its position inside it. ``inner`` is the process
    group of this rank's sub-group; ``cross`` the group of the ranks with the same ``local_rank`` in
    every sub-group (a ring between sub-groups), in sub-group order. ``inner_ranks``/``cross_ranks``
    are their global ranks.
    """

    parent: object
    size: int
    num_groups: int
    index: int
    local_rank: int
    inner: object
    cross: object
    inner_ranks: tuple[int, ...]
    cross_ranks: tuple[int, ...]


def consecutive_subgroups(n: int, group=None, *, with_cross: bool = True) -> SubGroups:
    """Split ``group`` (default WORLD) into sub-groups of ``n`` consecutive group ranks.

    The group size must be a multiple of ``n``. Every member of ``group`` must call this with the same
    ``n``. ``with_cross=False`` skips creating the groups between sub-groups.
    """
    group = resolve_group(group)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"group_size must be a positive int, got {n!r}")
    ranks = group_ranks(group)
    world = len(ranks)
    if world % n:
        raise ValueError(f"group_size={n} does not divide the process group size {world}")
    me = dist.get_rank(group)
    index, local = divmod(me, n)
    num = world // n
    inner_ranks = tuple(ranks[index * n:(index + 1) * n])
    cross_ranks = tuple(ranks[k * n + local] for k in range(num))
    inner = group if n == world else group_from_ranks(inner_ranks)
    if not with_cross:
        cross = None
    else:
        cross = group if num == world else group_from_ranks(cross_ranks)
    return SubGroups(group, n, num, index, local, inner, cross, inner_ranks, cross_ranks)


def node_subgroups(group=None, *, with_cross: bool = True) -> SubGroups:
    """Sub-groups of the node-local ranks (``LOCAL_WORLD_SIZE`` consecutive ranks each)."""
    return consecutive_subgroups(node_local_size(), group, with_cross=with_cross)


def mesh_dim_group(mesh, dim):
    """The process group of one dimension (index or name) of a ``torch.distributed.DeviceMesh``."""
    return mesh.get_group(dim)


def subgroups_from_rank_lists(rank_lists: Sequence[Sequence[int]]):
    """The group of this rank among explicit, disjoint rank lists (e.g. ``[[0, 1], [2, 3]]``)."""
    _require_initialized()
    me = dist.get_rank()
    seen: set[int] = set()
    mine = None
    for ranks in rank_lists:
        ranks = [int(r) for r in ranks]
        if seen.intersection(ranks):
            raise ValueError(f"rank lists overlap: {rank_lists}")
        seen.update(ranks)
        if me in ranks:
            mine = ranks
    if mine is None:
        raise ValueError(f"rank {me} is in none of the rank lists {rank_lists}")
    return group_from_ranks(mine)

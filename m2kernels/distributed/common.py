"""What the distributed losses share: the checks of a call, where a rank sits, padded blocks.

Every distributed loss call runs the same preamble: this rank validates its own arguments
(``local_checks``), the ranks exchange a few integers and every rank raises the same error when one of
them is bad (``agreement.agree``; ``check_same_features`` for what every loss needs equal), and the row
count of every rank is then known, from which ``Topology`` places this rank. Shards of unequal size
travel padded to the largest (``pad_rows`` / ``valid_rows`` / ``padded_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from m2kernels import validation
from m2kernels.distributed.agreement import disagreement
from m2kernels.distributed.topology import consecutive_subgroups
from m2kernels.ops.clip_loss import check_finite_inputs

FEATURE_DTYPES = validation.FEATURE_DTYPES


@dataclass(frozen=True)
class Topology:
    """Where this rank sits in the loss: the group the exact loss spans (a sub-group for ``grouped``),
    its split into nodes of n ranks (``inner``: this node; ``cross``: the ring between nodes), and the
    row count of every rank."""

    group: object
    inner: object
    cross: object
    world: int
    me: int
    n: int
    nodes: int
    node: int
    local: int
    sizes: tuple

    @classmethod
    def build(cls, mode: str, group, n: int, sizes: list[int]) -> Topology:
        world = dist.get_world_size(group)
        me = dist.get_rank(group)
        if mode == "grouped" and n < world:
            sub = consecutive_subgroups(n, group, with_cross=False)
            own = tuple(sizes[sub.index * n:(sub.index + 1) * n])
            return cls(sub.inner, sub.inner, None, n, sub.local_rank, n, 1, 0, sub.local_rank, own)
        if mode in ("global", "grouped") or n == world:
            return cls(group, group, None, world, me, world, 1, 0, me, tuple(sizes))
        sub = consecutive_subgroups(n, group)
        return cls(group, sub.inner if n > 1 else None, sub.cross, world, me, n, sub.num_groups, sub.index,
                   sub.local_rank, tuple(sizes))

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def bmax(self) -> int:
        return max(self.sizes)

    def node_sizes(self, k: int) -> list[int]:
        return [self.sizes[k * self.n + m] for m in range(self.n)]

    def offset_in_node(self) -> int:
        """Row offset of this rank's shard inside its node's block."""
        return sum(self.node_sizes(self.node)[:self.local])


def pad_rows(t: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    """``t`` with ``rows`` rows (padding filled with ``value``), contiguous."""
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_full((rows, *t.shape[1:]), value)
    out[:t.shape[0]] = t
    return out


def valid_rows(t: torch.Tensor, sizes: list[int], rows: int) -> torch.Tensor:
    """The members' valid rows of a padded block (member m at rows m*rows ...)."""
    if all(s == rows for s in sizes):
        return t
    return torch.cat([t[m * rows:m * rows + s] for m, s in enumerate(sizes)])


def padded_rows(t: torch.Tensor, sizes: list[int], rows: int, value: float = 0.0) -> torch.Tensor:
    """Inverse of :func:`valid_rows`: back to the padded layout, pads filled with ``value``."""
    if all(s == rows for s in sizes):
        return t.contiguous()
    out = t.new_full((len(sizes) * rows, *t.shape[1:]), value)
    o = 0
    for m, s in enumerate(sizes):
        out[m * rows:m * rows + s] = t[o:o + s]
        o += s
    return out


def local_checks(group, mode: str, modes: tuple, image_features, text_features, logit_scale, logit_bias,
                 options: dict, expected_rank, expected_world_size, check_finite: bool,
                 more: Optional[Callable[[validation.LossInputs], object]] = None):
    """This rank's validation, as (error or None, validated inputs or None, ``more(inputs)`` or None).

    Nothing here communicates: the caller hands the error to ``agreement.agree`` so that every rank
    raises it. ``more``: the loss's own checks of the validated inputs (its result is returned).
    """
    world = dist.get_world_size(group)
    try:
        if mode not in modes:
            raise ValueError(f"mode must be one of {modes}, got {mode!r}")
        if expected_world_size is not None and (expected_world_size != world
                                                or expected_rank != dist.get_rank(group)):
            raise ValueError(f"rank={expected_rank}, world_size={expected_world_size} do not match the "
                             f"process group (rank {dist.get_rank(group)} of {world})")
        if (dist.get_backend(group) == "nccl" and torch.is_tensor(image_features)
                and image_features.device.type != "cuda"):
            raise ValueError(f"the process group uses NCCL but the features are on {image_features.device}")
        inputs = validation.loss_inputs(image_features, text_features, logit_scale, logit_bias,
                                        allow_empty=True, **options)
        if check_finite:  # before the agreement, so that every rank raises (one host sync: opt-in)
            check_finite_inputs(image_features=inputs.x, text_features=inputs.y, logit_scale=inputs.scale,
                                logit_bias=inputs.bias)
        return None, inputs, more(inputs) if more is not None else None
    except (TypeError, ValueError, RuntimeError) as e:
        return e, None, None


def feature_fields(x: torch.Tensor) -> list[int]:
    """The first host metadata fields of every loss call: rows, feature size, dtype."""
    return [x.shape[0], x.shape[1], FEATURE_DTYPES.index(x.dtype)]


def check_same_features(rows: list[list[int]]) -> None:
    """Feature size and dtype must agree across ranks (fields 1 and 2 of :func:`feature_fields`;
    every rank sees the same rows, so every rank raises alike)."""
    if (v := disagreement(rows, 1)) is not None:
        raise ValueError(f"feature sizes differ across ranks: {v} (every rank raises this error)")
    if (v := disagreement(rows, 2)) is not None:
        raise TypeError(f"feature dtypes differ across ranks: {[str(FEATURE_DTYPES[i]) for i in v]} "
                        "(every rank raises this error)")


def check_nonempty(sizes: list[int]) -> None:
    """Every rank knows every row count: all raise when the whole batch is empty."""
    if sum(sizes) == 0:
        raise ValueError("the global batch is empty on every rank of the process group")

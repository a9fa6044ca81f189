"""Distributed contrastive losses over torch.distributed process groups.

Modes (``distributed_clip_loss(..., mode=)``, also ``m2kernels.clip_loss(..., mode=)`` and
``ClipLoss(mode=)``): ``global``, ``ring``, ``hierarchical`` (the exact global-batch loss) and
``grouped`` (the loss of each sub-group of consecutive ranks). See docs/distributed.md.
The sigmoid loss (``distributed_siglip_loss``, ``SigLipLoss(mode=)`` or open_clip's
``SigLipLoss(rank, world_size, dist_impl)``) has the modes ``global`` and ``ring``; see docs/loss.md.
"""

from m2kernels.distributed.clip_loss import MODES, comm_bytes, distributed_clip_loss, open_clip_loss
from m2kernels.distributed.collectives import (
    CommCounter,
    all_gather_coalesced,
    all_gather_with_grad,
    all_reduce,
    all_reduce_with_grad,
    mean_grad,
    reduce_scatter_coalesced,
    reduce_scatter_with_grad,
    ring_exchange,
    ring_exchange_async,
    ring_shift,
)
from m2kernels.distributed.siglip_loss import distributed_siglip_loss
from m2kernels.distributed.topology import (
    SubGroups,
    consecutive_subgroups,
    group_from_ranks,
    mesh_dim_group,
    node_local_size,
    node_subgroups,
    subgroups_from_rank_lists,
)
from m2kernels.gradcache import GBAAccumulator, GradCache

__all__ = [
    "MODES", "CommCounter", "GBAAccumulator", "GradCache", "SubGroups", "all_gather_coalesced",
    "all_gather_with_grad", "all_reduce", "all_reduce_with_grad", "comm_bytes", "consecutive_subgroups",
    "distributed_clip_loss", "distributed_siglip_loss", "group_from_ranks", "mean_grad", "mesh_dim_group",
    "node_local_size", "node_subgroups", "open_clip_loss", "reduce_scatter_coalesced",
    "reduce_scatter_with_grad", "ring_exchange", "ring_exchange_async", "ring_shift",
    "subgroups_from_rank_lists",
]

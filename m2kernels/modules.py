"""The losses as ``nn.Module``: drop-ins for open_clip's, built on ``m2kernels.functional`` only."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from m2kernels import functional as F


def _check_rank_and_world_size(rank, world_size) -> None:
    """open_clip's ``rank`` / ``world_size`` constructor arguments: ints, 0 <= rank < world_size."""
    for name, v, low in (("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if rank >= world_size:
        raise ValueError(f"rank={rank} must be smaller than world_size={world_size}")


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` signature, without the B x B logits.

    ``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
    use_horovod=False, *, mode=None, group=None, group_size=None, backend="auto", label_smoothing=0.0,
    chunk_size=None, memory_budget=None, store_logits="auto", deterministic=False, check_finite=False)``.
    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`` returns
    the scalar loss, or ``{"contrastive_loss": loss}``. ``logit_scale`` is already exponentiated.
    ``cache_labels`` is accepted and has nothing to cache.

    Distributed use (docs/distributed.md):

    * ``mode`` (``"global"``, ``"ring"``, ``"hierarchical"``, ``"grouped"``) over the process group
      ``group`` (default WORLD), ``group_size`` ranks per sub-group (default ``LOCAL_WORLD_SIZE``): each
      rank returns its share of the loss; ``local_loss``/``gather_with_grad`` are then ignored, and
      ``rank``/``world_size``, when given, must match the process group (checked on every rank).
    * ``mode=None`` and ``world_size > 1``: open_clip's semantics. ``local_loss=True`` is mode
      ``global`` (open_clip's ``--local-loss --gather-with-grad``); ``local_loss=False`` returns the
      full loss on every rank, with open_clip's gradient scaling (W times the loss's gradient with
      ``gather_with_grad=True``, 1 times without).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        mode: Optional[str] = None,
        group=None,
        group_size: Optional[int] = None,
        backend: str = "auto",
        label_smoothing: float = 0.0,
        chunk_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
        store_logits="auto",
        deterministic: bool = False,
        check_finite: bool = False,
    ):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod is not supported; use torch.distributed process groups")
        _check_rank_and_world_size(rank, world_size)
        if mode is not None and mode not in F.MODES:
            raise ValueError(f"mode must be None or one of {F.MODES}, got {mode!r}")
        if mode is None and (group is not None or group_size is not None):
            raise ValueError("group and group_size need a distributed mode (mode='global', 'ring', "
                             "'hierarchical' or 'grouped')")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.mode = mode
        self.group = group
        self.group_size = group_size
        self.options = dict(backend=backend, label_smoothing=label_smoothing, chunk_size=chunk_size,
                            memory_budget=memory_budget, store_logits=store_logits,
                            deterministic=deterministic, check_finite=check_finite)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias: Optional[torch.Tensor] = None,
        output_dict: bool = False,
    ):
        if self.mode is not None:
            claimed = self.world_size != 1 or self.rank != 0  # open_clip's defaults claim nothing
            loss = F.clip_loss(image_features, text_features, logit_scale, logit_bias, mode=self.mode,
                               group=self.group, group_size=self.group_size, **self.options,
                               rank=self.rank if claimed else None,
                               world_size=self.world_size if claimed else None)
        elif self.world_size > 1:
            loss = F.clip_loss_open_clip(image_features, text_features, logit_scale, logit_bias,
                                         local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                                         rank=self.rank, world_size=self.world_size, **self.options)
        else:
            loss = F.clip_loss(image_features, text_features, logit_scale, logit_bias, **self.options)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` signature, without the B x B logits.

    ``SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None, *, backend="auto", mode=None,
    group=None, chunk_size=None, memory_budget=None, check_finite=False)``.
    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)`` returns the
    scalar loss, or ``{"contrastive_loss": loss}``: open_clip's value, ``-sum(logsigmoid(labels * z)) / b``
    over this process's b images against every text. ``logit_scale`` is already exponentiated;
    ``logit_bias=None`` means no bias, as in open_clip. ``cache_labels`` is accepted and has nothing to
    cache (the labels are never built).

    Distributed use (docs/loss.md, SigLIP):

    * ``world_size > 1`` (open_clip's semantics): each rank returns its own share over the default
      process group, and gradients flow back to the ranks that own the texts; ``dist_impl`` (None,
      ``"bidir"``, ``"shift"``, ``"reduce"``, ``"gather"``) picks the mode (``ring`` for the neighbour
      exchanges, ``global`` for the collectives); the result does not depend on it. ``rank`` and
      ``world_size`` must match the process group (checked on every rank).
    * ``mode`` (``"global"`` or ``"ring"``) over ``group`` (default WORLD): the same shares; ``dist_impl``
      is then ignored, and ``rank``/``world_size``, when given, must match the group.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
        *,
        backend: str = "auto",
        mode: Optional[str] = None,
        group=None,
        group_size: Optional[int] = None,
        chunk_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
        check_finite: bool = False,
    ):
        super().__init__()
        _check_rank_and_world_size(rank, world_size)
        if dist_impl is not None and dist_impl not in F.SIGLIP_DIST_IMPL:
            raise ValueError(f"dist_impl must be None or one of {F.SIGLIP_DIST_IMPL}, got {dist_impl!r}")
        if mode is not None and mode not in F.SIGLIP_MODES:
            raise ValueError(f"SigLipLoss: mode must be None or one of {F.SIGLIP_MODES} (the sigmoid loss "
                             f"has no sub-group modes), got {mode!r}")
        if group_size is not None:  # accepted so that open_clip_train's --m2-group-size gets this message
            raise ValueError("SigLipLoss has no group_size: its modes ('global', 'ring') span the whole "
                             "process group")
        if mode is None and group is not None:
            raise ValueError("group needs a distributed mode (mode='global' or 'ring')")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"  # open_clip's default
        self.mode = mode
        self.group = group
        self.options = dict(backend=backend, chunk_size=chunk_size, memory_budget=memory_budget,
                            check_finite=check_finite)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        claimed = self.world_size != 1 or self.rank != 0  # open_clip's defaults claim nothing
        loss = F.siglip_loss(image_features, text_features, logit_scale, logit_bias, mode=self.mode,
                             group=self.group, dist_impl=self.dist_impl, rank=self.rank if claimed else None,
                             world_size=self.world_size if claimed else None, **self.options)
        return {"contrastive_loss": loss} if output_dict else loss

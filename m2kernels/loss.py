"""``ClipLoss``: a drop-in replacement for ``open_clip.loss.ClipLoss`` built on the fused kernels."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from m2kernels.ops.clip_loss import clip_loss


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` signature, without the B x B logits.

    ``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
    use_horovod=False, *, mode=None, group=None, group_size=None, backend="auto", label_smoothing=0.0,
    chunk_size=None, deterministic=False, check_finite=False)``. ``forward(image_features,
    text_features, logit_scale, logit_bias=None, output_dict=False)`` returns the scalar loss, or
    ``{"contrastive_loss": loss}``. ``logit_scale`` is already exponentiated. ``cache_labels`` is
    accepted and has nothing to cache.

    Distributed use (docs/distributed.md):

    * ``mode`` (``"global"``, ``"ring"``, ``"hierarchical"``, ``"grouped"``) over the process group
      ``group`` (default WORLD), ``group_size`` ranks per sub-group (default ``LOCAL_WORLD_SIZE``): each
      rank returns its share of the loss; ``local_loss``/``gather_with_grad`` are then ignored, and
      ``rank``/``world_size``, when given, must match the process group.
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
        deterministic: bool = False,
        check_finite: bool = False,
    ):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod is not supported; use torch.distributed process groups")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if mode is not None:
            from m2kernels.distributed.loss import MODES

            if mode not in MODES:
                raise ValueError(f"mode must be None or one of {MODES}, got {mode!r}")
        elif group is not None or group_size is not None:
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
        self.backend = backend
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.deterministic = deterministic
        self.check_finite = check_finite

    def _check_rank(self):
        """``rank``/``world_size`` (open_clip's arguments) must describe this rank in the process group."""
        import torch.distributed as dist

        from m2kernels.distributed.topology import resolve_group

        group = resolve_group(self.group)
        if dist.get_world_size(group) != self.world_size or dist.get_rank(group) != self.rank:
            raise ValueError(f"ClipLoss(rank={self.rank}, world_size={self.world_size}) does not match the "
                             f"process group (rank {dist.get_rank(group)} of {dist.get_world_size(group)})")
        return group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias: Optional[torch.Tensor] = None,
        output_dict: bool = False,
    ):
        opts = dict(label_smoothing=self.label_smoothing, backend=self.backend, chunk_size=self.chunk_size,
                    deterministic=self.deterministic, check_finite=self.check_finite)
        if self.mode is not None:
            if self.world_size != 1 or self.rank != 0:
                self._check_rank()
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, mode=self.mode,
                             group=self.group, group_size=self.group_size, **opts)
        elif self.world_size > 1:
            from m2kernels.distributed.loss import open_clip_loss

            group = self._check_rank()
            loss = open_clip_loss(image_features, text_features, logit_scale, logit_bias,
                                  local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                                  group=group, **opts)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, **opts)
        return {"contrastive_loss": loss} if output_dict else loss

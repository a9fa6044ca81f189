"""``ClipLoss``: a drop-in replacement for ``open_clip.loss.ClipLoss`` built on the fused kernels."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from m2kernels.ops.clip_loss import clip_loss


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` signature, without the B x B logits.

    ``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
    use_horovod=False, *, backend="auto", label_smoothing=0.0, chunk_size=None, deterministic=False,
    check_finite=False)``. ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` returns the scalar loss, or ``{"contrastive_loss": loss}``.
    ``logit_scale`` is already exponentiated. ``cache_labels`` is accepted and has nothing to cache.
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
        backend: str = "auto",
        label_smoothing: float = 0.0,
        chunk_size: Optional[int] = None,
        deterministic: bool = False,
        check_finite: bool = False,
    ):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod is not supported; use torch.distributed process groups")
        if world_size != 1:
            raise NotImplementedError("world_size > 1 needs the distributed loss modes")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.deterministic = deterministic
        self.check_finite = check_finite

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias: Optional[torch.Tensor] = None,
        output_dict: bool = False,
    ):
        loss = clip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            label_smoothing=self.label_smoothing,
            backend=self.backend,
            chunk_size=self.chunk_size,
            deterministic=self.deterministic,
            check_finite=self.check_finite,
        )
        return {"contrastive_loss": loss} if output_dict else loss

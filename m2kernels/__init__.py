"""m2kernels: fused, chunked and distributed contrastive (CLIP / ITC) loss kernels.

    from m2kernels import ClipLoss          # instead of: from open_clip.loss import ClipLoss
    loss = ClipLoss()(image_features, text_features, logit_scale)
"""

from m2kernels.loss import ClipLoss
from m2kernels.ops.clip_loss import clip_loss, lse_pair, softmax_grad
from m2kernels.reference import clip_loss_ref

__all__ = ["ClipLoss", "clip_loss", "clip_loss_ref", "lse_pair", "softmax_grad"]
__version__ = "0.1.0"

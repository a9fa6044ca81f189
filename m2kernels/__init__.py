"""m2kernels: fused, chunked and distributed contrastive (CLIP / ITC, SigLIP) loss kernels.

    from m2kernels import ClipLoss          # instead of: from open_clip.loss import ClipLoss
    loss = ClipLoss()(image_features, text_features, logit_scale)
    from m2kernels import SigLipLoss        # instead of: from open_clip.loss import SigLipLoss
    loss = SigLipLoss()(image_features, text_features, logit_scale, logit_bias)

Layers, each importing only those below it: ``ops`` (Triton kernels, their torch twins, the block
primitives and custom ops) -> ``distributed`` (collectives, topology, the distributed modes) ->
``functional`` (validation, routing) -> ``modules`` (``ClipLoss``, ``SigLipLoss``). ``reference`` holds
the dense float64 definitions tests and benchmarks compare against; ``gradcache`` the GradCache
re-forward.
"""

from m2kernels.functional import clip_loss, siglip_loss
from m2kernels.gradcache import GBAAccumulator, GradCache
from m2kernels.modules import ClipLoss, SigLipLoss
from m2kernels.reference import clip_loss_ref, siglip_loss_ref

__all__ = ["ClipLoss", "GBAAccumulator", "GradCache", "SigLipLoss", "clip_loss", "clip_loss_ref",
           "siglip_loss", "siglip_loss_ref"]
__version__ = "0.2.0"

"""The functional entry points of the losses: validation once, then the local op or a distributed mode.

``clip_loss`` (softmax, CLIP / ITC) routes to the single-process custom op
(``m2kernels.ops.clip_loss``) or, with ``mode=``, to ``m2kernels.distributed.clip_loss``;
``clip_loss_open_clip`` keeps open_clip's ``local_loss`` / ``gather_with_grad`` semantics for
``world_size > 1``. ``siglip_loss`` (sigmoid, SigLIP) routes to ``m2kernels.ops.siglip_loss`` or, with
``mode=`` or open_clip's ``world_size > 1``, to ``m2kernels.distributed.siglip_loss``. The modules
(``m2kernels.modules``) call only these.
"""

from __future__ import annotations

from typing import Optional

import torch

from m2kernels import validation
from m2kernels.distributed import clip_loss as dist_clip
from m2kernels.distributed import siglip_loss as dist_siglip
from m2kernels.ops.clip_loss import clip_loss_single
from m2kernels.ops.siglip_loss import siglip_loss_single

MODES = dist_clip.MODES
SIGLIP_MODES = dist_siglip.MODES
SIGLIP_DIST_IMPL = dist_siglip.DIST_IMPL


def _no_group_without_mode(group, group_size) -> None:
    if group is not None or group_size is not None:
        raise ValueError("group and group_size need a distributed mode (mode='global', 'ring', "
                         "'hierarchical' or 'grouped')")


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
              logit_bias: Optional[torch.Tensor] = None, *, label_smoothing: float = 0.0,
              backend: str = "auto", chunk_size: Optional[int] = None, memory_budget: Optional[int] = None,
              store_logits="auto", deterministic: bool = False, check_finite: bool = False,
              mode: Optional[str] = None, group=None, group_size: Optional[int] = None,
              rank: Optional[int] = None, world_size: Optional[int] = None) -> torch.Tensor:
    """Exact bidirectional CLIP loss without materialising the B x B logits.

    Equal to ``open_clip.loss.ClipLoss()(image_features, text_features, logit_scale, logit_bias)``:
    ``0.5 * (CE(S, arange) + CE(S^T, arange))`` with ``S = logit_scale * X Y^T + logit_bias``;
    ``logit_scale`` is already exponentiated. Differentiable in both feature matrices, the scale and the
    bias (whose gradient is exactly 0: the loss is shift-invariant). Accumulates in fp32 (fp64 for
    fp64 features) whatever the input dtype, also inside an autocast region.

    ``backend``: ``"auto"`` (``"triton"`` on CUDA, ``"torch"`` elsewhere), ``"triton"``, ``"torch"``,
    ``"reference"`` (dense float64). ``memory_budget``: bytes of temporaries (row chunks of G and S;
    default 1 GiB on CUDA, 64 MiB elsewhere); ``chunk_size`` overrides the rows per chunk.
    ``store_logits``: keep the fp32 dot products from the forward for the backward (3 passes over S
    instead of 4): ``"auto"`` when they fit the budget, or ``True``/``False``. ``check_finite``: raise
    on NaN/Inf inputs (one host synchronisation). ``deterministic`` is accepted for compatibility:
    every backend is deterministic.

    With ``mode`` (``"global"``, ``"ring"``, ``"hierarchical"``, ``"grouped"``) it is this rank's share of
    the loss over the process group ``group`` (``group_size`` ranks per sub-group): see
    ``m2kernels.distributed.distributed_clip_loss`` and docs/distributed.md. ``rank``/``world_size``,
    when given, must be this rank's place in ``group`` (every rank raises otherwise).
    """
    if mode is not None:
        return dist_clip.distributed_clip_loss(
            image_features, text_features, logit_scale, logit_bias, mode=mode, group=group,
            group_size=group_size, label_smoothing=label_smoothing, backend=backend, chunk_size=chunk_size,
            memory_budget=memory_budget, store_logits=store_logits, check_finite=check_finite,
            expected_rank=rank, expected_world_size=world_size)
    _no_group_without_mode(group, group_size)
    if world_size not in (None, 1) or rank not in (None, 0):
        raise ValueError(f"rank={rank}, world_size={world_size} need a distributed mode (mode=...) or the "
                         "open_clip semantics of ClipLoss(world_size > 1)")
    inp = validation.loss_inputs(image_features, text_features, logit_scale, logit_bias,
                                 label_smoothing=label_smoothing, backend=backend, chunk_size=chunk_size,
                                 memory_budget=memory_budget, store_logits=store_logits)
    m, n = inp.x.shape[0], inp.y.shape[0]
    keep = validation.keep_logits(inp.store_logits, m, n, inp.memory_budget)
    return clip_loss_single(inp.x, inp.y, inp.scale, inp.bias, inp.label_smoothing, inp.backend,
                            inp.memory_budget, inp.chunk_size, keep, check_finite)


def clip_loss_open_clip(image_features, text_features, logit_scale, logit_bias=None, *, local_loss: bool,
                        gather_with_grad: bool, rank: int, world_size: int, group=None,
                        **options) -> torch.Tensor:
    """open_clip's ``ClipLoss(local_loss, gather_with_grad, rank, world_size)`` with ``world_size > 1``
    (``m2kernels.distributed.open_clip_loss``); ``rank``/``world_size`` are checked against the
    process group on every rank."""
    return dist_clip.open_clip_loss(image_features, text_features, logit_scale, logit_bias,
                                    local_loss=local_loss, gather_with_grad=gather_with_grad, group=group,
                                    expected_rank=rank, expected_world_size=world_size, **options)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                backend: str = "auto", chunk_size: Optional[int] = None, memory_budget: Optional[int] = None,
                check_finite: bool = False, mode: Optional[str] = None, group=None,
                rank: Optional[int] = None, world_size: Optional[int] = None,
                dist_impl: Optional[str] = None) -> torch.Tensor:
    """Sigmoid (SigLIP) loss without materialising the B x B logits.

    Equal to ``open_clip.loss.SigLipLoss()(image_features, text_features, logit_scale, logit_bias)``:
    ``-sum(logsigmoid(labels * z)) / B`` with ``z = logit_scale * X Y^T + logit_bias``, labels +1 on the
    diagonal and -1 elsewhere; ``logit_scale`` is already exponentiated. ``logit_bias`` is required, as
    in open_clip's forward; None means no bias (as open_clip's ``get_logits``). Differentiable in both
    feature matrices, the scale and the bias. Accumulates in fp32 (fp64 for fp64 features) whatever the
    input dtype, also inside an autocast region; returns the loss in that dtype.

    ``backend``: ``"auto"`` (``"triton"`` on CUDA, ``"torch"`` elsewhere), ``"triton"``, ``"torch"``,
    ``"reference"`` (dense float64). ``memory_budget``: bytes of chunk temporaries (default 1 GiB on
    CUDA, 64 MiB elsewhere); ``chunk_size`` overrides the rows per chunk. ``check_finite``: raise on
    NaN/Inf inputs (one host synchronisation). When gradients will be needed, the forward forms them
    in the same passes over S as the loss (3 in all; 1 without gradients).

    Distributed (open_clip's ``SigLipLoss(rank, world_size, dist_impl)``): with ``world_size > 1``
    (``mode=None``), this rank's share over the default process group, in the mode ``dist_impl`` maps to
    (``bidir``/``shift``: ``"ring"``, ``reduce``/``gather``: ``"global"``; the same loss either way); or
    with ``mode`` (``"global"``, ``"ring"``) over ``group``: see
    ``m2kernels.distributed.siglip_loss``. ``rank``/``world_size``, when given, must be this rank's
    place in the group (every rank raises otherwise).
    """
    impl_mode = dist_siglip.mode_for_dist_impl(dist_impl)  # validates dist_impl in every case
    if mode is None and world_size not in (None, 1):
        mode = impl_mode
    if mode is not None:
        return dist_siglip.distributed_siglip_loss(
            image_features, text_features, logit_scale, logit_bias, mode=mode, group=group, backend=backend,
            chunk_size=chunk_size, memory_budget=memory_budget, check_finite=check_finite,
            expected_rank=rank, expected_world_size=world_size)
    if group is not None:
        raise ValueError("group needs a distributed mode (mode='global' or 'ring', or world_size > 1)")
    if rank not in (None, 0):
        raise ValueError(f"rank={rank} with world_size={world_size}: a single process is rank 0")
    inp = validation.loss_inputs(image_features, text_features, logit_scale, logit_bias, backend=backend,
                                 chunk_size=chunk_size, memory_budget=memory_budget)
    return siglip_loss_single(inp.x, inp.y, inp.scale, inp.bias, inp.backend,
                              inp.memory_budget, inp.chunk_size, check_finite)

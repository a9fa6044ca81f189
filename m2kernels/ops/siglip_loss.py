"""The sigmoid contrastive (SigLIP) loss: the block primitive and the custom op.

Notation: image features X (M x D), text features Y (N x D), scale s (already exponentiated), bias t,
``z = s X Y^T + t``, labels ``l_ij = +1`` where j is row i's positive, -1 elsewhere. For a batch of b
pairs (open_clip's ``SigLipLoss``)

    loss = 1/b sum_ij softplus(-l_ij z_ij) = -1/b sum_ij logsigmoid(l_ij z_ij)

and with upstream gradient g, ``w = g / b`` and the unit-weight gradient ``G_ij = -l_ij sigmoid(-l_ij z_ij)``

    dX = w s G Y,  dY = w s G^T X,  ds = w sum_ij G_ij <x_i, y_j>,  dt = w sum_ij G_ij.

Unlike the softmax loss there is no normaliser (no log-sum-exp over a row or a column): G of a
chunk is known as soon as its z is. So a call that needs gradients forms them in its forward, in the
same pass as the loss, and the backward only multiplies by w. Every row of a call carries the same
weight (a process computes only its own rows), so G is formed with unit weight and w is applied to
the fp32 results: |G| <= 1 whatever the upstream gradient.

``siglip_block`` carries all the B x B work, for any block of rows against any block of columns (the
distributed modes in ``m2kernels.distributed.siglip_loss`` call it on gathered or travelling blocks):
row chunks sized from the memory budget, each one pass over S (the Triton kernel or its torch twin);
with gradients, G written chunk by chunk in the input dtype and then ``G Y`` and ``G^T X`` as
fp32-accumulating matmuls (``tiling.grad_matmuls``, shared with the softmax loss); the scale gradient
is ``sum_i <x_i, (G Y)_i>``, from the first product (O(B D), not another pass over S).

Passes over S: 1 without gradients; 3 with them (1 + the two matmuls), none left for the backward.

The single-process loss is the custom op ``m2kernels::siglip_loss_fwd`` (a fake kernel and a
registered autograd formula: ``torch.compile(fullgraph=True)`` keeps it in the graph), run with
autocast disabled: it accumulates in fp32 whatever the surrounding autocast region says.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from m2kernels.ops import siglip_torch
from m2kernels.ops.clip_loss import BlockOptions, check_finite_inputs
from m2kernels.ops.tiling import (
    G_STORAGE_SCALE,
    acc_dtype,
    autocast_disabled,
    chunk_rows,
    grad_matmuls,
    storage_dtype,
)

# Bytes of chunk temporaries per logits element (used to size the row chunks), besides G itself: the
# torch backend's z and softplus's output, and with G the fp32 copy of G that mm_f32 makes off CUDA
# (of G^T for fp32 inputs).
_FWD_BYTES = {"triton": 0.0, "torch": 8.0}
_GRAD_BYTES = {"triton": 0.0, "torch": 12.0}


class BlockSums(NamedTuple):
    """Sums over one block (accumulation dtype): the loss ``sum softplus(-l z)`` and, with gradients
    (unit weight, not yet multiplied by s), ``G Y``, ``G^T X``, ``sum G <x, y>`` and ``sum G``."""

    loss: torch.Tensor
    gy: Optional[torch.Tensor] = None
    gtx: Optional[torch.Tensor] = None
    ds: Optional[torch.Tensor] = None
    dt: Optional[torch.Tensor] = None


def _kernels():
    from m2kernels.ops import siglip_kernels  # Triton is imported only where the triton backend runs

    return siglip_kernels


def siglip_block(x, y, scale, bias, diag_offset: Optional[int], opts: BlockOptions, want_grad: bool = False,
                 want_loss: bool = True) -> BlockSums:
    """The block of rows ``x`` against columns ``y``: row i's positive is column ``i + diag_offset``
    (``None``: no positives here). ``scale``/``bias``: one-element tensors in the accumulation dtype.
    ``want_loss=False`` (with ``want_grad``) skips the loss terms (0 is returned for them)."""
    m, n = x.shape[0], y.shape[0]
    acc = acc_dtype(x.dtype)
    if opts.backend == "reference":
        loss, gy, gtx, ds, dt = siglip_torch.reference_block(x, y, scale, bias, diag_offset, want_grad)
        cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
        return BlockSums(cast(loss), cast(gy), cast(gtx), cast(ds), cast(dt))
    tiles = _kernels().siglip_tiles if opts.backend == "triton" else siglip_torch.siglip_chunk
    if not want_grad:
        step = chunk_rows(m, n, _FWD_BYTES[opts.backend], opts.memory_budget, opts.chunk_size)
        loss = torch.zeros((), device=x.device, dtype=acc)
        for i0 in range(0, m, step):
            i1 = min(m, i0 + step)
            loss += tiles(x[i0:i1], y, scale, bias, None if diag_offset is None else diag_offset + i0)[0]
        return BlockSums(loss)
    gdt = storage_dtype(x.dtype)
    g_bytes = torch.empty((), dtype=gdt).element_size()
    step = chunk_rows(m, n, _GRAD_BYTES[opts.backend] + g_bytes, opts.memory_budget, opts.chunk_size)

    def fill(i0, i1, g):
        return tiles(x[i0:i1], y, scale, bias, None if diag_offset is None else diag_offset + i0, g, want_loss)

    gy, gtx, sums = grad_matmuls(x, y, step, gdt, fill, torch.zeros(2, device=x.device, dtype=acc))
    unscale = 1.0 / G_STORAGE_SCALE[gdt]
    if unscale != 1.0:
        gy.mul_(unscale)
        gtx.mul_(unscale)
    return BlockSums(sums[0], gy, gtx, _sum_of_row_dots(x, gy, opts.memory_budget), sums[1])


def _sum_of_row_dots(x: torch.Tensor, gy: torch.Tensor, budget: int) -> torch.Tensor:
    """``sum_i <x_i, (G Y)_i> = sum_ij G_ij <x_i, y_j>`` (the scale gradient) from the first matmul's
    fp32 rows, in row chunks (no fp32 copy of all of a 16-bit x)."""
    step = chunk_rows(x.shape[0], x.shape[1], 2.0 * gy.element_size(), budget)
    total = gy.new_zeros(())
    for i0 in range(0, x.shape[0], step):
        total += (x[i0:i0 + step].to(gy.dtype) * gy[i0:i0 + step]).sum()
    return total


def scalars(scale: torch.Tensor, bias: Optional[torch.Tensor], acc: torch.dtype):
    """The scale and bias as one-element tensors in the accumulation dtype (bias 0 when None)."""
    s = scale.reshape(1).to(acc)
    t = bias.reshape(1).to(acc) if bias is not None else torch.zeros(1, device=scale.device, dtype=acc)
    return s, t


# --------------------------------------------------------------------------------------------------
# The single-process loss as a torch.library custom op
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("m2kernels::siglip_loss_fwd", mutates_args=())
def _siglip_loss_fwd(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                     backend: str, memory_budget: int, chunk_size: int, want_grad: bool, check_finite: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss and, with ``want_grad``, its gradients for an upstream gradient of 1 (fp32; empty
    tensors without)."""
    if check_finite:
        check_finite_inputs(image_features=x, text_features=y, logit_scale=scale, logit_bias=bias)
    opts = BlockOptions(backend, memory_budget, chunk_size or None)
    with autocast_disabled(x.device):
        acc = acc_dtype(x.dtype)
        s, t = scalars(scale, bias, acc)
        b = x.shape[0]
        sums = siglip_block(x, y, s, t, 0, opts, want_grad)
        loss = sums.loss / b
        if not want_grad:
            return (loss, *(x.new_empty(0, dtype=acc) for _ in range(4)))  # distinct: outputs may not alias
        w = s / b
        return loss, sums.gy.mul_(w), sums.gtx.mul_(w), sums.ds / b, sums.dt / b


@_siglip_loss_fwd.register_fake
def _(x, y, scale, bias, backend, memory_budget, chunk_size, want_grad, check_finite):
    acc = acc_dtype(x.dtype)
    if not want_grad:
        return (x.new_empty((), dtype=acc), *(x.new_empty(0, dtype=acc) for _ in range(4)))
    return (x.new_empty((), dtype=acc), x.new_empty(x.shape, dtype=acc), y.new_empty(y.shape, dtype=acc),
            x.new_empty((), dtype=acc), x.new_empty((), dtype=acc))


def _setup_context(ctx, inputs, output):
    x, y, scale, bias, _backend, _budget, _chunk, want_grad, _check = inputs
    _, gx, gy, ds, dt = output
    # only the loss has a gradient: without this, autograd would fill B x D zeros for gx and gy
    ctx.set_materialize_grads(False)
    ctx.want_grad = want_grad
    ctx.has_bias = bias is not None
    ctx.dtypes = (x.dtype, y.dtype, scale.dtype, bias.dtype if bias is not None else None)
    ctx.shapes = (scale.shape, bias.shape if bias is not None else None)
    ctx.save_for_backward(gx, gy, ds, dt)


def _backward(ctx, grad_loss, *_unused):
    if not ctx.want_grad:
        raise RuntimeError("m2kernels siglip_loss: the forward ran without gradients (no input required "
                           "grad, or grad mode was off), so it has none to give")
    if grad_loss is None:  # not materialised (see _setup_context): nothing flows back
        return (None,) * 9
    gx, gy, ds, dt = ctx.saved_tensors
    g = grad_loss.to(gx.dtype)
    x_dtype, y_dtype, s_dtype, t_dtype = ctx.dtypes
    s_shape, t_shape = ctx.shapes
    dbias = (g * dt).reshape(t_shape).to(t_dtype) if ctx.has_bias else None
    # The forward's gradients are scaled in place: no second B x D copy exists at the backward's peak.
    # (A second backward through a retained graph then fails with autograd's in-place error, never
    # with a silently doubled gradient.)
    return (gx.mul_(g).to(x_dtype), gy.mul_(g).to(y_dtype), (g * ds).reshape(s_shape).to(s_dtype), dbias,
            None, None, None, None, None)


torch.library.register_autograd("m2kernels::siglip_loss_fwd", _backward, setup_context=_setup_context)


def siglip_loss_single(x, y, scale, bias, backend: str, memory_budget: int, chunk_size: Optional[int],
                       check_finite: bool) -> torch.Tensor:
    """The single-process loss on validated inputs (the functional layer's local path). Gradients are
    formed in the forward when autograd will ask for them."""
    want_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, y, scale, bias))
    loss, _, _, _, _ = torch.ops.m2kernels.siglip_loss_fwd(x, y, scale, bias, backend, memory_budget,
                                                          chunk_size or 0, want_grad, check_finite)
    return loss

"""Distributed sigmoid (SigLIP) loss: the ``global`` and ``ring`` modes.

Notation. A process group of W ranks; rank q holds b_q image rows X_q and text rows Y_q; B = sum_q b_q;
``z = s X Y^T + t`` over the global batch, ``l_ij = +1`` where j is row i's own text, -1 elsewhere.
Rank q returns its share, the value of open_clip's ``SigLipLoss(rank=q, world_size=W)``:

    L_q = 1/b_q sum_{i in q} sum_j softplus(-l_ij z_ij)        (0 on a rank whose shard is empty)

Unlike the softmax loss nothing couples the blocks (no log-sum-exp spans the ranks): the loss over
the group is a plain sum over blocks, and the forward exchanges text features only. With upstream
gradients g_q, the backward computes the gradient of Phi = sum_q g_q L_q, as open_clip's autograd
through its exchanges does: rank q receives dPhi/dX_q (from its own share), dPhi/dY_q (from every
rank's share: the text gradients travel back to their owner) and g_q dL_q/ds, g_q dL_q/dt (its own
share's; DDP averages them). Every row of rank q carries the weight w_q = g_q / b_q.

Modes (``m2kernels.ops.siglip_loss.siglip_block`` on each block):

* ``global``: the text shards are all-gathered into one B x D block. The forward forms the loss and,
  when gradients are needed, G and both matmuls against the block (3 passes over this rank's b x B
  logits); the backward multiplies by w_q and reduce-scatters the text gradients to their owners.
* ``ring``: the text shards travel the ring (rank q sends to q + 1); the exchange of the next block
  runs while the current block's tiles are computed. Forward 1 pass (the loss only); in the backward
  the shards travel again, each with the accumulator of its gradient, which arrives at its owner after
  W hops, each hop overlapping the next step's tiles: 3 passes (G, G Y, G^T X). Features held: O(b D).

open_clip's ``dist_impl`` values map onto them (``DIST_IMPL_MODES``): ``bidir`` and ``shift`` (its
neighbour exchanges) to ``ring``, ``reduce`` and ``gather`` (collectives over every shard) to
``global``. The loss and its gradients do not depend on the mode (up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from m2kernels.distributed import collectives as C
from m2kernels.distributed.agreement import agree, decode_float, disagreement, encode_float
from m2kernels.distributed.common import (
    Topology,
    check_nonempty,
    check_same_features,
    feature_fields,
    local_checks,
    pad_rows,
    padded_rows,
    valid_rows,
)
from m2kernels.distributed.topology import resolve_group
from m2kernels.ops.clip_loss import BlockOptions
from m2kernels.ops.siglip_loss import BlockSums, scalars, siglip_block
from m2kernels.ops.tiling import acc_dtype, autocast_disabled

MODES = ("global", "ring")
DIST_IMPL = ("bidir", "shift", "reduce", "gather")
DIST_IMPL_MODES = {"bidir": "ring", "shift": "ring", "reduce": "global", "gather": "global"}


def mode_for_dist_impl(dist_impl: Optional[str]) -> str:
    """The mode that computes open_clip's ``SigLipLoss(dist_impl=...)`` (None: open_clip's default,
    ``bidir``)."""
    if dist_impl is None:
        dist_impl = "bidir"
    if dist_impl not in DIST_IMPL:
        raise ValueError(f"dist_impl must be None or one of {DIST_IMPL} (open_clip's SigLipLoss), got "
                         f"{dist_impl!r}")
    return DIST_IMPL_MODES[dist_impl]


@dataclass(frozen=True)
class _Call:
    """Everything a loss call fixes besides the tensors."""

    mode: str
    topo: Topology
    opts: BlockOptions
    want_grad: bool  # gradients will be asked for: the global forward forms them


def _global_forward(x, y, s, t, call: _Call) -> BlockSums:
    """This rank's rows against the gathered block of every rank's texts."""
    topo = call.topo
    sizes = list(topo.sizes)
    block = valid_rows(C.gather([pad_rows(y, topo.bmax)], topo.group)[0], sizes, topo.bmax)
    if x.shape[0]:
        return siglip_block(x, block, s, t, sum(sizes[:topo.me]), call.opts, call.want_grad)
    acc = acc_dtype(x.dtype)
    zero = torch.zeros((), dtype=acc, device=x.device)
    if not call.want_grad:
        return BlockSums(zero)
    return BlockSums(zero, x.new_zeros(x.shape, dtype=acc), block.new_zeros(block.shape, dtype=acc), zero,
                     zero)


def _global_backward(sums: BlockSums, weight, call: _Call):
    """dX (this rank's), dY (the reduce-scatter of every rank's text gradients), ds, dt."""
    topo = call.topo
    mine = padded_rows(sums.gtx.mul_(weight), list(topo.sizes), topo.bmax)
    dy = C.scatter_sum([mine], topo.group)[0]
    return sums.gy.mul_(weight), dy[:topo.sizes[topo.me]]


def _ring_forward(x, y, s, t, call: _Call) -> torch.Tensor:
    """Sum over the ring steps of this rank's rows against the block it holds (the loss only)."""
    topo = call.topo
    loss = torch.zeros((), dtype=acc_dtype(x.dtype), device=x.device)
    held = pad_rows(y, topo.bmax)
    for step in range(topo.nodes):
        k = (topo.node - step) % topo.nodes  # whose texts this rank holds now
        handle = C.ring_start([held], topo.cross) if step < topo.nodes - 1 else None  # overlaps this step
        block = held[:topo.sizes[k]]
        if x.shape[0] and block.shape[0]:
            loss += siglip_block(x, block, s, t, 0 if k == topo.node else None, call.opts).loss
        if handle is not None:
            held = handle.wait()[0]
    return loss


def _ring_backward(x, y, s, t, weight, call: _Call):
    """dX, dY (home after W hops), and the unweighted sums of G <x, y> and G of this rank's rows."""
    topo = call.topo
    acc = acc_dtype(x.dtype)
    b, d = x.shape
    dx = torch.zeros(b, d, dtype=acc, device=x.device)
    ds = torch.zeros((), dtype=acc, device=x.device)
    dt = torch.zeros((), dtype=acc, device=x.device)
    held = pad_rows(y, topo.bmax)
    carried = pending = None
    for step in range(topo.nodes):
        k = (topo.node - step) % topo.nodes
        handle = C.ring_start([held], topo.cross) if step < topo.nodes - 1 else None
        block = held[:topo.sizes[k]]
        if b and block.shape[0]:
            sums = siglip_block(x, block, s, t, 0 if k == topo.node else None, call.opts, want_grad=True,
                                want_loss=False)
            dx += sums.gy
            ds += sums.ds
            dt += sums.dt
            mine = pad_rows(sums.gtx.mul_(weight), topo.bmax)
        else:
            mine = torch.zeros(topo.bmax, d, dtype=acc, device=x.device)
        # The accumulator of block k's gradient arrives with block k (sent one step behind it) and
        # leaves for the next rank while that rank computes its next step.
        carried = mine if pending is None else mine + pending.wait()[0]
        if handle is not None:
            held = handle.wait()[0]
        if topo.nodes > 1:
            pending = C.ring_start([carried], topo.cross)
    if pending is not None:
        carried = pending.wait()[0]
    return dx.mul_(weight), carried[:b], ds, dt


class _SigLipShare(torch.autograd.Function):
    """Rank q's share L_q of the loss over ``call.topo.group`` (see the module docs)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, call: _Call):
        with autocast_disabled(x.device):
            acc = acc_dtype(x.dtype)
            s, t = scalars(scale, bias, acc)
            b = x.shape[0]
            sums = None
            if call.mode == "global":
                sums = _global_forward(x, y, s, t, call)
                total = sums.loss
            else:
                total = _ring_forward(x, y, s, t, call)
            loss = total / b if b else total
        ctx.call = call
        ctx.sums = sums if call.want_grad else None
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, y, scale, bias if bias is not None else x.new_empty(0))
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, bias = ctx.saved_tensors
        call = ctx.call
        with autocast_disabled(x.device):
            acc = acc_dtype(x.dtype)
            s, t = scalars(scale, bias if ctx.has_bias else None, acc)
            b = x.shape[0]
            w = grad.reshape(1).to(acc) / b if b else torch.zeros(1, dtype=acc, device=x.device)
            if call.mode == "global":
                sums = ctx.sums
                if sums is None:
                    raise RuntimeError("the distributed SigLIP loss (mode='global') forms its gradients in "
                                       "the forward and its backward consumes them: it cannot run twice")
                dx, dy = _global_backward(sums, w * s, call)
                ds, dt = sums.ds, sums.dt
            else:
                dx, dy, ds, dt = _ring_backward(x, y, s, t, w * s, call)
        ctx.sums = None
        dscale = (w * ds).reshape(scale.shape).to(scale.dtype)
        dbias = (w * dt).reshape(bias.shape).to(bias.dtype) if ctx.has_bias else None
        return dx.to(x.dtype), dy.to(y.dtype), dscale, dbias, None


# --------------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------------


def distributed_siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                            logit_bias: Optional[torch.Tensor], *, mode: str = "global", group=None,
                            backend: str = "auto", chunk_size: Optional[int] = None,
                            memory_budget: Optional[int] = None, check_finite: bool = False,
                            expected_rank: Optional[int] = None,
                            expected_world_size: Optional[int] = None) -> torch.Tensor:
    """This rank's share of the sigmoid loss over a process group (see the module docs).

    ``mode``: ``"global"`` or ``"ring"`` (the same loss). ``group``: the process group (default WORLD).
    After ``backward()`` rank q holds the gradients open_clip's ``SigLipLoss(rank=q, world_size=W)``
    gives: its features' gradients of sum_p g_p L_p, and its own share's gradients of the scale and
    the bias. Local batch sizes may differ, and may be 0 on some ranks (whose share is then 0) as long
    as the global batch is not empty. Every rank of ``group`` must call this with the same mode; when
    one rank's input is invalid, every rank raises an error naming that rank and the problem
    (``expected_rank``/``expected_world_size``: what the caller believes this rank is, checked the
    same way). ``logit_bias`` may be None (no bias), on every rank alike.
    """
    group = resolve_group(group)
    options = dict(backend=backend, chunk_size=chunk_size, memory_budget=memory_budget)
    err, inputs, _ = local_checks(group, mode, MODES, image_features, text_features, logit_scale, logit_bias,
                                  options, expected_rank, expected_world_size, check_finite)
    fields = [0] * 7
    if inputs is not None:
        # The values of the scale and the bias are compared only with check_finite (a host sync).
        scale_bits = bias_bits = 0
        if check_finite:
            scale_bits = encode_float(inputs.scale.detach().reshape(()))
            if inputs.bias is not None:
                bias_bits = encode_float(inputs.bias.detach().reshape(()))
        fields = [*feature_fields(inputs.x), MODES.index(mode), int(inputs.bias is not None), scale_bits,
                  bias_bits]
    rows = agree(group, "SigLIP loss", err, fields)
    _check_same(rows)
    sizes = [r[0] for r in rows]
    check_nonempty(sizes)
    x, y, scale, bias = inputs.x, inputs.y, inputs.scale, inputs.bias
    topo = Topology.build(mode, group, dist.get_world_size(group) if mode == "global" else 1, sizes)
    opts = BlockOptions(inputs.backend, inputs.memory_budget, inputs.chunk_size)
    want_grad = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (x, y, scale, bias))
    return _SigLipShare.apply(x, y, scale, bias, _Call(mode, topo, opts, want_grad))


def _check_same(rows: list[list[int]]) -> None:
    """Settings every rank must share (the same rows on every rank: all raise alike)."""
    check_same_features(rows)
    if (v := disagreement(rows, 3)) is not None:
        raise ValueError(f"ranks disagree on mode: {[MODES[i] for i in v]} (every rank raises this error)")
    if (v := disagreement(rows, 4)) is not None:
        raise ValueError(f"logit_bias is None on some ranks and a tensor on others: {v} (1: given; every "
                         "rank raises this error)")
    for index, name in ((5, "logit_scale"), (6, "logit_bias")):
        if (v := disagreement(rows, index)) is not None:
            raise ValueError(f"{name} differs across ranks: {[decode_float(e) for e in v]}; it must be "
                             "replicated (checked with check_finite=True; every rank raises this error)")

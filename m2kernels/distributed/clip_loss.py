"""Distributed softmax contrastive loss: the ``global``, ``ring``, ``hierarchical`` and ``grouped`` modes.

Notation (docs/distributed.md has the full algebra). A process group of W ranks; rank q holds b_q
image rows X_q and text rows Y_q; B = sum_q b_q; S = s X Y^T over the global batch. Rank q returns
its share

    L_q = W / (2B) * [ sum_{i in q} (r_i - (1-eps) S_ii - eps/B sum_j S_ij)
                     + sum_{j in q} (c_j - (1-eps) S_jj - eps/B sum_i S_ij) ]

so that mean_q L_q is the loss. With upstream gradients g_q, backward computes the gradient of
Phi = sum_q g_q L_q: rank q receives dPhi/dX_q and dPhi/dY_q (W times the loss's gradient for g = 1:
what DDP's averaging expects) and sum_{i in q} sum_j G_ij <x_i, y_j>, its part of dPhi/ds (the mean
over ranks is the loss's gradient). G's weights are w_q = g_q W / (2B) per row and column
(``m2kernels.ops.clip_loss.clip_weights``).

One algorithm covers every mode. The group is split into G sub-groups ("nodes") of n consecutive
ranks; text shards travel a ring between nodes (rank (k, l) sends to (k+1, l)), and inside a node the
n shards present are all-gathered into one block. ``global`` is n = W (one block, kept for the
backward), ``ring`` n = 1, ``hierarchical`` anything in between; ``grouped`` runs ``global`` inside
each sub-group. Passes over S, per rank, over its b x B (or b x nb for ``grouped``) logits: forward 1
(``lse_block`` on each block), backward 3 (``grad_block``: G, then G Y and G^T X), or 2 when the
forward kept the dot products (``store_logits``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from m2kernels import validation
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
from m2kernels.distributed.topology import node_local_size, resolve_group
from m2kernels.ops.clip_loss import (
    BlockOptions,
    clip_weights,
    feature_sum,
    grad_block,
    loss_sums,
    lse_block,
)
from m2kernels.ops.tiling import LSE_DTYPE, acc_dtype, autocast_disabled

MODES = ("global", "ring", "hierarchical", "grouped")
# Host metadata per rank and call: status, rows, dim, dtype, mode, group_size, label smoothing, scale.
META_FIELDS = 8


def lse_all_reduce(v: torch.Tensor, group) -> torch.Tensor:
    """Elementwise log-sum-exp of ``v`` over the ranks of ``group`` (a max all-reduce, then a sum)."""
    if group is None or dist.get_world_size(group) == 1:
        return v
    m = C.all_reduce(v.clone(), group, dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return C.all_reduce((v - m).exp(), group).log() + m


@dataclass(frozen=True)
class _Call:
    """Everything a loss call fixes besides the tensors."""

    topo: Topology
    eps: float
    opts: BlockOptions
    keep_dots: bool
    truncated: bool  # open_clip's local_loss=True, gather_with_grad=False gradient


def _forward(x, y, s, call: _Call):
    """The one ring/gather forward: row LSE r (b), column LSE c of this rank's columns (b), the
    diagonal (b), and what the backward keeps (the block and its column LSE when G = 1, the dot
    products of every step when kept)."""
    topo, opts = call.topo, call.opts
    acc = acc_dtype(x.dtype)
    b = x.shape[0]
    bmax = topo.bmax
    r = torch.full((b,), float("-inf"), dtype=acc, device=x.device)
    diag = torch.full((b,), float("nan"), dtype=acc, device=x.device)
    carried_c = torch.full((bmax,), float("-inf"), dtype=acc, device=x.device)
    held = pad_rows(y, bmax)
    block = c_block = None
    dots_steps = []
    for t in range(topo.nodes):
        k = (topo.node - t) % topo.nodes
        handle = C.ring_start([held], topo.cross) if t < topo.nodes - 1 else None  # overlaps this step
        sizes = topo.node_sizes(k)
        block = valid_rows(C.gather([held], topo.inner)[0], sizes, bmax) if topo.n > 1 else held[:sizes[0]]
        offset = topo.offset_in_node() if k == topo.node else None
        if b and block.shape[0]:
            rr, cc, dd, dots = lse_block(x, block, s, offset, opts, call.keep_dots)
            r = torch.logaddexp(r, rr)
            if offset is not None:
                diag = dd
        else:
            cc = torch.full((block.shape[0],), float("-inf"), dtype=acc, device=x.device)
            dots = None
        dots_steps.append(dots)
        cc_p = lse_all_reduce(padded_rows(cc, sizes, bmax, float("-inf")), topo.inner)
        carried_c = torch.logaddexp(carried_c, cc_p[topo.local * bmax:(topo.local + 1) * bmax])
        if topo.nodes == 1:
            c_block = valid_rows(cc_p, sizes, bmax)
        if handle is not None:
            held = handle.wait()[0]
        if topo.nodes > 1:  # the column LSE travels with its shard; after G hops it is home
            carried_c = C.ring_exchange([carried_c], topo.cross, check=False)[0]
    kept = (block, c_block) if topo.nodes == 1 else (None, None)
    return r, carried_c[:b], diag, kept, dots_steps


def _backward(x, y, s, r, c, grad, kept, dots_steps, call: _Call):
    """dPhi/dX_q, dPhi/dY_q (fp32, before the factor s) and this rank's part of dPhi/ds."""
    topo, opts, eps = call.topo, call.opts, call.eps
    acc = acc_dtype(x.dtype)
    b, d = x.shape
    bmax, total, world = topo.bmax, topo.total, topo.world
    w = C.gather([grad.reshape(1).to(acc)], topo.group)[0] * (world / (2.0 * total))  # per-rank weights
    wp = w[topo.me]
    dx = torch.zeros(b, d, dtype=acc, device=x.device)
    ds = torch.zeros((), dtype=acc, device=x.device)
    held, held_c = pad_rows(y, bmax), pad_rows(c, bmax, float("-inf"))
    block, c_block = kept
    carried = pending = None
    for t in range(topo.nodes):
        k = (topo.node - t) % topo.nodes
        sizes = topo.node_sizes(k)
        handle = None
        if topo.nodes > 1:
            if t < topo.nodes - 1:
                handle = C.ring_start([held, held_c], topo.cross)
            block_p, cblock_p = C.gather([held, held_c], topo.inner) if topo.n > 1 else (held, held_c)
            block, c_block = valid_rows(block_p, sizes, bmax), valid_rows(cblock_p, sizes, bmax)
        col_w = torch.cat([w[k * topo.n + m].expand(sz) for m, sz in enumerate(sizes)])
        offset = topo.offset_in_node() if k == topo.node else None
        if b and block.shape[0]:
            weights = clip_weights(wp.expand(b), col_w, eps, total, truncated=call.truncated)
            gy, gtx, ds_t = grad_block(x, block, s, r, c_block, weights, offset, opts, dots_steps[t],
                                       split=call.truncated)
            dx += gy
            ds += ds_t
        else:
            gtx = torch.zeros(block.shape[0], d, dtype=acc, device=x.device)
        mine = padded_rows(gtx, sizes, bmax)
        if topo.n > 1:
            mine = C.scatter_sum([mine], topo.inner)[0]
        if topo.nodes == 1:
            carried = mine
            continue
        # The dY accumulator travels with its shard and arrives home after G hops; each hop runs while
        # the next step's tiles are computed.
        carried = mine if pending is None else mine + pending.wait()[0]
        if handle is not None:
            held, held_c = handle.wait()
        pending = C.ring_start([carried], topo.cross)
    if pending is not None:
        carried = pending.wait()[0]
    dy = carried[:b]
    if call.truncated:  # this rank's columns' terms involve every rank's rows: their ds part is here
        ds = ds + (y.to(acc) * dy).sum()
    return dx, dy, ds


class _ClipShare(torch.autograd.Function):
    """Rank q's share L_q of the loss over ``call.topo.group`` (see the module docs)."""

    @staticmethod
    def forward(ctx, x, y, scale, call: _Call):
        with autocast_disabled(x.device):
            acc = acc_dtype(x.dtype)
            s = scale.reshape(1).to(acc)
            topo = call.topo
            r, c, diag, kept, dots_steps = _forward(x, y, s, call)
            xsum = ysum = None
            if call.eps:
                sums = C.gather([torch.cat([feature_sum(x), feature_sum(y)])[None]], topo.group)[0]
                xsum, ysum = sums[:, :x.shape[1]].sum(0), sums[:, x.shape[1]:].sum(0)
            loss = loss_sums(r, c, diag, x, y, s.reshape(()), call.eps, topo.total, xsum, ysum,
                             call.opts.memory_budget) * (topo.world / (2.0 * topo.total))
        ctx.call = call
        ctx.kept, ctx.dots_steps = kept, dots_steps
        ctx.save_for_backward(x, y, scale, r, c)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, r, c = ctx.saved_tensors
        with autocast_disabled(x.device):
            acc = acc_dtype(x.dtype)
            s = scale.reshape(1).to(acc)
            dx, dy, ds = _backward(x, y, s, r, c, grad, ctx.kept, ctx.dots_steps, ctx.call)
        ctx.kept = ctx.dots_steps = None
        return (dx.mul_(s)).to(x.dtype), (dy * s).to(y.dtype), ds.reshape(scale.shape).to(scale.dtype), None


# --------------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------------


def resolve_group_size(mode: str, group_size, world: int) -> int:
    if mode in ("global", "ring"):
        return world if mode == "global" else 1
    n = node_local_size() if group_size is None else group_size
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"group_size must be a positive int, got {n!r}")
    if world % n:
        raise ValueError(f"group_size={n} does not divide the process group size {world}")
    return n


def distributed_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                          logit_bias: Optional[torch.Tensor] = None, *, mode: str = "global", group=None,
                          group_size: Optional[int] = None, label_smoothing: float = 0.0,
                          backend: str = "auto", chunk_size: Optional[int] = None,
                          memory_budget: Optional[int] = None, store_logits="auto",
                          deterministic: bool = False, check_finite: bool = False,
                          expected_rank: Optional[int] = None, expected_world_size: Optional[int] = None,
                          _truncated_gradient: bool = False) -> torch.Tensor:
    """This rank's share of the contrastive loss over a process group (see docs/distributed.md).

    ``mode``: ``"global"``, ``"ring"``, ``"hierarchical"`` (exact global-batch loss) or ``"grouped"``
    (the loss of each sub-group of ``group_size`` consecutive ranks: a different objective unless the
    sub-group is the whole group). ``group``: the process group (default WORLD). ``group_size``: ranks per
    sub-group for ``hierarchical``/``grouped`` (default ``LOCAL_WORLD_SIZE``).

    The mean over ranks of the returned values is the loss; after ``backward()`` each rank's feature
    gradients are W times the loss's gradient with respect to its local features (W = ranks of ``group``)
    and the mean over ranks of the logit-scale gradients is the loss's gradient. Local batch sizes may
    differ, and may be 0 on some ranks as long as the batch of every loss is non-empty. Every rank of
    ``group`` must call this, with the same mode, group_size and label_smoothing; when one rank's input is
    invalid, every rank raises an error naming that rank and the problem (``expected_rank``/
    ``expected_world_size``: what the caller believes this rank is, checked the same way).
    ``deterministic`` is accepted for compatibility: the loss is always deterministic.
    """
    group = resolve_group(group)
    options = dict(label_smoothing=label_smoothing, backend=backend, chunk_size=chunk_size,
                   memory_budget=memory_budget, store_logits=store_logits)
    world = dist.get_world_size(group)
    err, inputs, n = local_checks(group, mode, MODES, image_features, text_features, logit_scale, logit_bias,
                                  options, expected_rank, expected_world_size, check_finite,
                                  more=lambda _inputs: resolve_group_size(mode, group_size, world))
    n = n or 0
    if err is None and _truncated_gradient and (mode != "global" or inputs.label_smoothing):
        err = ValueError("open_clip's truncated gradient (local_loss=True, gather_with_grad=False) is "
                         "available for mode='global' without label smoothing")
    fields = [0] * (META_FIELDS - 1)
    if inputs is not None:
        x = inputs.x
        scale_bits = encode_float(inputs.scale.detach().reshape(())) if check_finite else 0  # syncs: opt-in
        fields = [*feature_fields(x), MODES.index(mode), n, encode_float(inputs.label_smoothing), scale_bits]
    rows = agree(group, "clip loss", err, fields)
    _check_same(rows)
    sizes = [r[0] for r in rows]
    x, y, scale, bias = inputs.x, inputs.y, inputs.scale, inputs.bias
    if mode == "grouped" and n < world:
        empty = [k for k in range(world // n) if sum(sizes[k * n:(k + 1) * n]) == 0]
        if empty:  # every rank knows every size: all raise, none waits for an empty sub-group
            raise ValueError(f"mode='grouped': the batch of sub-group(s) {empty} (of {n} consecutive "
                             "ranks each) is empty on all its ranks")
    check_nonempty(sizes)
    topo = Topology.build(mode, group, n, sizes)
    opts = BlockOptions(inputs.backend, inputs.memory_budget, inputs.chunk_size)
    keep = validation.keep_logits(inputs.store_logits, x.shape[0], topo.total, inputs.memory_budget)
    call = _Call(topo, inputs.label_smoothing, opts, keep, _truncated_gradient)
    loss = _ClipShare.apply(x, y, scale, call)
    if bias is not None:
        loss = loss + (bias - bias).reshape(()).to(loss.dtype)  # NaN/Inf bias -> NaN loss, grad 0
    return loss


def _check_same(rows: list[list[int]]) -> None:
    """Settings every rank must share (the same rows on every rank: all raise alike)."""
    check_same_features(rows)
    if disagreement(rows, 3) is not None or disagreement(rows, 4) is not None:
        pairs = [(MODES[r[3]], r[4]) for r in rows]
        raise ValueError(f"ranks disagree on (mode, group_size): {pairs} (every rank raises this error)")
    if (v := disagreement(rows, 5)) is not None:
        raise ValueError(f"ranks disagree on label_smoothing: {[decode_float(e) for e in v]} "
                         "(every rank raises this error)")
    if (v := disagreement(rows, 6)) is not None:
        raise ValueError(f"logit_scale differs across ranks: {[decode_float(e) for e in v]}; it must be "
                         "replicated (checked with check_finite=True; every rank raises this error)")


# --------------------------------------------------------------------------------------------------
# open_clip's semantics (local_loss / gather_with_grad)
# --------------------------------------------------------------------------------------------------


def _scaled_grad(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` whose gradient is multiplied by ``factor`` on the way back."""
    if not t.requires_grad:
        return t
    out = t.view_as(t)
    out.register_hook(lambda g: g * factor)
    return out


_WARNED = set()


def open_clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, local_loss: bool,
                   gather_with_grad: bool, group=None, **kwargs) -> torch.Tensor:
    """open_clip's ``ClipLoss(local_loss, gather_with_grad, world_size > 1)`` semantics on our kernels.

    * ``local_loss=True``: this rank's share (mode ``global``); the same value and the same per-rank
      gradients as open_clip. With ``gather_with_grad=False`` open_clip drops the gradient that flows
      through the other ranks' losses (the gathered features are constants); that truncated gradient
      is reproduced, with a one-time warning that it is not the gradient of the loss.
    * ``local_loss=False``: the full global loss on every rank. ``gather_with_grad=True``: feature
      gradients are W times the loss's gradient (as open_clip); ``gather_with_grad=False``: 1 times (as
      open_clip, whose gathered copies carry no gradient). The logit-scale gradient is the loss's
      gradient on every rank, as open_clip's. Exact for equal upstream gradients on all ranks (the
      usual case); otherwise the mean upstream gradient is used.
    """
    group = resolve_group(group)
    world = dist.get_world_size(group)
    if local_loss:
        if not gather_with_grad and "local_no_grad" not in _WARNED:
            _WARNED.add("local_no_grad")
            warnings.warn("ClipLoss(local_loss=True, gather_with_grad=False) reproduces open_clip's "
                          "truncated gradient (the other ranks' features are constants), which is not the "
                          "gradient of the loss; gather_with_grad=True gives the exact one", stacklevel=3)
        return distributed_clip_loss(image_features, text_features, logit_scale, logit_bias, mode="global",
                                     group=group, _truncated_gradient=not gather_with_grad, **kwargs)
    if not gather_with_grad and torch.is_tensor(image_features) and torch.is_tensor(text_features):
        image_features = _scaled_grad(image_features, 1.0 / world)
        text_features = _scaled_grad(text_features, 1.0 / world)
    if torch.is_tensor(logit_scale) and logit_scale.requires_grad:
        logit_scale = C.mean_grad(logit_scale, group)
    share = distributed_clip_loss(image_features, text_features, logit_scale, logit_bias, mode="global",
                                  group=group, **kwargs)
    return C.all_reduce_with_grad(share, group) / world


# --------------------------------------------------------------------------------------------------
# Communication accounting
# --------------------------------------------------------------------------------------------------


def comm_bytes(mode: str, local_batch: int, dim: int, world_size: int, group_size: Optional[int] = None,
               dtype: torch.dtype = torch.float32, label_smoothing: float = 0.0) -> dict:
    """Bytes one rank sends and receives per loss step (forward and backward), in closed form.

    Same shard size ``local_batch`` on every rank (with uneven shards use the largest: shards are padded
    on the wire). Collectives are counted as a bandwidth-optimal ring moves them (see
    ``m2kernels.distributed.collectives``); the formulas are tabulated in docs/distributed.md.
    Returns ``{"forward": {"sent", "received"}, "backward": {...}, "total": {...}}``; sent == received.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, v in (("local_batch", local_batch), ("dim", dim), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "local_batch" else 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    W, b, D = world_size, local_batch, dim
    n = resolve_group_size(mode, group_size, W)
    e = torch.empty(0, dtype=dtype).element_size()
    a = torch.empty(0, dtype=acc_dtype(dtype)).element_size()
    L = torch.empty(0, dtype=LSE_DTYPE).element_size()   # log-sum-exps
    meta = (W - 1) * META_FIELDS * 8
    if mode == "grouped" or mode == "global" or n == W:
        P = n if mode == "grouped" else W              # ranks of the exact loss
        fwd = meta + (P - 1) * b * D * e + 4 * (P - 1) * b * L
        bwd = (P - 1) * a + (P - 1) * b * D * a
        if label_smoothing:
            fwd += (P - 1) * 2 * D * a
    else:
        G = W // n
        fwd = meta + G * ((n - 1) * b * D * e + 4 * (n - 1) * b * L) + (G - 1) * b * D * e + G * b * L
        bwd = ((W - 1) * a + G * ((n - 1) * (b * D * e + b * L) + (n - 1) * b * D * a)
               + (G - 1) * (b * D * e + b * L) + G * b * D * a)
        if label_smoothing:
            fwd += (W - 1) * 2 * D * a
    out = {"forward": {"sent": fwd, "received": fwd}, "backward": {"sent": bwd, "received": bwd}}
    out["total"] = {"sent": fwd + bwd, "received": fwd + bwd}
    return out

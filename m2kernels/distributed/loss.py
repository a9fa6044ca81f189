"""Distributed contrastive loss: the ``global``, ``ring``, ``hierarchical`` and ``grouped`` modes.

Notation (docs/distributed.md has the full algebra). A process group of W ranks; rank q holds b_q
image rows X_q and text rows Y_q; B = sum_q b_q; S = s X Y^T over the global batch; r_i / c_j are
the row / column log-sum-exps of S; eps the label smoothing. Rank q's share of the loss is

    L_q = W / (2B) * [ sum_{i in q} (r_i - (1-eps) S_ii - eps/B sum_j S_ij)
                     + sum_{j in q} (c_j - (1-eps) S_jj - eps/B sum_i S_ij) ]

so that mean_q L_q is the global loss. With upstream gradients g_q, backward computes the gradient of
Phi = sum_q g_q L_q: rank q receives dPhi/dX_q, dPhi/dY_q (= W times the gradient of the global loss
for g = 1: what DDP's averaging expects) and its part sum_{i in q} sum_j G_ij <x_i, y_j> of dPhi/ds
(the mean over ranks is the gradient of the global loss). With w_q = g_q W / (2B) per row/column,

    G_ij = w_i e^{S_ij - r_i} + w_j e^{S_ij - c_j} - 2 (1-eps) w_i delta_ij - eps/B (w_i + w_j).

The first two terms are ``softmax_grad``'s P; the rest is rank-1 or diagonal and added at the end.

One algorithm covers the three exact modes. The group is split into G sub-groups of n consecutive
ranks ("nodes"); text shards travel a ring between nodes (rank (k, l) sends to (k+1, l)), and inside a
node the n shards that are present are all-gathered into one block. ``global`` is n = W (one block,
kept for backward), ``ring`` is n = 1, ``hierarchical`` is anything in between. ``grouped`` runs
``global`` inside each sub-group.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from m2kernels.distributed import collectives as C
from m2kernels.distributed.topology import consecutive_subgroups, node_local_size, resolve_group
from m2kernels.ops.clip_loss import (
    _as_scalar_tensor,
    acc_dtype,
    check_finite_inputs,
    lse_pair,
    resolve_backend,
    softmax_grad,
)

MODES = ("global", "ring", "hierarchical", "grouped")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Metadata exchanged before any data: status, rows, dim, dtype, mode, group_size, label smoothing,
# logit scale (float64: all integers involved are exact).
META_FIELDS = 8


@dataclass
class _Plan:
    group: object          # the process group the exact loss spans (a sub-group for ``grouped``)
    inner: object          # node group (n ranks), None when n == 1
    cross: object          # ring between nodes (G ranks), None when G == 1
    world: int             # W: ranks of ``group``
    me: int                # this rank's index in ``group``
    n: int
    num: int               # G
    node: int              # k
    local: int             # l
    sizes: tuple           # rows on every rank of ``group``
    eps: float
    backend: str
    chunk_size: Optional[int]
    deterministic: bool

    @property
    def bmax(self) -> int:
        return max(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def node_sizes(self, k: int) -> list[int]:
        return [self.sizes[k * self.n + m] for m in range(self.n)]


def _pad(t: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_full((rows, *t.shape[1:]), value)
    out[:t.shape[0]] = t
    return out


def _valid(t: torch.Tensor, sizes: list[int], rows: int) -> torch.Tensor:
    """Rows of the members' valid parts from a padded block (member m at rows m*rows ...)."""
    if all(s == rows for s in sizes):
        return t
    return torch.cat([t[m * rows:m * rows + s] for m, s in enumerate(sizes)])


def _unvalid(t: torch.Tensor, sizes: list[int], rows: int, value: float = 0.0) -> torch.Tensor:
    """Inverse of :func:`_valid`: back to the padded layout, pads filled with ``value``."""
    if all(s == rows for s in sizes):
        return t.contiguous()
    out = t.new_full((len(sizes) * rows, *t.shape[1:]), value)
    o = 0
    for m, s in enumerate(sizes):
        out[m * rows:m * rows + s] = t[o:o + s]
        o += s
    return out


def lse_all_reduce(v: torch.Tensor, group) -> torch.Tensor:
    """Elementwise log-sum-exp of ``v`` over the ranks of ``group`` (max all-reduce, then sum)."""
    if dist.get_world_size(group) == 1:
        return v
    m = C.all_reduce(v.clone(), group, dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = C.all_reduce((v - m).exp(), group)
    return e.log() + m


class _ExactLoss(torch.autograd.Function):
    """Rank q's share L_q of the exact loss over ``plan.group``; backward as described above."""

    @staticmethod
    def forward(ctx, x, y, scale, plan: _Plan):
        acc = acc_dtype(x.dtype)
        s = scale.reshape(()).to(acc)
        s1 = s.reshape(1).contiguous()
        b, D = x.shape
        bmax, B, W, n = plan.bmax, plan.total, plan.world, plan.n
        x32, y32 = x.to(acc), y.to(acc)

        sums = None
        if plan.eps:
            local = torch.cat([x32.sum(0), y32.sum(0)])[None]
            sums = C.all_gather([local], plan.group)[0]          # W x 2D: per-rank X and Y sums

        r = torch.full((b,), float("-inf"), dtype=acc, device=x.device)
        carried_c = torch.full((bmax,), float("-inf"), dtype=acc, device=x.device)
        held = _pad(y, bmax)
        block = c_block = None
        for t in range(plan.num):
            kt = (plan.node - t) % plan.num
            handle = None
            if t < plan.num - 1:
                handle = C.ring_exchange_async([held], plan.cross)   # overlapped with this step's tiles
            bsizes = plan.node_sizes(kt)
            block_p = C.all_gather([held], plan.inner)[0] if n > 1 else held
            block = _valid(block_p, bsizes, bmax)
            if b and block.shape[0]:
                rr, cc = lse_pair(x, block, s1, plan.backend, plan.chunk_size)
                r = torch.logaddexp(r, rr)
            else:
                cc = torch.full((block.shape[0],), float("-inf"), dtype=acc, device=x.device)
            cc_p = _unvalid(cc, bsizes, bmax, float("-inf"))
            if n > 1:
                cc_p = lse_all_reduce(cc_p, plan.inner)
            carried_c = torch.logaddexp(carried_c, cc_p[plan.local * bmax:(plan.local + 1) * bmax])
            if plan.num == 1:
                c_block = _valid(cc_p, bsizes, bmax)
            if handle is not None:
                held = handle.wait()[0]
            if plan.num > 1:  # the column LSE travels with its shard; after G hops it is home
                carried_c = C.ring_exchange([carried_c], plan.cross)[0]
        c = carried_c[:b]

        diag = s * (x32 * y32).sum(1)
        rows = r - (1.0 - plan.eps) * diag
        cols = c - (1.0 - plan.eps) * diag
        if plan.eps:
            xsum, ysum = sums[:, :D].sum(0), sums[:, D:].sum(0)
            rows = rows - plan.eps * s * (x32 @ ysum) / B
            cols = cols - plan.eps * s * (y32 @ xsum) / B
        loss = (rows.sum() + cols.sum()) * (W / (2.0 * B))

        ctx.plan = plan
        ctx.save_for_backward(x, y, scale, r, c, sums if sums is not None else x.new_empty(0),
                              block if plan.num == 1 else x.new_empty(0),
                              c_block if plan.num == 1 else x.new_empty(0))
        return loss

    @staticmethod
    def backward(ctx, grad):
        plan: _Plan = ctx.plan
        x, y, scale, r, c, sums, block, c_block = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        s = scale.reshape(()).to(acc)
        s1 = s.reshape(1).contiguous()
        b, D = x.shape
        bmax, B, W, n, eps = plan.bmax, plan.total, plan.world, plan.n, plan.eps

        g = grad.reshape(1).to(acc)
        w = C.all_gather([g], plan.group)[0] * (W / (2.0 * B))      # per-rank weights w_q
        wp = w[plan.me]

        dx_acc = torch.zeros(b, D, dtype=acc, device=x.device)
        held, held_c = _pad(y, bmax), _pad(c, bmax, float("-inf"))
        carried = pending = None
        for t in range(plan.num):
            kt = (plan.node - t) % plan.num
            bsizes = plan.node_sizes(kt)
            handle = None
            if plan.num > 1:
                if t < plan.num - 1:
                    handle = C.ring_exchange_async([held, held_c], plan.cross)
                if n > 1:
                    block_p, cblock_p = C.all_gather([held, held_c], plan.inner)
                else:
                    block_p, cblock_p = held, held_c
                block, c_block = _valid(block_p, bsizes, bmax), _valid(cblock_p, bsizes, bmax)
            bw = torch.cat([w[kt * n + m].expand(sz) for m, sz in enumerate(bsizes)])
            if b and block.shape[0]:
                py, ptx = softmax_grad(x, block, s1, r, c_block, wp.expand(b).contiguous(), bw.contiguous(),
                                       plan.backend, plan.chunk_size, plan.deterministic)
                dx_acc += py
            else:
                ptx = torch.zeros(block.shape[0], D, dtype=acc, device=x.device)
            ptx_p = _unvalid(ptx, bsizes, bmax)
            mine = C.reduce_scatter([ptx_p], plan.inner)[0] if n > 1 else ptx_p
            if plan.num == 1:
                carried = mine
                continue
            # The dY accumulator travels with its shard and arrives home after G hops; each hop runs
            # while the next step's tiles are computed.
            carried = mine if pending is None else mine + pending.wait()[0]
            if handle is not None:
                held, held_c = handle.wait()
            pending = C.ring_exchange_async([carried], plan.cross)
        if pending is not None:
            carried = pending.wait()[0]

        x32, y32 = x.to(acc), y.to(acc)
        bx = dx_acc - 2.0 * (1.0 - eps) * wp * y32
        by = carried[:b] - 2.0 * (1.0 - eps) * wp * x32
        if eps:
            xs, ys = sums[:, :D], sums[:, D:]
            bx = bx - eps / B * (wp * ys.sum(0) + w @ ys)
            by = by - eps / B * (wp * xs.sum(0) + w @ xs)
        dscale = (x32 * bx).sum().reshape(scale.shape).to(scale.dtype)
        return (s * bx).to(x.dtype), (s * by).to(y.dtype), dscale, None


class _OwnTermsLoss(torch.autograd.Function):
    """``global``'s share L_q with open_clip's ``local_loss=True, gather_with_grad=False`` gradient.

    There the gathered features (the local rows' copies included) are constants: rank q gets g_q times
    the derivative of its own share through its rows' logits X_q Y_all^T (for X_q) and its columns'
    logits Y_q X_all^T (for Y_q) only, a truncated gradient, and ``ds_q = g_q dL_q/ds``. No label
    smoothing.
    """

    @staticmethod
    def forward(ctx, x, y, scale, plan: _Plan):
        return _ExactLoss.forward(ctx, x, y, scale, plan)

    @staticmethod
    def backward(ctx, grad):
        plan: _Plan = ctx.plan
        x, y, scale, r, c, _, y_all, c_all = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        s = scale.reshape(()).to(acc)
        s1 = s.reshape(1).contiguous()
        b, D = x.shape
        W, B, bmax = plan.world, plan.total, plan.bmax
        w = C.all_gather([grad.reshape(1).to(acc)], plan.group)[0] * (W / (2.0 * B))
        wp = w[plan.me]
        col_w = torch.cat([w[q].expand(sz) for q, sz in enumerate(plan.sizes)]).contiguous()
        zeros_b = torch.zeros(b, dtype=acc, device=x.device)
        args = (plan.backend, plan.chunk_size, plan.deterministic)
        if b:
            # rows of q against every column (row softmax), and every column's softmax over q's rows
            row_y, _ = softmax_grad(x, y_all, s1, r, c_all, wp.expand(b).contiguous(),
                                    torch.zeros_like(col_w), *args)
            _, col_x = softmax_grad(x, y_all, s1, r, c_all, zeros_b, col_w, *args)
        else:
            row_y = torch.zeros(0, D, dtype=acc, device=x.device)
            col_x = torch.zeros(B, D, dtype=acc, device=x.device)
        sizes = list(plan.sizes)
        col_home = C.reduce_scatter([_unvalid(col_x, sizes, bmax)], plan.group)[0][:b]
        x32, y32 = x.to(acc), y.to(acc)
        # X_q enters only its rows' logits, Y_q only its columns' (their gathered copies are constants)
        bx = row_y - wp * y32
        by = col_home - wp * x32
        dscale = ((x32 * row_y).sum() + (y32 * col_home).sum() - 2.0 * wp * (x32 * y32).sum())
        return (s * bx).to(x.dtype), (s * by).to(y.dtype), dscale.reshape(scale.shape).to(scale.dtype), None


# --------------------------------------------------------------------------------------------------
# Validation: every rank learns about every rank's problem before any data moves
# --------------------------------------------------------------------------------------------------


def _check_local(group, image_features, text_features, logit_scale, logit_bias, label_smoothing, backend,
                 chunk_size, check_finite):
    """Local checks; returns (error message or None, prepared tuple or None)."""
    try:
        if (dist.get_backend(group) == "nccl" and torch.is_tensor(image_features)
                and image_features.device.type != "cuda"):
            raise ValueError(f"the process group uses NCCL but the features are on {image_features.device}")
        for name, t in (("image_features", image_features), ("text_features", text_features)):
            if not torch.is_tensor(t):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _DTYPES:
                raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
            if t.dim() != 2:
                raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        x, y = image_features, text_features
        if x.device != y.device:
            raise ValueError(f"image_features are on {x.device} but text_features are on {y.device}")
        if x.dtype != y.dtype:
            raise TypeError(f"image_features ({x.dtype}) and text_features ({y.dtype}) must have the "
                            "same dtype")
        if x.shape != y.shape:
            raise ValueError(f"image_features {tuple(x.shape)} and text_features {tuple(y.shape)} must have "
                             "the same shape; pairs are matched by row")
        if x.shape[1] == 0:
            raise ValueError("feature size is 0")
        scale = _as_scalar_tensor(logit_scale, "logit_scale", x)
        bias = None if logit_bias is None else _as_scalar_tensor(logit_bias, "logit_bias", x)
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
        if math.isnan(label_smoothing) or not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if check_finite:
            check_finite_inputs(image_features=x, text_features=y, logit_scale=scale, logit_bias=bias)
        backend = resolve_backend(backend, x.device, x.dtype)
        x = x if x.stride(-1) == 1 or x.shape[0] == 0 else x.contiguous()
        y = y if y.stride(-1) == 1 or y.shape[0] == 0 else y.contiguous()
        return None, (x, y, scale, bias, float(label_smoothing), backend)
    except (TypeError, ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}", None


def _meta_device(group, features) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_meta(group, err, prepared, mode, group_size):
    me, W = dist.get_rank(group), dist.get_world_size(group)
    meta = torch.zeros(META_FIELDS, dtype=torch.float64)
    meta[0] = 1.0 if err else 0.0
    meta[4] = MODES.index(mode)
    meta[5] = group_size
    if prepared is not None:
        x, _, scale, _, eps, _ = prepared
        meta[1], meta[2] = x.shape[0], x.shape[1]
        meta[3] = _DTYPES.index(x.dtype)
        meta[6] = eps
        meta[7] = float(scale.detach().reshape(()).double())
    meta = meta.to(_meta_device(group, prepared[0] if prepared else None))
    allm = C.all_gather([meta[None]], group)[0].cpu()
    bad = [q for q in range(W) if allm[q, 0] != 0]
    if bad:
        where = f"rank {me}: {err}" if err else f"ranks {bad} of the process group"
        raise ValueError(f"invalid inputs to the distributed clip loss on {where} "
                         f"(every rank raises this error; bad ranks: {bad})")

    def differ(col):
        v = allm[:, col]
        same = (v == v[0]) | (torch.isnan(v) & torch.isnan(v[0]))
        return not bool(same.all())

    if differ(2):
        raise ValueError(f"feature sizes differ across ranks: {[int(d) for d in allm[:, 2]]} "
                         "(every rank raises this error)")
    if differ(3):
        raise TypeError(f"feature dtypes differ across ranks: {[str(_DTYPES[int(d)]) for d in allm[:, 3]]} "
                        "(every rank raises this error)")
    if differ(4) or differ(5):
        pairs = [(MODES[int(m)], int(n)) for m, n in allm[:, 4:6]]
        raise ValueError(f"ranks disagree on (mode, group_size): {pairs}")
    if differ(6):
        raise ValueError(f"ranks disagree on label_smoothing: {allm[:, 6].tolist()}")
    if differ(7):
        raise ValueError(f"logit_scale differs across ranks: {allm[:, 7].tolist()}; it must be replicated")
    return tuple(int(v) for v in allm[:, 1])


# --------------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------------


def _resolve_group_size(mode, group_size, world):
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
                          deterministic: bool = False, check_finite: bool = False,
                          _own_terms_gradient: bool = False) -> torch.Tensor:
    """This rank's share of the contrastive loss over a process group (see docs/distributed.md).

    ``mode``: ``"global"``, ``"ring"``, ``"hierarchical"`` (exact global-batch loss) or ``"grouped"``
    (the loss of each sub-group of ``group_size`` consecutive ranks: a different objective unless the
    sub-group is the whole group). ``group``: the process group (default WORLD). ``group_size``: ranks per
    sub-group for ``hierarchical``/``grouped`` (default ``LOCAL_WORLD_SIZE``).

    The mean over ranks of the returned values is the loss; after ``backward()`` each rank's feature
    gradients are W times the loss's gradient with respect to its local features (W = ranks of ``group``)
    and the mean over ranks of the logit-scale gradients is the loss's gradient. Local batch sizes may
    differ, and may be 0 on some ranks as long as the batch of every loss (the group's, or each
    sub-group's for ``grouped``) is non-empty; otherwise every rank raises ``ValueError``.
    Every rank of ``group`` must call this, with the same mode, group_size, label_smoothing and logit_scale.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    group = resolve_group(group)
    world = dist.get_world_size(group)
    err, prepared = _check_local(group, image_features, text_features, logit_scale, logit_bias,
                                 label_smoothing, backend, chunk_size, check_finite)
    try:  # e.g. LOCAL_WORLD_SIZE unset or not dividing the group on this rank only: all ranks raise
        n = _resolve_group_size(mode, group_size, world)
    except ValueError as e:
        n, err, prepared = 0, err or f"ValueError: {e}", None
    sizes = _exchange_meta(group, err, prepared, mode, n)
    x, y, scale, bias, eps, backend = prepared

    if mode == "grouped" or mode == "global" or n == world:
        if mode == "grouped" and n < world:
            empty = [k for k in range(world // n) if sum(sizes[k * n:(k + 1) * n]) == 0]
            if empty:  # every rank knows every size: all raise, none waits for an empty sub-group
                raise ValueError(f"mode='grouped': the batch of sub-group(s) {empty} (of {n} consecutive "
                                 "ranks each) is empty on all its ranks")
            sub = consecutive_subgroups(n, group, with_cross=False)
            sub_sizes = tuple(sizes[sub.index * n:(sub.index + 1) * n])
            plan = _Plan(sub.inner, sub.inner, None, n, sub.local_rank, n, 1, 0, sub.local_rank, sub_sizes,
                         eps, backend, chunk_size, deterministic)
        else:
            me = dist.get_rank(group)
            plan = _Plan(group, group, None, world, me, world, 1, 0, me, sizes, eps, backend, chunk_size,
                         deterministic)
    else:  # ring (n == 1) or hierarchical
        sub = consecutive_subgroups(n, group)
        plan = _Plan(group, sub.inner if n > 1 else None, sub.cross, world, dist.get_rank(group), n,
                     sub.num_groups, sub.index, sub.local_rank, sizes, eps, backend, chunk_size,
                     deterministic)
    if plan.total == 0:
        raise ValueError("the global batch is empty on every rank of the process group")
    if _own_terms_gradient:  # open_clip's local_loss=True, gather_with_grad=False (see open_clip_loss)
        if mode != "global" or eps:
            raise ValueError("open_clip's truncated gradient (local_loss=True, gather_with_grad=False) is "
                             "available for mode='global' without label smoothing")
        loss = _OwnTermsLoss.apply(x, y, scale, plan)
    else:
        loss = _ExactLoss.apply(x, y, scale, plan)
    if bias is not None:
        loss = loss + (bias - bias).reshape(()).to(loss.dtype)  # NaN/Inf bias -> NaN loss, grad 0
    return loss


# --------------------------------------------------------------------------------------------------
# open_clip's semantics (local_loss / gather_with_grad)
# --------------------------------------------------------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


_WARNED = set()


def open_clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, local_loss: bool,
                   gather_with_grad: bool, group=None, **kwargs) -> torch.Tensor:
    """open_clip's ``ClipLoss(local_loss, gather_with_grad, world_size > 1)`` semantics on our kernels.

    * ``local_loss=True``: this rank's share (mode ``global``). With ``gather_with_grad=False`` open_clip
      drops the gradient that flows through the other ranks' losses (the gathered features are
      constants); that truncated gradient is reproduced, with a one-time warning that it is not the
      gradient of the loss (no label smoothing there).
    * ``local_loss=False``: the full global loss on every rank. ``gather_with_grad=True``: feature
      gradients are W times the loss's gradient (as open_clip); ``gather_with_grad=False``: 1 times
      (as open_clip, whose gathered copies carry no gradient). Exact for equal upstream gradients on
      all ranks (the usual case); otherwise the mean upstream gradient is used.
    """
    group = resolve_group(group)
    world = dist.get_world_size(group)
    if local_loss:
        if not gather_with_grad and "local_no_grad" not in _WARNED:
            _WARNED.add("local_no_grad")
            warnings.warn("ClipLoss(local_loss=True, gather_with_grad=False) reproduces open_clip's "
                          "truncated gradient (the other ranks' features are constants), which is not the "
                          "gradient of the loss; gather_with_grad=True gives the exact one",
                          stacklevel=3)
        return distributed_clip_loss(image_features, text_features, logit_scale, logit_bias, mode="global",
                                     group=group, _own_terms_gradient=not gather_with_grad, **kwargs)
    if not gather_with_grad and torch.is_tensor(image_features) and torch.is_tensor(text_features):
        image_features = _ScaleGrad.apply(image_features, 1.0 / world)
        text_features = _ScaleGrad.apply(text_features, 1.0 / world)
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
    n = _resolve_group_size(mode, group_size, W)
    e = torch.empty(0, dtype=dtype).element_size()
    a = torch.empty(0, dtype=acc_dtype(dtype)).element_size()
    meta = (W - 1) * META_FIELDS * 8
    if mode == "grouped" or mode == "global" or n == W:
        P = n if mode == "grouped" else W              # ranks of the exact loss
        fwd = meta + (P - 1) * b * D * e + 4 * (P - 1) * b * a
        bwd = (P - 1) * a + (P - 1) * b * D * a
        if label_smoothing:
            fwd += (P - 1) * 2 * D * a
    else:
        G = W // n
        fwd = meta + G * ((n - 1) * b * D * e + 4 * (n - 1) * b * a) + (G - 1) * b * D * e + G * b * a
        bwd = ((W - 1) * a + G * ((n - 1) * (b * D * e + b * a) + (n - 1) * b * D * a)
               + (G - 1) * (b * D * e + b * a) + G * b * D * a)
        if label_smoothing:
            fwd += (W - 1) * 2 * D * a
    out = {"forward": {"sent": fwd, "received": fwd}, "backward": {"sent": bwd, "received": bwd}}
    out["total"] = {"sent": fwd + bwd, "received": fwd + bwd}
    return out

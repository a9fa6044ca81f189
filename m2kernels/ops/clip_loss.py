"""The softmax contrastive (CLIP / ITC) loss: block primitives, the shared epilogue, the custom op.

Notation: image features X (M x D), text features Y (N x D), scale s (already exponentiated),
``S = s X Y^T``; r_i / c_j the row / column log-sum-exps; eps the label smoothing. For a batch of B pairs

    loss = 1/(2B) sum_i [r_i - (1-eps) S_ii - eps/B sum_j S_ij] + 1/(2B) sum_j [c_j - (1-eps) S_jj - eps/B sum_i S_ij]

and with per-row weights w (``g/(2B)`` for an upstream gradient g) its gradient is

    G_ij = w_i e^(S_ij - r_i) + w_j e^(S_ij - c_j) - 2 (1-eps) w_i [i = j] - eps/B (w_i + w_j),
    dX = s G Y,  dY = s G^T X,  ds = sum_ij G_ij <x_i, y_j>.

Two block primitives carry all the B x B work, for any block of rows against any block of columns
(the distributed modes in ``m2kernels.distributed`` call them on gathered or travelling blocks):

* ``lse_block``: one pass over S (row chunks sized from the memory budget): row and column
  log-sum-exps, the diagonal, optionally the dot products kept for the backward (``keep_dots``).
* ``grad_block``: G written chunk by chunk in the input dtype (one pass: S recomputed, or read back
  from the kept dot products), then ``G Y`` and ``G^T X`` as fp32-accumulating matmuls (two passes).

Passes over S: forward 1, backward 3 (2 with kept dot products): 4 in all, or 3 on the fast path.

``loss_sums`` and ``clip_weights`` are the epilogue every mode shares: the per-row and per-column loss
terms from the log-sum-exps, and the weights of G. The single-process loss is the custom op
``m2kernels::clip_loss_fwd`` / ``clip_loss_bwd`` (fake kernels and a registered autograd formula:
``torch.compile(fullgraph=True)`` keeps it in the graph). Every op implementation runs with autocast
disabled: the loss accumulates in fp32 whatever the surrounding autocast region says.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from m2kernels.ops import clip_torch
from m2kernels.ops.tiling import (
    G_STORAGE_SCALE,
    LSE_DTYPE,
    acc_dtype,
    autocast_disabled,
    chunk_rows,
    grad_matmuls,
    hi_lo,
    storage_dtype,
)


class BlockOptions(NamedTuple):
    """How the block primitives run: resolved backend, memory budget (bytes), rows per chunk override."""

    backend: str
    memory_budget: int
    chunk_size: Optional[int] = None


class Weights(NamedTuple):
    """The weights of ``G_ij = a_i e^(S_ij - r_i) + b_j e^(S_ij - c_j) - d_i [j = i + off] - u_i - v_j``
    (fp32 vectors; ``d``, ``u``/``v`` may be None)."""

    a: torch.Tensor
    b: torch.Tensor
    d: Optional[torch.Tensor] = None
    u: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None


# Bytes of chunk temporaries per logits element (used to size the row chunks).
_FWD_BYTES = {"triton": 8.0 / 64, "torch": 16.0}
_GRAD_BYTES = {"triton": 0.0, "torch": 12.0}  # plus the stored G itself


def _kernels():
    from m2kernels.ops import clip_kernels  # Triton is imported only where the triton backend runs

    return clip_kernels


def lse_block(x, y, scale, diag_offset: Optional[int], opts: BlockOptions, keep_dots: bool = False):
    """Row LSE (M), column LSE (N) (both float64), diagonal (M, accumulation dtype; NaN where row i's
    positive is outside the block) and, with ``keep_dots``, the fp32 dot products ``x @ y.T`` (M x N)
    of ``S = scale * x @ y.T``."""
    m, n = x.shape[0], y.shape[0]
    if opts.backend == "reference":
        r, c, diag = clip_torch.reference_lse(x, y, scale, diag_offset)
        return r, c, diag, (x.double() @ y.double().T).to(r.dtype) if keep_dots else None
    acc = acc_dtype(x.dtype)
    dots = torch.empty(m, n, device=x.device, dtype=acc) if keep_dots else None
    step = chunk_rows(m, n, _FWD_BYTES[opts.backend], opts.memory_budget, opts.chunk_size)
    chunk = _kernels().lse_tiles if opts.backend == "triton" else clip_torch.lse_chunk
    if step >= m:
        r, c, diag = chunk(x, y, scale, diag_offset, dots)
        return r, c, diag, dots
    r = torch.empty(m, device=x.device, dtype=LSE_DTYPE)
    diag = torch.empty(m, device=x.device, dtype=acc)
    c = None
    for i0 in range(0, m, step):
        i1 = min(m, i0 + step)
        rr, cc, dd = chunk(x[i0:i1], y, scale, None if diag_offset is None else diag_offset + i0,
                           None if dots is None else dots[i0:i1])
        r[i0:i1], diag[i0:i1] = rr, dd
        c = cc if c is None else torch.logaddexp(c, cc)
    return r, c, diag, dots


def _pair(v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A float64 LSE vector as the (2, n) (hi, lo) pair the chunk functions take."""
    if acc == torch.float64:
        return torch.stack([v, torch.zeros_like(v)])
    return hi_lo(v)


def _normalised(w: Weights) -> tuple[Weights, torch.Tensor]:
    """Weights divided by the power of two at or below their largest magnitude (a device scalar, no
    host sync; exact, no rounding): G then stays within [-8, 8] whatever the upstream gradient, which
    its fp16 storage needs."""
    if not (w.a.numel() and w.b.numel()):
        return w, torch.ones((), device=w.a.device, dtype=w.a.dtype)
    top = torch.maximum(w.a.abs().amax(), w.b.abs().amax())
    norm = torch.where((top > 0) & torch.isfinite(top), torch.exp2(torch.floor(torch.log2(top))),
                       torch.ones_like(top))
    inv = 1.0 / norm
    return Weights(*(None if t is None else t * inv for t in w)), norm


def grad_block(x, y, scale, r, c, weights: Weights, diag_offset: Optional[int], opts: BlockOptions,
               dots: Optional[torch.Tensor] = None, split: bool = False):
    """``(G Y, G^T X, sum_ij G_ij <x_i, y_j>)`` in fp32 for this block (not yet multiplied by s).

    ``dots``: the forward's kept dot products (no recompute). With ``split`` the row part of G
    (weights ``a``, ``d``) goes to the first product and the column part (``b``, ``d``) to the second,
    and the scale-gradient sum covers the row part only (open_clip's truncated ``local_loss`` gradient;
    two passes of G, no label smoothing).
    """
    if split:
        zero_a, zero_b = torch.zeros_like(weights.a), torch.zeros_like(weights.b)
        gy, _, ds = _grad_block(x, y, scale, r, c, Weights(weights.a, zero_b, weights.d), diag_offset, opts,
                                dots, (True, False))
        _, gtx, _ = _grad_block(x, y, scale, r, c, Weights(zero_a, weights.b, weights.d), diag_offset, opts,
                                dots, (False, True))
        return gy, gtx, ds
    return _grad_block(x, y, scale, r, c, weights, diag_offset, opts, dots, (True, True))


def _grad_block(x, y, scale, r, c, weights, diag_offset, opts, dots, want):
    m, n = x.shape[0], y.shape[0]
    acc = acc_dtype(x.dtype)
    if opts.backend == "reference":
        a, b, d, u, v = weights
        g, dd = clip_torch.reference_grad(x, y, scale, r, c, a, b, d, u, v, diag_offset)
        return (g @ y.double()).to(acc), (g.T @ x.double()).to(acc), (g * dd).sum().to(acc)
    w, norm = _normalised(weights)
    gdt = storage_dtype(x.dtype)
    g_bytes = torch.empty((), dtype=gdt).element_size()
    step = chunk_rows(m, n, _GRAD_BYTES[opts.backend] + g_bytes, opts.memory_budget, opts.chunk_size)
    tiles = _kernels().grad_tiles if opts.backend == "triton" else clip_torch.grad_chunk
    r, c = _pair(r, acc), _pair(c, acc)

    def fill(i0, i1, g):
        return tiles(x[i0:i1], y, scale, r[:, i0:i1].contiguous(), c, w.a[i0:i1], w.b,
                     None if w.d is None else w.d[i0:i1], None if w.u is None else w.u[i0:i1], w.v, g,
                     None if diag_offset is None else diag_offset + i0, None if dots is None else dots[i0:i1])

    dx, dy, ds = grad_matmuls(x, y, step, gdt, fill, torch.zeros((), device=x.device, dtype=acc), want)
    unscale = norm / G_STORAGE_SCALE[gdt]
    return dx.mul_(unscale), dy.mul_(unscale), ds * norm


# --------------------------------------------------------------------------------------------------
# The epilogue shared by every mode
# --------------------------------------------------------------------------------------------------


def rowdot(x: torch.Tensor, v: torch.Tensor, budget: int) -> torch.Tensor:
    """``x @ v`` (fp32 result, fp32 products) for 16-bit ``x`` without an fp32 copy of all of x."""
    acc = acc_dtype(x.dtype)
    step = chunk_rows(x.shape[0], x.shape[1], 4.0, budget)
    return torch.cat([x[i:i + step].to(acc) @ v for i in range(0, x.shape[0], step)]) if x.shape[0] else \
        x.new_zeros(0, dtype=acc)


def loss_sums(r, c, diag, x, y, scale, eps: float, total: int, xsum=None, ysum=None,
              budget: int = 1 << 28) -> torch.Tensor:
    """``sum_i [r_i - (1-eps) S_ii - eps/B sum_j S_ij] + sum_j [c_j - (1-eps) S_jj - eps/B sum_i S_ij]``
    over this block's rows (r) and columns (c), whose positives are ``diag``. ``xsum``/``ysum``: the
    sums of all B image / text features (needed for label smoothing only)."""
    rows = r - (1.0 - eps) * diag
    cols = c - (1.0 - eps) * diag
    if eps:
        rows = rows - (eps / total) * scale * rowdot(x, ysum, budget)
        cols = cols - (eps / total) * scale * rowdot(y, xsum, budget)
    return (rows.sum() + cols.sum()).to(acc_dtype(x.dtype))


def clip_weights(row_w: torch.Tensor, col_w: torch.Tensor, eps: float, total: int,
                 truncated: bool = False) -> Weights:
    """G's weights from the per-row and per-column loss weights (``g/(2B)`` in one process).

    ``truncated``: open_clip's ``local_loss=True, gather_with_grad=False`` gradient, where each part
    carries its own diagonal (weight w_i, not 2 w_i) and there is no label smoothing.
    """
    if truncated:
        return Weights(row_w, col_w, row_w)
    smooth = eps / total
    return Weights(row_w, col_w, 2.0 * (1.0 - eps) * row_w,
                   smooth * row_w if eps else None, smooth * col_w if eps else None)


def feature_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(0, dtype=acc_dtype(t.dtype))


# --------------------------------------------------------------------------------------------------
# The single-process loss as torch.library custom ops
# --------------------------------------------------------------------------------------------------


def check_finite_inputs(**tensors) -> None:
    """``check_finite=True``: raise on NaN/Inf (inside the op: a data-dependent check torch.compile
    does not have to trace)."""
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")


@torch.library.custom_op("m2kernels::clip_loss_fwd", mutates_args=())
def _clip_loss_fwd(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                   label_smoothing: float, backend: str, memory_budget: int, chunk_size: int,
                   store_logits: bool, check_finite: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if check_finite:
        check_finite_inputs(image_features=x, text_features=y, logit_scale=scale, logit_bias=bias)
    opts = BlockOptions(backend, memory_budget, chunk_size or None)
    with autocast_disabled(x.device):
        acc = acc_dtype(x.dtype)
        s = scale.reshape(1).to(acc)
        r, c, diag, dots = lse_block(x, y, s, 0, opts, keep_dots=store_logits)
        eps = label_smoothing
        total = x.shape[0]
        xsum, ysum = (feature_sum(x), feature_sum(y)) if eps else (None, None)
        loss = loss_sums(r, c, diag, x, y, s.reshape(()), eps, total, xsum, ysum, memory_budget) / (2 * total)
        if bias is not None:  # shift-invariant: the bias changes nothing, but NaN/Inf must show
            loss = loss + (bias - bias).reshape(()).to(loss.dtype)
    return loss, r, c, dots if dots is not None else x.new_empty(0, dtype=acc)


@_clip_loss_fwd.register_fake
def _(x, y, scale, bias, label_smoothing, backend, memory_budget, chunk_size, store_logits, check_finite):
    f32 = dict(device=x.device, dtype=acc_dtype(x.dtype))
    f64 = dict(device=x.device, dtype=LSE_DTYPE)
    dots = torch.empty(x.shape[0], y.shape[0], **f32) if store_logits else torch.empty(0, **f32)
    return torch.empty((), **f32), torch.empty(x.shape[0], **f64), torch.empty(y.shape[0], **f64), dots


@torch.library.custom_op("m2kernels::clip_loss_bwd", mutates_args=())
def _clip_loss_bwd(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                   r: torch.Tensor, c: torch.Tensor, dots: torch.Tensor, label_smoothing: float, backend: str,
                   memory_budget: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = BlockOptions(backend, memory_budget, chunk_size or None)
    with autocast_disabled(x.device):
        n = x.shape[0]
        acc = acc_dtype(x.dtype)
        s = scale.reshape(1).to(acc)
        w = (grad.reshape(1).to(acc) / (2 * n)).expand(n).contiguous()
        weights = clip_weights(w, w, label_smoothing, n)
        gy, gx, ds = grad_block(x, y, s, r, c, weights, 0, opts, dots if dots.numel() else None)
        dscale = ds.reshape(scale.shape).to(scale.dtype)
        return (gy.mul_(s)).to(x.dtype), (gx.mul_(s)).to(y.dtype), dscale


@_clip_loss_bwd.register_fake
def _(grad, x, y, scale, r, c, dots, label_smoothing, backend, memory_budget, chunk_size):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, y, scale, bias, label_smoothing, backend, memory_budget, chunk_size, _store, _check = inputs
    _, r, c, dots = output
    # only the loss has a gradient: without this, autograd would fill B x B zeros for ``dots``
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, y, scale, r, c, dots, bias if bias is not None else x.new_empty(0))
    ctx.opts = (label_smoothing, backend, memory_budget, chunk_size)


def _backward(ctx, grad_loss, _grad_r, _grad_c, _grad_dots):
    if grad_loss is None:  # not materialised (see _setup_context): nothing flows back
        return (None,) * 10
    x, y, scale, r, c, dots, bias = ctx.saved_tensors
    dx, dy, ds = torch.ops.m2kernels.clip_loss_bwd(grad_loss, x, y, scale, r, c, dots, *ctx.opts)
    dbias = torch.zeros_like(bias) if ctx.has_bias else None  # exactly 0: the loss is shift-invariant
    return dx, dy, ds, dbias, None, None, None, None, None, None


torch.library.register_autograd("m2kernels::clip_loss_fwd", _backward, setup_context=_setup_context)


def clip_loss_single(x, y, scale, bias, label_smoothing: float, backend: str, memory_budget: int,
                     chunk_size: Optional[int], store_logits: bool, check_finite: bool) -> torch.Tensor:
    """The single-process loss on validated inputs (the functional layer's local path)."""
    loss, _, _, _ = torch.ops.m2kernels.clip_loss_fwd(x, y, scale, bias, label_smoothing, backend,
                                                      memory_budget, chunk_size or 0, store_logits, check_finite)
    return loss

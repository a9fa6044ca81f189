"""The torch backend of the softmax contrastive loss: the Triton kernels' twins in plain PyTorch.

Same signatures and the same results as ``clip_kernels.lse_tiles`` / ``grad_tiles`` (up to rounding),
for one row chunk at a time: the caller (``clip_loss.lse_block`` / ``grad_block``) sizes the chunks so
that these temporaries (about three chunk x N fp32 buffers) stay within the memory budget. The
products ``x @ y.T`` go through ``tiling.mm_f32``: on CUDA, 16-bit inputs stay 16-bit with fp32
results; on the CPU they are upcast. ``reference_*`` are the dense float64 versions (``backend=
"reference"``).
"""

from __future__ import annotations

import torch

from m2kernels.ops.tiling import G_STORAGE_SCALE, LSE_DTYPE, acc_dtype, count_pass, merge_lse, mm_f32


def _diag_rows(m: int, n: int, offset: int) -> tuple[int, int]:
    """Rows i whose positive column i + offset lies in [0, n): the range [lo, hi)."""
    lo = max(0, -offset)
    hi = min(m, n - offset)
    return lo, max(lo, hi)


def lse_chunk(x, y, scale, diag_offset=None, dots=None):
    """Row/column log-sum-exps and diagonal of ``S = scale * x @ y.T`` (see ``lse_tiles``)."""
    m, n = x.shape[0], y.shape[0]
    count_pass("recompute", m, n)
    prod = mm_f32(x, y.T)
    if dots is not None:
        dots.copy_(prod)
    s = prod.mul_(scale)
    diag = torch.full((m,), float("nan"), device=x.device, dtype=s.dtype)
    if diag_offset is not None:
        lo, hi = _diag_rows(m, n, diag_offset)
        if hi > lo:
            diag[lo:hi] = torch.diagonal(s[lo:hi, lo + diag_offset:hi + diag_offset])
    return _lse(s, 1), _lse(s, 0), diag


def _lse(s: torch.Tensor, dim: int) -> torch.Tensor:
    """float64 log-sum-exp of fp32 ``s`` along ``dim`` (the max and the fp32 sum, combined in float64)."""
    if s.dtype == torch.float64:
        return torch.logsumexp(s, dim)
    m = s.amax(dim, keepdim=True)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return merge_lse(safe, (s - safe).exp_().sum(dim, keepdim=True), dim).to(LSE_DTYPE)


def grad_chunk(x, y, scale, r, c, a, b, d, u, v, g_out, diag_offset=None, dots=None):
    """``G_SCALE * G`` into ``g_out``; returns sum G <x, y> (see ``grad_tiles``)."""
    m, n = x.shape[0], y.shape[0]
    if dots is None:
        count_pass("recompute", m, n)
        dots = mm_f32(x, y.T)
    s = dots * scale
    col = (s - c[0][None, :]).sub_(c[1][None, :]).exp_().mul_(b[None, :])  # (hi, lo): tiling.hi_lo
    g = s.sub_(r[0][:, None]).sub_(r[1][:, None]).exp_().mul_(a[:, None]).add_(col)
    del col
    if diag_offset is not None and d is not None:
        lo, hi = _diag_rows(m, n, diag_offset)
        if hi > lo:
            torch.diagonal(g[lo:hi, lo + diag_offset:hi + diag_offset]).sub_(d[lo:hi])
    if u is not None:
        g.sub_(u[:, None]).sub_(v[None, :])
    ds = (g * dots).sum()  # a cascaded sum: as exact as autograd's for dense logits
    g_out.copy_(g.mul_(G_STORAGE_SCALE[g_out.dtype]))
    return ds


def reference_lse(x, y, scale, diag_offset=None):
    """Dense float64 ``lse_chunk`` (results in the accumulation dtype)."""
    acc = acc_dtype(x.dtype)
    s = scale.double() * (x.double() @ y.double().T)
    m, n = s.shape
    diag = torch.full((m,), float("nan"), device=x.device, dtype=torch.float64)
    if diag_offset is not None:
        lo, hi = _diag_rows(m, n, diag_offset)
        if hi > lo:
            diag[lo:hi] = torch.diagonal(s[lo:hi, lo + diag_offset:hi + diag_offset])
    return torch.logsumexp(s, 1), torch.logsumexp(s, 0), diag.to(acc)


def reference_grad(x, y, scale, r, c, a, b, d, u, v, diag_offset=None):
    """Dense float64 G and the dot products."""
    dots = x.double() @ y.double().T
    s = scale.double() * dots
    g = a.double()[:, None] * (s - r.double()[:, None]).exp() + b.double()[None, :] * (s - c.double()[None, :]).exp()
    m, n = s.shape
    lo, hi = (0, 0) if diag_offset is None or d is None else _diag_rows(m, n, diag_offset)
    if hi > lo:
        torch.diagonal(g[lo:hi, lo + diag_offset:hi + diag_offset]).sub_(d.double()[lo:hi])
    if u is not None:
        g = g - u.double()[:, None] - v.double()[None, :]
    return g, dots

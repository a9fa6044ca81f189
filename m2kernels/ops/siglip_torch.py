"""The torch backend of the sigmoid (SigLIP) loss: the Triton kernel's twin in plain PyTorch.

Same signature and the same results as ``siglip_kernels.siglip_tiles`` (up to rounding), for one row
chunk at a time: the caller (``siglip_loss.siglip_block``) sizes the chunks so that these temporaries
(two chunk x N buffers in the accumulation dtype, besides G) stay within the memory budget. The
products ``x @ y.T`` go through ``tiling.mm_f32``. ``reference_block`` is the dense float64 version
(``backend="reference"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m2kernels.ops.tiling import G_STORAGE_SCALE, count_pass, mm_f32


def _positives(t: torch.Tensor, offset) -> torch.Tensor:
    """The entries (i, i + offset) of an M x N chunk: row i's positive, where it lies in the chunk."""
    return torch.diagonal(t, offset) if offset is not None and -t.shape[0] < offset < t.shape[1] else t[:0, 0]


def _softplus_sum(u: torch.Tensor) -> torch.Tensor:
    """sum softplus(u), accurate for tiny terms (log1p) and for huge u (the threshold returns u, whose
    dropped log1p(e^-u) is below fp32's rounding of u)."""
    return F.softplus(u, threshold=20.0 if u.dtype != torch.float64 else 40.0).sum()


def siglip_chunk(x, y, scale, bias, diag_offset=None, g_out=None, want_loss=True):
    """``[loss, dt]`` of the chunk and ``G_SCALE * G`` into ``g_out`` (see ``siglip_tiles``)."""
    m, n = x.shape[0], y.shape[0]
    count_pass("recompute", m, n)
    u = mm_f32(x, y.T).mul_(scale).add_(bias)  # z, then u = -l z in place
    _positives(u, diag_offset).neg_()
    sums = torch.zeros(2, device=x.device, dtype=u.dtype)
    if want_loss:
        sums[0] = _softplus_sum(u)
    if g_out is None:
        return sums
    # sigmoid(u) straight into G where it is stored in the accumulation dtype (then unscaled)
    g = torch.sigmoid(u, out=g_out) if g_out.dtype == u.dtype else u.sigmoid_()
    del u
    _positives(g, diag_offset).neg_()  # G = -l sigmoid(u)
    sums[1] = g.sum()
    if g is not g_out:
        g_out.copy_(g.mul_(G_STORAGE_SCALE[g_out.dtype]))
    return sums


def reference_block(x, y, scale, bias, diag_offset=None, want_grad=False):
    """Dense float64 ``(loss, G Y, G^T X, sum G dots, sum G)`` of the block (fp64; the products None
    without ``want_grad``)."""
    dots = x.double() @ y.double().T
    z = scale.double() * dots + bias.double()
    labels = -torch.ones_like(z)
    _positives(labels, diag_offset).fill_(1.0)
    loss = -F.logsigmoid(labels * z).sum()
    if not want_grad:
        return loss, None, None, None, None
    g = -labels * torch.sigmoid(-labels * z)
    return loss, g @ y.double(), g.T @ x.double(), (g * dots).sum(), g.sum()


"""Triton kernel of the sigmoid (SigLIP) loss and its launcher.

One kernel, one program per BLOCK_M x BLOCK_N tile in grouped order: a tile of the dot products
(``tiling.score_tile``), then in registers ``z = s dots + t``, the label ``l = +1`` where column j is
row i's positive (``j = i + diag_offset``) and -1 elsewhere, and with ``u = -l z``

* the tile's sum of ``softplus(u) = -logsigmoid(l z)`` (``WANT_LOSS``), and
* the loss gradient with unit weight ``G = d softplus(-l z) / dz = -l sigmoid(u)``, written in the
  input dtype times ``G_SCALE`` for the matmuls ``G Y`` and ``G^T X`` that cuBLAS runs after it, with
  the tile's sum of G (the bias gradient) from the fp32 values (``WRITE_G``). The scale gradient
  ``sum G_ij <x_i, y_j> = sum_i <x_i, (G Y)_i>`` is taken from the first matmul's result: the tile's
  dot products then die with z, which keeps the fused epilogue within the registers (no spills).

Both switches on is the forward of a call that needs gradients (SigLIP has no normaliser, so G is
known in the same pass as the loss); ``WANT_LOSS`` alone is a forward without gradients (or a ring
step), ``WRITE_G`` alone a ring backward step. Per-tile partials (loss, dt) are summed by the
launcher: no atomics, deterministic.

Numerics: padding is set to u = -inf (softplus and sigmoid give exactly 0). One exponential
e = exp(-|u|) and one reciprocal 1 / (1 + e) per element serve the sigmoid and the softplus; log1p(e)
is ``log(1 + e) - ((1 + e) - 1 - e) / (1 + e)`` with 1 + e rounded (exact to fp32 rounding also for tiny
e, where ``log(1 + e)`` rounds to 0): the B^2 - B negatives of a trained model each add ~e^-10 and less
to the loss, and their sum matters. |G| <= 1, so its fp16 storage needs no normalisation.

Bytes per S element: 0 for the loss (partials are 8 / (BLOCK_M BLOCK_N) bytes); 2 written for G in
16 bits, then 2 + 2 read by the two matmuls.
"""

from __future__ import annotations

import torch

from m2kernels.ops.tiling import (
    G_STORAGE_SCALE,
    HAS_TRITON,
    count_pass,
    interpreting,
    launch,
    matmul_precision,
    size_bucket,
    smallest_tile,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from m2kernels.ops.tiling import score_tile, tile_ids

    @triton.jit
    def _log1p(e, one_p, inv):
        """log1p(e) from e, its rounded ``one_p = 1 + e`` and ``inv = 1 / one_p``: log(1 + e) corrected
        for the rounding of 1 + e, exact to fp32 rounding also for tiny e (where log(1 + e) rounds to
        0). No log1p instruction, and no division beyond the sigmoid's."""
        return tl.log(one_p) - ((one_p - 1.0) - e) * inv

    @triton.jit
    def _siglip_kernel(
        X, Y, SCALE, BIAS, G, PARTS,
        M, N, D, stride_x, stride_y, stride_g, stride_parts, diag_offset, M_BUCKET, N_BUCKET,
        G_SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        HAS_DIAG: tl.constexpr, WANT_LOSS: tl.constexpr, WRITE_G: tl.constexpr,
    ):
        pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        valid = mask_m[:, None] & mask_n[None, :]
        dots = score_tile(X, Y, stride_x, stride_y, offs_m, offs_n, mask_m, mask_n, D,
                          BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, PRECISION)
        z = dots * tl.load(SCALE).to(tl.float32) + tl.load(BIAS).to(tl.float32)
        if HAS_DIAG:  # u = -l z: -z for row i's positive, z for the negatives
            pos = offs_n[None, :] == (offs_m + diag_offset)[:, None]
            u = tl.where(pos, -z, z)
        else:
            u = z
        # Padding contributes exactly 0 to every sum (softplus(-inf) = sigmoid(-inf) = 0): one mask.
        u = tl.where(valid, u, float("-inf"))
        e = tl.exp(-tl.abs(u))
        one_p = 1.0 + e
        inv = 1.0 / one_p
        # This order (the loss's reduction, then G) keeps the fused epilogue within the registers.
        if WANT_LOSS:
            softplus = tl.maximum(u, 0.0) + _log1p(e, one_p, inv)
            tl.store(PARTS + tl.program_id(0), tl.sum(tl.sum(softplus, 1), 0))
        if WRITE_G:
            g = tl.where(u >= 0.0, inv, e * inv)  # sigmoid(u)
            if HAS_DIAG:
                g = tl.where(pos, -g, g)  # G = -l sigmoid(u)
            tl.store(G + offs_m.to(tl.int64)[:, None] * stride_g + offs_n[None, :],
                     (g * G_SCALE).to(G.dtype.element_ty), mask=valid)
            tl.store(PARTS + stride_parts + tl.program_id(0), tl.sum(tl.sum(g, 1), 0))


def _num_tiles(m, n):
    return lambda bm, bn: triton.cdiv(m, bm) * triton.cdiv(n, bn)


_KEY = ("D", "M_BUCKET", "N_BUCKET", "EVEN_D", "PRECISION", "HAS_DIAG", "WANT_LOSS", "WRITE_G")


def launch_args(x, y, scale, bias, g_out, parts, diag_offset, want_loss: bool) -> dict:
    """The kernel's arguments for one block (also what ``compile_check`` specialises on)."""
    m, d = x.shape
    n = y.shape[0]
    return dict(X=x, Y=y, SCALE=scale, BIAS=bias, G=g_out if g_out is not None else parts, PARTS=parts,
                M=m, N=n, D=d, stride_x=x.stride(0), stride_y=y.stride(0),
                stride_g=g_out.stride(0) if g_out is not None else 0, stride_parts=parts.shape[-1],
                diag_offset=0 if diag_offset is None else int(diag_offset), M_BUCKET=size_bucket(m),
                N_BUCKET=size_bucket(n),
                G_SCALE=G_STORAGE_SCALE[g_out.dtype] if g_out is not None else 1.0, EVEN_D=d % 64 == 0,
                # the interpreter computes bf16 dots wrongly; fp16 and fp32 run natively there too
                UPCAST=interpreting() and x.dtype == torch.bfloat16, PRECISION=matmul_precision(x.dtype),
                HAS_DIAG=diag_offset is not None, WANT_LOSS=want_loss, WRITE_G=g_out is not None)


def siglip_tiles(x, y, scale, bias, diag_offset=None, g_out=None, want_loss=True):
    """Sums over the block ``x`` (M rows) against ``y`` (N rows): ``[loss, dt]`` (fp32, 2).

    ``loss = sum_ij softplus(-l_ij z_ij)``, ``z = scale * x @ y.T + bias``, ``l_ij = +1`` for
    ``j = i + diag_offset`` (``None``: no positives in the block), -1 elsewhere. With ``g_out`` (M x N,
    input dtype) it receives ``G_SCALE * G`` with ``G = -l sigmoid(-l z)``, and ``dt = sum G`` is
    returned (0 without it; the loss is 0 without ``want_loss``).
    """
    m, n = x.shape[0], y.shape[0]
    tile = smallest_tile()
    parts = torch.zeros(2, triton.cdiv(m, tile) * triton.cdiv(n, tile), device=x.device, dtype=torch.float32)
    cfg = launch(_siglip_kernel, _num_tiles(m, n), launch_args(x, y, scale, bias, g_out, parts, diag_offset,
                                                               want_loss), _KEY)
    count_pass("recompute", m, n)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    return parts[:, :tiles].sum(1)

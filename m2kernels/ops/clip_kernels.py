"""Triton kernels of the softmax contrastive loss and their launchers.

Both kernels are a tile of ``S = s X Y^T`` (``tiling.score_tile``) with an epilogue in registers, one
program per BLOCK_M x BLOCK_N tile, tiles in grouped order:

* ``_clip_lse_kernel`` (forward, one pass over S): per tile, the log-sum-exp of each row over the
  tile's columns and of each column over the tile's rows (fp32 partials, merged by the launcher with
  one ``logsumexp`` over ~B/64 values per row), the diagonal entries S_i,i+offset where the tile holds
  them (so the loss's ``r_i - S_ii`` cancels exactly as dense fp32 cross-entropy does for huge logits),
  and optionally the unscaled dot products (the fast path that skips the backward's recompute).
* ``_clip_grad_kernel`` (backward, one pass over S): the loss gradient
  ``G_ij = a_i e^(S_ij - r_i) + b_j e^(S_ij - c_j) - d_i [j = i + offset] - u_i - v_j``
  (row and column softmax, the diagonal, label smoothing), computed in fp32 and written in the input
  dtype times ``G_SCALE``, plus the per-tile partial of ``sum_ij G_ij <x_i, y_j>`` (the logit-scale
  gradient) from the fp32 values. The matmuls ``G Y`` and ``G^T X`` run in cuBLAS.

Epilogue cost: both kernels take one exponential per element. The forward shifts a whole tile by its
maximum (the row and column sums then share ``exp(S - max)``); the backward writes
``e^(S - r_i) = e^(S - m) e^(m - r_i)`` with m the tile maximum. Where a tile spans too wide a range
for that (more than 60 resp. 40 in log units: no overflow, no lost precision), it takes two.

Bytes per S element: forward 0 (partials are 4 / BLOCK bytes per element); backward 2 written here (G
in 16 bits), then 2 + 2 read by the two matmuls: 6 in all, against 96 for a kernel that keeps its dX
rows in global memory and accumulates dY with atomics. No atomics anywhere: deterministic.
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
    merge_lse,
    size_bucket,
    smallest_tile,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from m2kernels.ops.tiling import score_tile, tile_ids

    @triton.jit
    def _clip_lse_kernel(
        X, Y, SCALE, ROW_MAX, ROW_SUM, COL_MAX, COL_SUM, DIAG, DOTS,
        M, N, D, stride_x, stride_y, stride_dots, diag_offset, M_BUCKET, N_BUCKET,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        HAS_DIAG: tl.constexpr, STORE_DOTS: tl.constexpr,
    ):
        pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        valid = mask_m[:, None] & mask_n[None, :]
        dots = score_tile(X, Y, stride_x, stride_y, offs_m, offs_n, mask_m, mask_n, D,
                          BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, PRECISION)
        if STORE_DOTS:
            tl.store(DOTS + offs_m.to(tl.int64)[:, None] * stride_dots + offs_n[None, :], dots, mask=valid)
        s = tl.where(valid, dots * tl.load(SCALE).to(tl.float32), float("-inf"))

        if HAS_DIAG:  # first, so that no other tile-sized value is alive beside s
            pos = offs_m + diag_offset  # column of each row's positive
            first = pid_m * BLOCK_M + diag_offset
            if (first < pid_n * BLOCK_N + BLOCK_N) & (first + BLOCK_M > pid_n * BLOCK_N):
                d = tl.sum(tl.where(offs_n[None, :] == pos[:, None], s, 0.0), 1)
                here = mask_m & (pos >= pid_n * BLOCK_N) & (pos < pid_n * BLOCK_N + BLOCK_N) & (pos < N)
                tl.store(DIAG + offs_m, d, mask=here)

        # Partials as (max, sum of exp(S - max)): merged in float64 by the launcher, no rounding of a
        # log-sum-exp in fp32.
        m_row = tl.max(s, 1)
        m_col = tl.max(s, 0)
        m_tile = tl.max(m_row, 0)
        low = tl.minimum(tl.min(tl.where(mask_m, m_row, m_tile), 0), tl.min(tl.where(mask_n, m_col, m_tile), 0))
        if m_tile - low < 60.0:  # one exponential per element, shared by the row and column sums
            e = tl.exp(s - m_tile)
            row_max = tl.zeros([BLOCK_M], tl.float32) + m_tile
            col_max = tl.zeros([BLOCK_N], tl.float32) + m_tile
            row_sum = tl.sum(e, 1)
            col_sum = tl.sum(e, 0)
        else:
            row_max = m_row
            col_max = m_col
            row_sum = tl.sum(tl.exp(s - m_row[:, None]), 1)
            col_sum = tl.sum(tl.exp(s - m_col[None, :]), 0)
        row_at = pid_n.to(tl.int64) * M + offs_m
        col_at = pid_m.to(tl.int64) * N + offs_n
        tl.store(ROW_MAX + row_at, row_max, mask=mask_m)
        tl.store(ROW_SUM + row_at, row_sum, mask=mask_m)
        tl.store(COL_MAX + col_at, col_max, mask=mask_n)
        tl.store(COL_SUM + col_at, col_sum, mask=mask_n)

    @triton.jit
    def _clip_grad_kernel(
        X, Y, SCALE, R, C, A, Bw, DW, U, V, G, DS_PART, DOTS,
        M, N, D, stride_x, stride_y, stride_g, stride_dots, diag_offset, M_BUCKET, N_BUCKET,
        G_SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        HAS_DIAG: tl.constexpr, HAS_SMOOTHING: tl.constexpr, LOAD_DOTS: tl.constexpr,
    ):
        pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        valid = mask_m[:, None] & mask_n[None, :]
        if LOAD_DOTS:
            dots = tl.load(DOTS + offs_m.to(tl.int64)[:, None] * stride_dots + offs_n[None, :], mask=valid,
                           other=0.0)
        else:
            dots = score_tile(X, Y, stride_x, stride_y, offs_m, offs_n, mask_m, mask_n, D,
                              BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, PRECISION)
        sc = tl.load(SCALE).to(tl.float32)
        r = tl.load(R + offs_m, mask=mask_m, other=float("inf"))  # (hi, lo) pairs: see tiling.hi_lo
        r_lo = tl.load(R + M + offs_m, mask=mask_m, other=0.0)
        c = tl.load(C + offs_n, mask=mask_n, other=float("inf"))
        c_lo = tl.load(C + N + offs_n, mask=mask_n, other=0.0)
        a = tl.load(A + offs_m, mask=mask_m, other=0.0)
        b = tl.load(Bw + offs_n, mask=mask_n, other=0.0)

        # An upper bound of the tile's S = sc * dots without a second tile-sized value alive: padding
        # entries have dots = 0 and may raise it, which is harmless (e^(S - m) only gets smaller, and the
        # range test below falls back to two exponentials where that would cost precision).
        top = tl.max(tl.max(dots, 1), 0)
        bottom = tl.min(tl.min(dots, 1), 0)
        m_tile = tl.where(sc >= 0, top * sc, bottom * sc)
        low = tl.minimum(tl.min(r, 0), tl.min(c, 0))  # masked entries load +inf
        if m_tile - low < 40.0:  # one exponential per element: e^(S - r_i) = e^(S - m) e^(m - r_i)
            e = tl.exp(dots * sc - m_tile)
            alpha = a * tl.exp((m_tile - r) - r_lo)
            beta = b * tl.exp((m_tile - c) - c_lo)
            g = e * (alpha[:, None] + beta[None, :])
        else:
            g = (a[:, None] * tl.exp((dots * sc - r[:, None]) - r_lo[:, None])
                 + b[None, :] * tl.exp((dots * sc - c[None, :]) - c_lo[None, :]))

        if HAS_DIAG:
            first = pid_m * BLOCK_M + diag_offset
            if (first < pid_n * BLOCK_N + BLOCK_N) & (first + BLOCK_M > pid_n * BLOCK_N):
                dw = tl.load(DW + offs_m, mask=mask_m, other=0.0)
                g = g - tl.where(offs_n[None, :] == (offs_m + diag_offset)[:, None], dw[:, None], 0.0)
        if HAS_SMOOTHING:
            u = tl.load(U + offs_m, mask=mask_m, other=0.0)
            v = tl.load(V + offs_n, mask=mask_n, other=0.0)
            g = g - (u[:, None] + v[None, :])
        # Padding entries of g may be non-zero (a_i e^(...) for a padding column); they are not stored,
        # and their dots are 0, so they add nothing to the scale gradient either: no mask needed.
        tl.store(G + offs_m.to(tl.int64)[:, None] * stride_g + offs_n[None, :], (g * G_SCALE).to(G.dtype.element_ty),
                 mask=valid)
        tl.store(DS_PART + tl.program_id(0), tl.sum(tl.sum(g * dots, 1), 0))



def _num_tiles(m, n):
    return lambda bm, bn: triton.cdiv(m, bm) * triton.cdiv(n, bn)


def _common(x: torch.Tensor, y: torch.Tensor) -> dict:
    m, d = x.shape
    n = y.shape[0]
    return dict(M=m, N=n, D=d, stride_x=x.stride(0), stride_y=y.stride(0), M_BUCKET=size_bucket(m),
                N_BUCKET=size_bucket(n), EVEN_D=d % 64 == 0,
                # the interpreter computes bf16 dots wrongly; fp16 and fp32 run natively there too
                UPCAST=interpreting() and x.dtype == torch.bfloat16,
                PRECISION=matmul_precision(x.dtype))


_LSE_KEY = ("D", "M_BUCKET", "N_BUCKET", "EVEN_D", "PRECISION", "HAS_DIAG", "STORE_DOTS")
_GRAD_KEY = ("D", "M_BUCKET", "N_BUCKET", "EVEN_D", "PRECISION", "HAS_DIAG", "HAS_SMOOTHING", "LOAD_DOTS")


def lse_tiles(x, y, scale, diag_offset=None, dots=None):
    """Row and column log-sum-exps (float64) of ``S = scale * x @ y.T`` in one pass, and the diagonal.

    ``diag_offset``: row i's positive is column ``i + diag_offset`` (``None``: no positives in this
    block); returns ``diag`` with ``S[i, i + diag_offset]`` for the rows whose positive lies in the
    block (NaN elsewhere). ``dots``: an (M, N) fp32 buffer that receives ``x @ y.T`` (unscaled).
    """
    m, n = x.shape[0], y.shape[0]
    dev = x.device
    # Partials sized for the smallest tile; only the rows the chosen tile size wrote are read.
    tile = smallest_tile()
    row_part = torch.empty(2, triton.cdiv(n, tile), m, device=dev, dtype=torch.float32)
    col_part = torch.empty(2, triton.cdiv(m, tile), n, device=dev, dtype=torch.float32)
    diag = torch.full((m,), float("nan"), device=dev, dtype=torch.float32)
    args = dict(X=x, Y=y, SCALE=scale, ROW_MAX=row_part[0], ROW_SUM=row_part[1], COL_MAX=col_part[0],
                COL_SUM=col_part[1], DIAG=diag, DOTS=dots if dots is not None else diag, stride_dots=n,
                diag_offset=0 if diag_offset is None else int(diag_offset), **_common(x, y),
                HAS_DIAG=diag_offset is not None, STORE_DOTS=dots is not None)
    cfg = launch(_clip_lse_kernel, _num_tiles(m, n), args, _LSE_KEY)
    count_pass("recompute", m, n)
    tn, tm = triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"])
    return merge_lse(row_part[0, :tn], row_part[1, :tn]), merge_lse(col_part[0, :tm], col_part[1, :tm]), diag


def grad_tiles(x, y, scale, r, c, a, b, d, u, v, g_out, diag_offset=None, dots=None):
    """Write ``G_SCALE * G`` for the block into ``g_out`` (M x N, input dtype); returns
    ``sum_ij G_ij <x_i, y_j>`` (fp32, one element). See ``_clip_grad_kernel`` for G. ``r``/``c``:
    the log-sum-exps as (2, M) / (2, N) fp32 (hi, lo) pairs (``tiling.hi_lo``).

    ``d`` (diagonal weights, with ``diag_offset``) and ``u``/``v`` (label smoothing) may be None.
    ``dots``: the forward's stored ``x @ y.T`` (fp32), read instead of recomputed.
    """
    m, n = x.shape[0], y.shape[0]
    zero = a.new_zeros(1)
    tile = smallest_tile()
    ds_part = torch.zeros(triton.cdiv(m, tile) * triton.cdiv(n, tile), device=x.device, dtype=torch.float32)
    args = dict(X=x, Y=y, SCALE=scale, R=r, C=c, A=a, Bw=b, DW=d if d is not None else zero,
                U=u if u is not None else zero, V=v if v is not None else zero, G=g_out, DS_PART=ds_part,
                DOTS=dots if dots is not None else zero, stride_g=g_out.stride(0), stride_dots=n,
                diag_offset=0 if diag_offset is None else int(diag_offset), **_common(x, y),
                G_SCALE=G_STORAGE_SCALE[g_out.dtype], HAS_DIAG=diag_offset is not None and d is not None,
                HAS_SMOOTHING=u is not None, LOAD_DOTS=dots is not None)
    cfg = launch(_clip_grad_kernel, _num_tiles(m, n), args, _GRAD_KEY)
    if dots is None:
        count_pass("recompute", m, n)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    return ds_part[:tiles].sum()

"""Fused, chunked bidirectional contrastive (CLIP / ITC) loss.

Notation (DESIGN.md): image features X (M x D), text features Y (N x D), scale s (already
exponentiated), ``S = s * X Y^T``. The loss never stores S: it is recomputed tile by tile.

Two block primitives carry all the B x B work, and every loss in the library (the single-process
loss here and the distributed modes in ``m2kernels.distributed``) is built from them:

* ``lse_pair(x, y, s)``: the row log-sum-exp ``r_i = logsumexp_j S_ij`` and the column log-sum-exp
  ``c_j = logsumexp_i S_ij`` of one block of S.
* ``softmax_grad(x, y, s, r, c, a, b)``: with ``P_ij = a_i exp(S_ij - r_i) + b_j exp(S_ij - c_j)``
  it returns ``(P @ Y, P^T @ X)`` in float32 (not yet multiplied by s). ``a`` and ``b`` are per-row
  and per-column weights (upstream gradient / 2B in the single-process loss).

The rest of the gradient of the loss (the diagonal, label smoothing, logit bias) is rank-1 or
elementwise and is added in PyTorch: ``G = P - (1-eps) g/B I - eps g/B^2 11^T`` and
``dX = s G Y``, ``dY = s G^T X``, ``ds = sum_ij G_ij <x_i, y_j> = sum_i <x_i, (G Y)_i>``.
The loss is invariant to a constant logit bias t (softmax is shift-invariant), so ``d(loss)/dt = 0``
exactly; the bias is still accepted (open_clip's signature) and a non-finite bias gives a NaN loss.

Passes over S (each one B x B x D matmul) on the ``triton`` backend:
  forward: 2 (row log-sum-exp, then column log-sum-exp, as the same kernel with X and Y swapped);
  backward: 3 (recompute S, P @ Y, P^T @ X in one kernel, P^T @ X accumulated with fp32 atomics),
  or 4 with ``deterministic=True`` (P @ Y and P^T @ X in two atomic-free kernels, each recomputing S).
  Total 5 (6 deterministic). Inf-CL needs about 10 for the same bidirectional loss.
On the ``torch`` backend: forward 1 (both log-sum-exps from one chunk of S), backward 3: total 4.
All accumulation is in fp32 whatever the input dtype.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional

import torch

try:  # Triton is optional: the torch backend needs nothing but PyTorch.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch", "reference")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _lse_kernel(
        Q, K, SCALE, LSE,
        M, N, D,
        stride_qm, stride_kn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """LSE[i] = logsumexp_j (scale * <q_i, k_j>) for a block of BLOCK_M rows of Q, online over K."""
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows = offs_m.to(tl.int64) * stride_qm
        scale = tl.load(SCALE).to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            cols = offs_n.to(tl.int64) * stride_kn
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for start_d in range(0, D, BLOCK_D):
                offs_d = start_d + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                q = tl.load(Q + rows[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                k = tl.load(K + cols[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    k = k.to(tl.float32)
                acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
            s = tl.where(mask_n[None, :], acc * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(LSE + offs_m, m_i + tl.log(l_i), mask=mask_m)

    @triton.jit
    def _softmax_grad_kernel(
        X, Y, SCALE, R, C, A, Bw, DX, DY,
        M, N, D,
        stride_xm, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_DY: tl.constexpr,
    ):
        """For BLOCK_M rows of X: DX[rows] = P[rows] @ Y and (HAS_DY) DY += P[rows]^T @ X[rows].

        P_ij = A_i exp(S_ij - R_i) + Bw_j exp(S_ij - C_j), S = scale * X Y^T recomputed per tile.
        DX rows are owned by this program (plain read-modify-write, fp32); DY rows are shared by all
        programs and accumulated with fp32 atomics.
        """
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows_x = offs_m.to(tl.int64) * stride_xm
        rows_o = offs_m.to(tl.int64) * D
        scale = tl.load(SCALE).to(tl.float32)
        r = tl.load(R + offs_m, mask=mask_m, other=0.0)
        a = tl.load(A + offs_m, mask=mask_m, other=0.0)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            cols_y = offs_n.to(tl.int64) * stride_yn
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for start_d in range(0, D, BLOCK_D):
                offs_d = start_d + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                x = tl.load(X + rows_x[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                y = tl.load(Y + cols_y[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                    y = y.to(tl.float32)
                acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
            s = acc * scale
            c = tl.load(C + offs_n, mask=mask_n, other=0.0)
            b = tl.load(Bw + offs_n, mask=mask_n, other=0.0)
            p = a[:, None] * tl.exp(s - r[:, None]) + b[None, :] * tl.exp(s - c[None, :])
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            for start_d in range(0, D, BLOCK_D):
                offs_d = start_d + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                y = tl.load(Y + cols_y[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                if UPCAST:
                    y = y.to(tl.float32)
                dx_ptrs = DX + rows_o[:, None] + offs_d[None, :]
                dx_mask = mask_m[:, None] & mask_d[None, :]
                dx = tl.load(dx_ptrs, mask=dx_mask, other=0.0)
                dx = tl.dot(p.to(y.dtype), y, dx, input_precision=PRECISION)
                tl.store(dx_ptrs, dx, mask=dx_mask)
                if HAS_DY:
                    x = tl.load(X + rows_x[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                    if UPCAST:
                        x = x.to(tl.float32)
                    dy = tl.dot(tl.trans(p.to(x.dtype)), x, input_precision=PRECISION)
                    dy_ptrs = DY + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
                    tl.atomic_add(dy_ptrs, dy, mask=mask_n[:, None] & mask_d[None, :])


def _triton_configs(element_size: int = 2) -> list[dict]:
    """Block configurations for 16-bit (``element_size=2``) or fp32 (4) inputs.

    Autotuned on CUDA; every one is compile-checked for sm_80 and sm_90 (shared memory must fit:
    fp32 tiles take twice the bytes, hence the narrower BLOCK_D; a 128 x 128 fp32 tile with TF32 dots
    needs 176 KiB in the backward kernel, over sm_80's 163 KiB).
    """
    if element_size == 2:
        return [
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, num_warps=4, num_stages=3),
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, num_warps=4, num_stages=2),
        ]
    return [
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=4, num_stages=2),
    ]


# Under the CPU interpreter: one fixed configuration (the interpreter cost is per block step).
_INTERPRETER_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=128)


@functools.cache
def _autotuned(kernel_name: str, element_size: int):
    kernel = {"lse": _lse_kernel, "grad": _softmax_grad_kernel}[kernel_name]
    configs = [
        triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")}, num_warps=c["num_warps"],
                      num_stages=c["num_stages"])
        for c in _triton_configs(element_size)
    ]
    extra = {"reset_to_zero": ["DX", "DY"]} if kernel_name == "grad" else {}
    return triton.autotune(configs, key=["D", "UPCAST", "PRECISION", *(["HAS_DY"] if extra else [])],
                           **extra)(kernel)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow PyTorch's own TF32 switch for matmuls; half types use tensor cores natively.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(kernel_name: str, grid_rows: int, *args, upcast: bool, precision: str, **flags):
    if _interpreting():
        cfg = _INTERPRETER_CONFIG
        kernel = {"lse": _lse_kernel, "grad": _softmax_grad_kernel}[kernel_name]
        kernel[(triton.cdiv(grid_rows, cfg["BLOCK_M"]),)](
            *args, **cfg, UPCAST=upcast, PRECISION=precision, **flags)
    else:
        kernel = _autotuned(kernel_name, args[0].element_size())
        grid = lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_M"]),)
        kernel[grid](*args, UPCAST=upcast, PRECISION=precision, **flags)


def _triton_lse(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    M, D = q.shape
    N = k.shape[0]
    out = torch.empty(M, device=q.device, dtype=torch.float32)
    upcast = _interpreting()  # the interpreter computes bf16 wrongly: fp32 after loading
    _launch("lse", M, q, k, scale, out, M, N, D, q.stride(0), k.stride(0),
            upcast=upcast, precision=_precision(q.dtype))
    return out


def _triton_lse_pair(x, y, scale):
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        return _triton_lse(x, y, scale), _triton_lse(y, x, scale)


def _triton_softmax_grad(x, y, scale, r, c, a, b, deterministic):
    M, D = x.shape
    N = y.shape[0]
    upcast = _interpreting()
    prec = _precision(x.dtype)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        dx = torch.zeros(M, D, device=x.device, dtype=torch.float32)
        dy = torch.zeros(N, D, device=x.device, dtype=torch.float32)
        if deterministic:
            # Two atomic-free launches; P^T = b exp(S^T - c) + a exp(S^T - r) is the same kernel with
            # the roles of (X, r, a) and (Y, c, b) swapped.
            _launch("grad", M, x, y, scale, r, c, a, b, dx, dx, M, N, D, x.stride(0), y.stride(0),
                    upcast=upcast, precision=prec, HAS_DY=False)
            _launch("grad", N, y, x, scale, c, r, b, a, dy, dy, N, M, D, y.stride(0), x.stride(0),
                    upcast=upcast, precision=prec, HAS_DY=False)
        else:
            _launch("grad", M, x, y, scale, r, c, a, b, dx, dy, M, N, D, x.stride(0), y.stride(0),
                    upcast=upcast, precision=prec, HAS_DY=True)
    return dx, dy


# --------------------------------------------------------------------------------------------------
# torch backend: the same math in chunks of rows, O(chunk * N) temporaries
# --------------------------------------------------------------------------------------------------

# Temporaries per chunk are about 2 x chunk x N fp32 values; aim at ~2^24 values (64 MiB) per buffer.
_CHUNK_ELEMENTS = 1 << 24


def default_chunk_size(m: int, n: int) -> int:
    return max(1, min(m, _CHUNK_ELEMENTS // max(n, 1)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (torch/reference backends)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_lse_pair(x, y, scale, chunk):
    m, n = x.shape[0], y.shape[0]
    chunk = chunk or default_chunk_size(m, n)
    acc = acc_dtype(x.dtype)
    y32 = y.to(acc)
    r = torch.empty(m, device=x.device, dtype=acc)
    c = torch.full((n,), float("-inf"), device=x.device, dtype=acc)
    for i0 in range(0, m, chunk):
        s = x[i0:i0 + chunk].to(acc) @ y32.T
        s.mul_(scale)
        r[i0:i0 + chunk] = torch.logsumexp(s, 1)
        c = torch.logaddexp(c, torch.logsumexp(s, 0))
    return r, c


def _torch_softmax_grad(x, y, scale, r, c, a, b, chunk):
    m, n = x.shape[0], y.shape[0]
    chunk = chunk or default_chunk_size(m, n)
    acc = acc_dtype(x.dtype)
    y32 = y.to(acc)
    dx = torch.empty(m, x.shape[1], device=x.device, dtype=acc)
    dy = torch.zeros(n, y.shape[1], device=x.device, dtype=acc)
    for i0 in range(0, m, chunk):
        xc = x[i0:i0 + chunk].to(acc)
        s = xc @ y32.T
        s.mul_(scale)
        pc = (s - c).exp_().mul_(b)  # column-softmax part
        s.sub_(r[i0:i0 + chunk, None]).exp_().mul_(a[i0:i0 + chunk, None]).add_(pc)  # + row part
        del pc
        torch.mm(s, y32, out=dx[i0:i0 + chunk])
        dy.addmm_(s.T, xc)
    return dx, dy


# --------------------------------------------------------------------------------------------------
# Backend dispatch: the two block primitives
# --------------------------------------------------------------------------------------------------


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Whether the triton backend can run on ``device``; the reason when it cannot."""
    if not HAS_TRITON:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and _interpreting():
        return True, ""
    return False, (f"the triton backend needs CUDA tensors (got {device.type}); on the CPU it runs only "
                   "under TRITON_INTERPRET=1, for tests")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Resolve ``"auto"`` (triton on CUDA for fp32/fp16/bf16, torch otherwise) and check availability."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        use_triton = device.type == "cuda" and dtype != torch.float64 and triton_available(device)[0]
        return "triton" if use_triton else "torch"
    if backend == "triton":
        ok, why = triton_available(device)
        if not ok:
            raise RuntimeError(f"backend='triton' is not available: {why}")
        if dtype == torch.float64:
            raise TypeError("backend='triton' supports float32, float16 and bfloat16 features; "
                            "use backend='torch' or 'reference' for float64")
    return backend


def lse_pair(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, backend: str = "torch",
             chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp (fp32) of ``S = scale * x @ y.T`` without storing S.

    ``x``: (M, D), ``y``: (N, D), same dtype and device, last dimension contiguous; ``scale``: a
    one-element fp32 tensor on the same device. ``backend`` is ``"triton"``, ``"torch"`` or
    ``"reference"`` (already resolved).
    """
    if backend == "triton":
        return _triton_lse_pair(x, y, scale)
    if backend == "torch":
        return _torch_lse_pair(x, y, scale, chunk_size)
    acc = acc_dtype(x.dtype)
    s = scale.double() * (x.double() @ y.double().T)
    return torch.logsumexp(s, 1).to(acc), torch.logsumexp(s, 0).to(acc)


def softmax_grad(x, y, scale, row_lse, col_lse, row_weight, col_weight, backend: str = "torch",
                 chunk_size: Optional[int] = None, deterministic: bool = False):
    """``(P @ y, P^T @ x)`` in fp32 with ``P_ij = a_i exp(S_ij - r_i) + b_j exp(S_ij - c_j)``.

    ``row_lse``/``row_weight`` have M fp32 entries, ``col_lse``/``col_weight`` N. S is recomputed.
    """
    if backend == "triton":
        return _triton_softmax_grad(x, y, scale, row_lse, col_lse, row_weight, col_weight, deterministic)
    if backend == "torch":
        return _torch_softmax_grad(x, y, scale, row_lse, col_lse, row_weight, col_weight, chunk_size)
    s = scale.double() * (x.double() @ y.double().T)
    p = (row_weight.double()[:, None] * (s - row_lse.double()[:, None]).exp()
         + col_weight.double()[None, :] * (s - col_lse.double()[None, :]).exp())
    acc = acc_dtype(x.dtype)
    return (p @ y.double()).to(acc), (p.T @ x.double()).to(acc)


# --------------------------------------------------------------------------------------------------
# The single-process loss as torch.library custom ops (torch.compile keeps them in one graph)
# --------------------------------------------------------------------------------------------------


def _loss_terms(x32, y32, s, r, c, eps):
    """Per-row and per-column loss terms given the log-sum-exps (all fp32)."""
    n = x32.shape[0]
    diag = s * (x32 * y32).sum(1)
    rows = r - (1.0 - eps) * diag
    cols = c - (1.0 - eps) * diag
    if eps:
        rows = rows - eps * s * (x32 @ y32.sum(0)) / n
        cols = cols - eps * s * (y32 @ x32.sum(0)) / n
    return rows, cols


@torch.library.custom_op("m2kernels::clip_loss_fwd", mutates_args=())
def _clip_loss_fwd(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, label_smoothing: float,
                   backend: str, chunk_size: int, deterministic: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = acc_dtype(x.dtype)
    s = scale.reshape(()).to(acc)
    r, c = lse_pair(x, y, s.reshape(1), backend, chunk_size or None)
    rows, cols = _loss_terms(x.to(acc), y.to(acc), s, r, c, label_smoothing)
    loss = (rows.sum() + cols.sum()) / (2 * x.shape[0])
    return loss, r, c


@_clip_loss_fwd.register_fake
def _(x, y, scale, label_smoothing, backend, chunk_size, deterministic):
    f32 = dict(device=x.device, dtype=acc_dtype(x.dtype))
    return torch.empty((), **f32), torch.empty(x.shape[0], **f32), torch.empty(y.shape[0], **f32)


@torch.library.custom_op("m2kernels::clip_loss_bwd", mutates_args=())
def _clip_loss_bwd(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                   r: torch.Tensor, c: torch.Tensor, label_smoothing: float, backend: str,
                   chunk_size: int, deterministic: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    eps = label_smoothing
    acc = acc_dtype(x.dtype)
    g = grad.reshape(()).to(acc)
    s = scale.reshape(()).to(acc)
    w = (g / (2 * n)).expand(n).contiguous()
    gy, gx = softmax_grad(x, y, s.reshape(1), r, c, w, w, backend, chunk_size or None, deterministic)
    # gy = P @ Y, gx = P^T @ X; add the diagonal and label-smoothing parts of G.
    x32, y32 = x.to(acc), y.to(acc)
    coef = g / n
    gy.sub_((1.0 - eps) * coef * y32)
    gx.sub_((1.0 - eps) * coef * x32)
    if eps:
        gy.sub_(eps * coef / n * y32.sum(0))
        gx.sub_(eps * coef / n * x32.sum(0))
    dscale = (x32 * gy).sum().reshape(scale.shape).to(scale.dtype)
    return (s * gy).to(x.dtype), (s * gx).to(y.dtype), dscale


@_clip_loss_bwd.register_fake
def _(grad, x, y, scale, r, c, label_smoothing, backend, chunk_size, deterministic):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, y, scale, label_smoothing, backend, chunk_size, deterministic = inputs
    _, r, c = output
    ctx.save_for_backward(x, y, scale, r, c)
    ctx.opts = (label_smoothing, backend, chunk_size, deterministic)


def _backward(ctx, grad_loss, _grad_r, _grad_c):
    x, y, scale, r, c = ctx.saved_tensors
    dx, dy, ds = torch.ops.m2kernels.clip_loss_bwd(grad_loss, x, y, scale, r, c, *ctx.opts)
    return dx, dy, ds, None, None, None, None


torch.library.register_autograd("m2kernels::clip_loss_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Input validation and the public functional entry point
# --------------------------------------------------------------------------------------------------


def _as_scalar_tensor(value, name: str, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), device=like.device, dtype=torch.float32)
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must be a tensor or a Python number, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
    if value.device != like.device and value.dim() > 0 and value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    return value if value.device == like.device else value.to(like.device)


def validate_features(image_features, text_features, *, same_rows: bool = True) -> None:
    """Shape, dtype and device checks shared by every entry point (clear errors, never a kernel crash)."""
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    if image_features.device != text_features.device:
        raise ValueError(f"image_features are on {image_features.device} but text_features are on "
                         f"{text_features.device}")
    if image_features.dtype != text_features.dtype:
        raise TypeError(f"image_features ({image_features.dtype}) and text_features ({text_features.dtype}) "
                        "must have the same dtype")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"feature sizes differ: image_features {tuple(image_features.shape)}, "
                         f"text_features {tuple(text_features.shape)}")
    if same_rows and image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"batch sizes differ: image_features {tuple(image_features.shape)}, "
                         f"text_features {tuple(text_features.shape)}; pairs are matched by row")
    if image_features.shape[0] == 0:
        raise ValueError("empty batch: image_features and text_features have 0 rows")
    if image_features.shape[1] == 0:
        raise ValueError("feature size is 0")


def check_finite_inputs(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")


def prepare_inputs(image_features, text_features, logit_scale, logit_bias, label_smoothing,
                   backend, chunk_size, check_finite):
    """Validate and normalise the arguments of every loss entry point; returns the resolved tuple."""
    validate_features(image_features, text_features)
    scale = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    bias = None if logit_bias is None else _as_scalar_tensor(logit_bias, "logit_bias", image_features)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0 or math.isnan(label_smoothing):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if check_finite:
        check_finite_inputs(image_features=image_features, text_features=text_features,
                            logit_scale=scale, logit_bias=bias)
    backend = resolve_backend(backend, image_features.device, image_features.dtype)
    x = image_features if image_features.stride(-1) == 1 else image_features.contiguous()
    y = text_features if text_features.stride(-1) == 1 else text_features.contiguous()
    return x, y, scale, bias, float(label_smoothing), backend


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
              logit_bias: Optional[torch.Tensor] = None, *, label_smoothing: float = 0.0,
              backend: str = "auto", chunk_size: Optional[int] = None, deterministic: bool = False,
              check_finite: bool = False, mode: Optional[str] = None, group=None,
              group_size: Optional[int] = None) -> torch.Tensor:
    """Exact bidirectional CLIP loss without materialising the B x B logits (single process).

    With ``mode`` (``"global"``, ``"ring"``, ``"hierarchical"``, ``"grouped"``) it is this rank's share
    of the loss over the process group ``group`` (``group_size`` ranks per sub-group): see
    ``m2kernels.distributed.distributed_clip_loss`` and docs/distributed.md.

    Equal to ``open_clip.loss.ClipLoss()(image_features, text_features, logit_scale, logit_bias)``:
    ``0.5 * (CE(S, arange) + CE(S^T, arange))`` with ``S = logit_scale * X Y^T + logit_bias``.
    ``logit_scale`` is already exponentiated. Differentiable in both feature matrices, the scale and
    the bias (whose gradient is exactly 0: the loss is shift-invariant).
    """
    if mode is not None:
        from m2kernels.distributed.loss import distributed_clip_loss

        return distributed_clip_loss(image_features, text_features, logit_scale, logit_bias, mode=mode,
                                     group=group, group_size=group_size, label_smoothing=label_smoothing,
                                     backend=backend, chunk_size=chunk_size, deterministic=deterministic,
                                     check_finite=check_finite)
    if group is not None or group_size is not None:
        raise ValueError("group and group_size need a distributed mode (mode='global', 'ring', "
                         "'hierarchical' or 'grouped')")
    x, y, scale, bias, eps, backend = prepare_inputs(
        image_features, text_features, logit_scale, logit_bias, label_smoothing, backend, chunk_size,
        check_finite)
    loss, _, _ = torch.ops.m2kernels.clip_loss_fwd(x, y, scale, eps, backend, chunk_size or 0,
                                                   bool(deterministic))
    if bias is not None:
        loss = loss + (bias - bias).reshape(()).to(loss.dtype)  # NaN/Inf bias -> NaN loss, grad 0
    return loss

"""What every contrastive-loss op shares: tiles of S = X Y^T, their configurations, chunks and matmuls.

Every loss in the library is made of two kinds of work on the logits S (M x N, one B x B x D matmul
per *pass*):

* a fused Triton kernel that computes tiles of ``X Y^T`` (``score_tile``) and reduces or transforms each
  tile in registers (log-sum-exps in the forward, the loss gradient G in the backward), and
* two tensor-core matmuls through cuBLAS (``mm_f32``): ``G Y`` and ``G^T X``, with fp32 accumulation.

This module holds what those have in common: whether and how Triton runs (CUDA, or the CPU interpreter
for tests), the fp32 matmul precision (TF32 or IEEE) read through PyTorch's current API, the block
configurations and their autotuning keys, the grouped tile order, row chunks sized from a memory
budget, the backward's loop over chunks of G with its two matmuls, fp32-output matmuls of 16-bit
inputs, the dtype G is stored in, and a counter of passes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

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

# Temporaries a loss call may hold at once (row chunks of G or of S, partial log-sum-exps), and the
# largest logits matrix the forward keeps for the backward when ``store_logits="auto"``. On a GPU large
# chunks keep the matmuls efficient (and the G^T X accumulation, N x D per chunk, cheap); on the CPU
# chunks past the last-level cache make no matmul faster, and each chunk x N temporary is streamed
# through memory several times: smaller ones keep the footprint low at the same speed.
DEFAULT_MEMORY_BUDGET = {"cuda": 1 << 30, "cpu": 64 << 20}


def default_memory_budget(device: torch.device) -> int:
    return DEFAULT_MEMORY_BUDGET.get(device.type, DEFAULT_MEMORY_BUDGET["cpu"])

# G is stored in the input dtype for the tensor-core matmuls. fp16 flushes values below 6e-8 to zero,
# and G's entries are ~1/B: G, normalised to |G| <= 8 by a power of two, is stored times 2^12 (no
# overflow: 8 * 4096 < 65504), which keeps entries down to ~1e-11 of the largest. bf16 and fp32 have
# fp32's range.
G_STORAGE_SCALE = {torch.float16: 4096.0, torch.bfloat16: 1.0, torch.float32: 1.0, torch.float64: 1.0}


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on the CPU, one numpy op per block op)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Whether the triton backend can run on ``device``; the reason when it cannot."""
    if not HAS_TRITON:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and interpreting():
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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (torch/reference backends)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Log-sum-exps are kept in float64 (O(B) values): fp32 rounding of an LSE near 20 is ~1e-6, and it
# would shift every softmax entry of its row by the same relative amount (a coherent error that sums
# up over the row). The kernels get them as fp32 (hi, lo) pairs: e^((S - hi) - lo) is as exact as
# dense fp32 softmax.
LSE_DTYPE = torch.float64


def hi_lo(v: torch.Tensor) -> torch.Tensor:
    """A float64 vector as a (2, n) fp32 tensor: rows ``hi = fp32(v)`` and ``lo = fp32(v - hi)``."""
    hi = v.float()
    lo = (v - hi.double()).float()
    return torch.stack([hi, torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))])


def merge_lse(m: torch.Tensor, l: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Log-sum-exp (float64) over ``dim`` of partials given as max ``m`` and sum ``l`` of exp(x - m)."""
    m = m.double()
    top = m.amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return ((l.double() * (m - top).exp()).sum(dim, keepdim=True).log() + top).squeeze(dim)


def matmul_precision(dtype: torch.dtype) -> str:
    """``"tf32"`` or ``"ieee"`` for fp32 dots, as PyTorch's own matmuls would run them.

    Read through ``torch.backends.cuda.matmul.fp32_precision`` (the legacy ``allow_tf32`` flag raises
    once a user has set the new API, and the legacy setters are reflected in the new one). Half types
    always use tensor cores; the value is then irrelevant.
    """
    if dtype != torch.float32:
        return "tf32"
    prec = torch.backends.cuda.matmul.fp32_precision
    if prec == "none":
        prec = torch.backends.fp32_precision
    return "tf32" if prec == "tf32" else "ieee"


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype G is written in for the matmuls: the input dtype (fp32 accumulation either way)."""
    return dtype


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
           accumulate: bool = False) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 (fp64 for fp64); written into ``out`` when given,
    or added into it with ``accumulate``.

    On CUDA, 16-bit operands stay 16-bit (tensor cores) and cuBLAS writes the fp32 result directly
    (``out_dtype``); no fp32 copy of an input is made. Elsewhere the operands are upcast, which gives
    the same products (exact in fp32) with fp32 sums.
    """
    acc = acc_dtype(a.dtype)
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        if out is None:
            return torch.mm(a, b, out_dtype=acc)
        if accumulate:
            return torch.addmm(out, a, b, out_dtype=acc, out=out)
        return torch.mm(a, b, out_dtype=acc, out=out)
    # On the CPU a transposed left operand takes a BLAS path (dot products along the long axis) that
    # sums less accurately than dense fp32 autograd does: give it a contiguous copy.
    a, b = a.to(acc).contiguous(), b.to(acc)
    if out is None:
        return torch.mm(a, b)
    if accumulate:
        return out.addmm_(a, b)
    return torch.mm(a, b, out=out)


def chunk_rows(m: int, n: int, bytes_per_element: float, budget: int, chunk_size: int | None = None) -> int:
    """Rows per chunk so that ``rows * n * bytes_per_element`` stays within ``budget`` (at least 1).

    ``chunk_size`` (a user override, in rows) wins when given.
    """
    if chunk_size:
        return max(1, min(m, chunk_size))
    rows = int(budget // max(1.0, n * bytes_per_element))
    return max(1, min(m, rows))


def grad_matmuls(x: torch.Tensor, y: torch.Tensor, step: int, g_dtype: torch.dtype, fill, sums: torch.Tensor,
                 want: tuple[bool, bool] = (True, True)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's chunk loop every loss shares: ``(G Y, G^T X, sums)`` in fp32 (fp64 for fp64).

    For each chunk of ``step`` rows [i0, i1), ``fill(i0, i1, g)`` writes those rows of the loss
    gradient G (chunk x N, ``g_dtype``) into ``g`` and returns their partial sums, which are added
    into ``sums``; then ``G Y`` gives the chunk's rows of the first product and ``G^T X`` is
    accumulated into the second (``want`` skips either). Only one chunk of G exists at a time.
    """
    m, n = x.shape[0], y.shape[0]
    acc = acc_dtype(x.dtype)
    dx = torch.zeros(m, x.shape[1], device=x.device, dtype=acc)
    dy = torch.zeros(n, y.shape[1], device=x.device, dtype=acc)
    g_buf = torch.empty(min(step, m), n, device=x.device, dtype=g_dtype)
    for i0 in range(0, m, step):
        i1 = min(m, i0 + step)
        g = g_buf[:i1 - i0]
        sums += fill(i0, i1, g)
        if want[0]:
            mm_f32(g, y, out=dx[i0:i1])
            count_pass("matmul", i1 - i0, n)
        if want[1]:
            mm_f32(g.T, x[i0:i1], out=dy, accumulate=True)
            count_pass("matmul", i1 - i0, n)
    return dx, dy, sums


@contextlib.contextmanager
def autocast_disabled(device: torch.device):
    """The loss computes in fp32 (or the input dtype with fp32 accumulation) whatever autocast says."""
    with torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", enabled=False):
        yield


# --------------------------------------------------------------------------------------------------
# Counting passes over S (tests check the pass counts the docs state)
# --------------------------------------------------------------------------------------------------


@dataclass
class PassCounter:
    """Counts the B x B x D work of the loss ops while active: logits elements computed by the fused
    kernels (``recomputed``: forward or backward recomputation of S) and multiplied by the matmuls
    (``matmul``: each ``G Y`` or ``G^T X`` counts M x N). ``passes(m, n)`` divides by m x n."""

    recomputed: int = 0
    matmul: int = 0
    calls: list = field(default_factory=list)

    def record(self, kind: str, m: int, n: int) -> None:
        if kind == "recompute":
            self.recomputed += m * n
        else:
            self.matmul += m * n
        self.calls.append((kind, m, n))

    def passes(self, m: int, n: int) -> float:
        return (self.recomputed + self.matmul) / float(m * n)

    def __enter__(self):
        _COUNTERS.append(self)
        return self

    def __exit__(self, *exc):
        _COUNTERS.remove(self)
        return False


_COUNTERS: list[PassCounter] = []


def count_pass(kind: str, m: int, n: int) -> None:
    for c in _COUNTERS:
        c.record(kind, m, n)


# --------------------------------------------------------------------------------------------------
# Triton: block configurations, tile order, the score tile
# --------------------------------------------------------------------------------------------------

# Under the CPU interpreter: one fixed configuration (its cost is per block op), with BLOCK_D cut down
# to the feature size (numpy multiplies the masked zeros too, slowly for fp16).
INTERPRETER_CONFIG = dict(BLOCK_M=256, BLOCK_N=256, BLOCK_D=64, GROUP_M=4)


def tile_configs(element_size: int) -> list[dict]:
    """Block configurations for 16-bit (``element_size=2``) or fp32 (4) inputs.

    Autotuned on CUDA per (D, size bucket, dtype). Every one is compiled for sm_80 and sm_90 by
    ``python -m m2kernels.ops.compile_check`` with a real launch's specialisation: shared memory must fit
    both chips, and on sm_90 the 16-bit ones must use wgmma without register spills (the tests check).
    """
    if element_size == 2:
        return [
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, GROUP_M=8, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, GROUP_M=8, num_warps=4, num_stages=4),
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=64, GROUP_M=8, num_warps=4, num_stages=4),
        ]
    return [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=32, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=32, GROUP_M=8, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, GROUP_M=8, num_warps=4, num_stages=3),
    ]


def smallest_tile() -> int:
    """The smallest BLOCK_M / BLOCK_N a launch may pick: buffers of per-tile partials are sized for it."""
    if interpreting():
        return min(INTERPRETER_CONFIG["BLOCK_M"], INTERPRETER_CONFIG["BLOCK_N"])
    return min(min(c["BLOCK_M"], c["BLOCK_N"]) for size in (2, 4) for c in tile_configs(size))


def size_bucket(n: int) -> int:
    """Autotuning key for a size: the next power of two, capped (2^16 and up tune alike)."""
    return 1 << min(16, max(0, (int(n) - 1).bit_length()))


@functools.cache
def autotuned(kernel, element_size: int, key: tuple[str, ...]):
    """``kernel`` wrapped in ``triton.autotune`` over ``tile_configs(element_size)`` (cached)."""
    configs = [
        triton.Config({k: v for k, v in c.items() if k.isupper()}, num_warps=c["num_warps"],
                      num_stages=c["num_stages"])
        for c in tile_configs(element_size)
    ]
    return triton.autotune(configs, key=list(key))(kernel)


def launch(kernel, num_tiles, args: dict, key: tuple[str, ...]) -> dict:
    """Launch a tile kernel over a 1-D grid of ``num_tiles(BLOCK_M, BLOCK_N)`` programs.

    Under the interpreter one fixed configuration; on CUDA the autotuned one (on the device of the
    tensors). Returns the block configuration that ran, so callers read exactly the partial results
    it wrote (autotuning trials with other tile sizes may leave more rows behind).
    """
    if interpreting():
        d = args.get("D", 64)
        cfg = dict(INTERPRETER_CONFIG, BLOCK_D=max(16, min(INTERPRETER_CONFIG["BLOCK_D"], triton.next_power_of_2(d))))
        kernel[(num_tiles(cfg["BLOCK_M"], cfg["BLOCK_N"]),)](**args, **cfg)
        return cfg
    first = next(v for v in args.values() if torch.is_tensor(v))
    tuned = autotuned(kernel, first.element_size(), key)
    with torch.cuda.device(first.device):
        tuned[lambda meta: (num_tiles(meta["BLOCK_M"], meta["BLOCK_N"]),)](**args)
    return tuned.best_config.kwargs


if HAS_TRITON:

    @triton.jit
    def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's (row block, column block), in groups of GROUP_M row blocks that sweep the
        columns together, so that a group's rows of X stay in L2 while Y streams past; with the tile's
        row and column indices and their masks."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return pid_m, pid_n, offs_m, offs_n, offs_m < M, offs_n < N

    @triton.jit
    def score_tile(X, Y, stride_x, stride_y, offs_m, offs_n, mask_m, mask_n, D,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """fp32 tile ``X[offs_m] . Y[offs_n]^T`` (unscaled dot products), accumulated over D.

        Offsets are int64 (B * D overflows int32 at real sizes). ``EVEN_D``: D is a multiple of
        BLOCK_D, so the feature dimension needs no mask. ``UPCAST``: fp32 dots after loading (the CPU
        interpreter computes bf16 dots wrongly; nothing else sets it).
        """
        rows = offs_m.to(tl.int64) * stride_x
        cols = offs_n.to(tl.int64) * stride_y
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start_d in range(0, D, BLOCK_D):
            offs_d = start_d + tl.arange(0, BLOCK_D)
            if EVEN_D:
                x = tl.load(X + rows[:, None] + offs_d[None, :], mask=mask_m[:, None], other=0.0)
                y = tl.load(Y + cols[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            else:
                mask_d = offs_d < D
                x = tl.load(X + rows[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                            other=0.0)
                y = tl.load(Y + cols[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                            other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
        return acc

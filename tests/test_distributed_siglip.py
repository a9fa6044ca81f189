"""The distributed sigmoid (SigLIP) loss in spawned gloo worlds, against open_clip's SigLipLoss (its loss.py
loaded on its own) for every dist_impl, and against a float64 reference of the per-rank shares.

Conventions (open_clip's): rank q returns L_q = 1/b_q sum_{i in q} sum_j softplus(-l_ij z_ij); after
``(g_q * L_q).backward()`` on every rank, rank q holds the gradients of Phi = sum_p g_p L_p with respect
to its own features, and g_q dL_q/ds, g_q dL_q/dt (its own share's) for the scale and the bias.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2kernels import SigLipLoss, siglip_loss
from m2kernels.distributed import CommCounter, distributed_siglip_loss
from m2kernels.ops.tiling import PassCounter
from m2kernels.reference import open_clip_loss_module
from tests.dist_utils import make_batch, spawn

pytestmark = pytest.mark.distributed

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}  # bf16: fp32 accumulation, results rounded to bf16
BIAS = -4.0


def shares_ref(x, y, s, t, offsets, grads):
    """Float64 shares L_q, dPhi/dX and dPhi/dY (whole batch), and every rank's g_q dL_q/ds, g_q dL_q/dt."""
    x, y, s, t = (v.detach().double().requires_grad_(True) for v in (x, y, s, t))
    z = s * x @ y.T + t
    labels = 2 * torch.eye(x.shape[0], dtype=torch.float64) - 1
    rows = F.softplus(-labels * z).sum(1)
    world = len(offsets) - 1
    shares = [rows[offsets[q]:offsets[q + 1]].sum() / max(1, offsets[q + 1] - offsets[q])  # 0 when empty
              for q in range(world)]
    dx, dy = torch.autograd.grad(sum(g * L for g, L in zip(grads, shares)), (x, y), retain_graph=True)
    ds, dt = [], []
    for g, share in zip(grads, shares):
        a, b = torch.autograd.grad(g * share, (s, t), retain_graph=True, allow_unused=True)
        ds.append(torch.zeros(()) if a is None else a)
        dt.append(torch.zeros(()) if b is None else b)
    return torch.stack(shares).detach(), dx, dy, ds, dt


def _close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(),
                               msg=lambda m: f"{what}: {m}", **TOL[dtype])


def _run_case(rank, world, mode, sizes, *, dim=16, backend="torch", dtype=torch.float64, grads=None, seed=0,
              bias=True):
    """One step on this rank's shard through the functional API; everything against the float64 shares."""
    grads = grads or [1.0] * world
    x_all, y_all, s, offs = make_batch(sizes, dim, seed=seed, dtype=dtype)
    t = torch.tensor(BIAS, dtype=torch.float64)
    lo, hi = offs[rank], offs[rank + 1]
    x = x_all[lo:hi].to(dtype).requires_grad_(True)
    y = y_all[lo:hi].to(dtype).requires_grad_(True)
    scale = s.to(dtype).clone().requires_grad_(True)
    logit_bias = t.to(dtype).clone().requires_grad_(True) if bias else None
    loss = siglip_loss(x, y, scale, logit_bias, mode=mode, backend=backend)
    (loss * grads[rank]).backward()
    shares, dx, dy, ds, dt = shares_ref(x_all, y_all, s, t if bias else torch.tensor(0.0), offs, grads)
    what = f"{mode} {backend} {dtype} sizes={sizes} rank={rank} bias={bias}"
    _close(loss, shares[rank], dtype, what + " share")
    _close(x.grad, dx[lo:hi], dtype, what + " dX")
    _close(y.grad, dy[lo:hi], dtype, what + " dY")
    _close(scale.grad, ds[rank], dtype, what + " ds")
    if bias:
        _close(logit_bias.grad, dt[rank], dtype, what + " dt")


def _against_open_clip(rank, world, sizes, dim=16, dtype=torch.float64, modes=True):
    """open_clip's SigLipLoss for every dist_impl, and ours for every dist_impl (and mode): the same
    shares and gradients, with a different upstream gradient on every rank."""
    oc = open_clip_loss_module()
    x_all, y_all, s, offs = make_batch(sizes, dim, seed=3, dtype=dtype)
    lo, hi = offs[rank], offs[rank + 1]
    upstream = 0.5 + rank

    def step(loss_fn):
        x = x_all[lo:hi].to(dtype).requires_grad_(True)
        y = y_all[lo:hi].to(dtype).requires_grad_(True)
        scale = s.to(dtype).clone().requires_grad_(True)
        t = torch.tensor(BIAS, dtype=dtype, requires_grad=True)
        loss = loss_fn(x, y, scale, t)
        (loss * upstream).backward()
        return [loss.detach(), x.grad, y.grad, scale.grad, t.grad]

    impls = ("bidir", "shift", "reduce", "gather")
    want = step(oc.SigLipLoss(rank=rank, world_size=world))  # open_clip's default, bidir
    candidates = {f"open_clip {i}": oc.SigLipLoss(rank=rank, world_size=world, dist_impl=i) for i in impls}
    candidates.update({f"m2 {i}": SigLipLoss(rank=rank, world_size=world, dist_impl=i, backend="torch")
                       for i in impls + (None,)})
    if modes:
        candidates.update({f"m2 mode={m}": SigLipLoss(mode=m, backend="torch") for m in ("global", "ring")})
    for name, impl in candidates.items():
        got = step(impl)
        for label, a, b in zip(["loss", "dX", "dY", "ds", "dt"], got, want):
            _close(a, b, dtype, f"{name} rank={rank} {label}")


def _expect_error_everywhere(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def _errors(rank, world):
    f64 = torch.float64
    x = torch.randn(4, 16 if rank == 0 else 8, dtype=f64)
    _expect_error_everywhere(lambda: siglip_loss(x, x, 10.0, -1.0, mode="global"), ValueError,
                             "feature sizes differ")
    x = torch.randn(4, 8, dtype=f64 if rank == 0 else torch.float32)
    _expect_error_everywhere(lambda: siglip_loss(x, x, 10.0, -1.0, mode="ring"), TypeError, "dtypes differ")
    x = torch.randn(4, 8, dtype=f64)
    bad = x[None] if rank == 1 else x
    _expect_error_everywhere(lambda: siglip_loss(bad, x, 10.0, -1.0, mode="ring"), ValueError,
                             "SigLIP loss on rank \\[1\\]: rank 1: ValueError: image_features must be 2-D")
    ints = x.long() if rank == 1 else x
    _expect_error_everywhere(lambda: siglip_loss(ints, ints, 10.0, -1.0, mode="global"), TypeError,
                             "rank 1: TypeError: image_features must be float32")
    nan = x.clone()
    if rank == 0:
        nan[1, 1] = float("nan")
    _expect_error_everywhere(lambda: siglip_loss(nan, x, 10.0, -1.0, mode="ring", check_finite=True),
                             ValueError, "rank 0: ValueError: image_features contains NaN")
    _expect_error_everywhere(lambda: siglip_loss(x, x, 10.0, -1.0, mode="global", backend="cuda" if rank else
                                                 "torch"), ValueError, "rank 1: ValueError: backend must be")
    _expect_error_everywhere(lambda: siglip_loss(x, x, 10.0, -1.0, mode="ring" if rank else "global"),
                             ValueError, "disagree on mode")
    _expect_error_everywhere(lambda: siglip_loss(x, x, 10.0, None if rank else -1.0, mode="global"),
                             ValueError, "logit_bias is None on some ranks")
    _expect_error_everywhere(lambda: siglip_loss(x, x, 10.0 + rank, -1.0, mode="ring", check_finite=True),
                             ValueError, "logit_scale differs")
    _expect_error_everywhere(lambda: siglip_loss(x, x, 10.0, -1.0 - rank, mode="ring", check_finite=True),
                             ValueError, "logit_bias differs")
    empty = torch.zeros(0, 8, dtype=f64)
    _expect_error_everywhere(lambda: siglip_loss(empty, empty, 10.0, -1.0, mode="global"), ValueError,
                             "empty")
    _expect_error_everywhere(lambda: SigLipLoss(rank=rank, world_size=world + 1)(x, x, 10.0, -1.0),
                             ValueError, f"rank={rank}, world_size={world + 1} do not match the process")
    # a wrong rank/world_size on one rank only: every rank raises (none waits in a collective)
    _expect_error_everywhere(lambda: SigLipLoss(rank=0, world_size=world)(x, x, 10.0, -1.0), ValueError,
                             "rank \\[1\\]: rank 1: .*do not match")
    with pytest.raises(ValueError, match="mode must be one of"):
        distributed_siglip_loss(x, x, 10.0, -1.0, mode="hierarchical")


def _world2(rank, world):
    for mode in ("global", "ring"):
        _run_case(rank, world, mode, [6, 6], grads=[1.0, -0.5])
        _run_case(rank, world, mode, [5, 8], grads=[0.3, 2.0], bias=False, seed=1)   # uneven shards
        _run_case(rank, world, mode, [0, 7], grads=[1.0, 1.5], seed=2)               # an empty shard
        _run_case(rank, world, mode, [9, 8], dtype=torch.float32, grads=[1.0, 0.5])  # fp32 accumulation
    _run_case(rank, world, "global", [6, 5], dtype=torch.bfloat16, grads=[1.0, 0.5])
    _run_case(rank, world, "ring", [7, 4], backend="triton", dtype=torch.float32, grads=[1.0, -2.0])
    _against_open_clip(rank, world, [6, 6])
    _against_open_clip(rank, world, [8, 8], dtype=torch.float32, modes=False)
    _errors(rank, world)

    # passes over this rank's b x B logits, and the bytes each mode moves (fp32, equal shards)
    b, d = 6, 8
    x_all, y_all, s, offs = make_batch([b, b], d, seed=9)
    meta = (world - 1) * 8 * 8  # the host agreement: status and 7 fields per rank
    block = (world - 1) * b * d * 4
    for mode, fwd_passes, bwd_passes, bwd_bytes in (("global", 3, 0, block),
                                                    ("ring", 1, 3, block + world * b * d * 4)):
        x = x_all[offs[rank]:offs[rank + 1]].float().requires_grad_(True)
        y = y_all[offs[rank]:offs[rank + 1]].float().requires_grad_(True)
        with PassCounter() as fwd, CommCounter() as fwd_comm:
            loss = siglip_loss(x, y, 10.0, -1.0, mode=mode, backend="torch")
        with PassCounter() as bwd, CommCounter() as bwd_comm:
            loss.backward()
        assert fwd.passes(b, 2 * b) == fwd_passes and bwd.passes(b, 2 * b) == bwd_passes, mode
        assert fwd_comm.sent == meta + block, (mode, fwd_comm.calls)
        assert bwd_comm.sent == bwd_bytes, (mode, bwd_comm.calls)
        with torch.no_grad(), PassCounter() as nograd:
            share = siglip_loss(x, y, 10.0, -1.0, mode=mode, backend="torch")
        assert nograd.passes(b, 2 * b) == 1 and not share.requires_grad
        torch.testing.assert_close(share, loss.detach())
    _run_case(rank, world, "ring", [3, 3])  # the group is still usable after the errors


def _world3(rank, world):
    for mode in ("global", "ring"):
        _run_case(rank, world, mode, [4, 9, 6], grads=[1.0, -2.0, 0.5])
        _run_case(rank, world, mode, [5, 0, 7], grads=[0.7, 1.3, 1.0], seed=1)
    _run_case(rank, world, "ring", [5, 8, 3], backend="triton", dtype=torch.float32)
    _run_case(rank, world, "global", [8, 8, 6], backend="triton", dtype=torch.float32, bias=False)
    _against_open_clip(rank, world, [4, 4, 4])


@pytest.mark.parametrize("world", [2, 3])
def test_siglip_modes_against_open_clip_and_reference(world):
    spawn({2: _world2, 3: _world3}[world], world)

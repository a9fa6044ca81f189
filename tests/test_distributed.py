"""Distributed loss modes against a single-process float64 reference, in spawned gloo worlds.

Each spawned world runs many checks (spawning costs seconds). Conventions checked (docs/distributed.md):
rank q returns L_q with mean_q L_q = the loss; its feature gradients are those of
Phi = sum_q g_q L_q (W times the loss's gradient for g = 1); sum_q ds_q = dPhi/ds.
"""

from __future__ import annotations

import importlib.util
import os
import sysconfig
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from m2kernels import ClipLoss, clip_loss, clip_loss_ref
from m2kernels.distributed import (
    CommCounter,
    comm_bytes,
    consecutive_subgroups,
    distributed_clip_loss,
    mesh_dim_group,
    node_subgroups,
    subgroups_from_rank_lists,
)
from m2kernels.distributed import collectives as C
from m2kernels.ops.tiling import PassCounter
from tests.dist_utils import make_batch, shares_ref, spawn

pytestmark = pytest.mark.distributed

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}  # bf16: fp32 accumulation, results rounded to bf16


def _close(actual, expected, dtype, what):
    tol = TOL[dtype]
    actual = actual.detach().double()
    expected = expected.detach().double()
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)


def _run_case(rank, world, mode, sizes, *, n=None, dim=16, backend="torch", dtype=torch.float64, eps=0.0,
              grads=None, seed=0, bias=False):
    """One loss step on this rank's shard; compares everything with the float64 reference."""
    grads = grads or [1.0] * world
    x_all, y_all, s, offs = make_batch(sizes, dim, seed=seed, dtype=dtype)
    lo, hi = offs[rank], offs[rank + 1]
    x = x_all[lo:hi].to(dtype).requires_grad_(True)
    y = y_all[lo:hi].to(dtype).requires_grad_(True)
    scale = s.to(dtype).clone().requires_grad_(True)
    kwargs = dict(mode=mode, group_size=n, backend=backend, label_smoothing=eps)
    logit_bias = torch.tensor(-3.0, requires_grad=True) if bias else None
    loss = clip_loss(x, y, scale, logit_bias, **kwargs)
    (loss * grads[rank]).backward()

    # The reference loss spans the whole world, or this rank's sub-group for ``grouped``.
    if mode == "grouped" and n < world:
        k = rank // n
        members = list(range(k * n, (k + 1) * n))
    else:
        members = list(range(world))
    r0, r1 = offs[members[0]], offs[members[-1] + 1]
    sub_offs = [offs[q] - r0 for q in members] + [r1 - r0]
    shares, dx, dy, ds = shares_ref(x_all[r0:r1], y_all[r0:r1], s, sub_offs,
                                    [grads[q] for q in members], eps)
    me = members.index(rank)
    what = f"{mode} n={n} {backend} {dtype} eps={eps} sizes={sizes} rank={rank}"
    _close(loss, shares[me], dtype, what + " loss share")
    _close(x.grad, dx[lo - r0:hi - r0], dtype, what + " dX")
    _close(y.grad, dy[lo - r0:hi - r0], dtype, what + " dY")
    # The mean of the shares is the loss of the (sub-)group; sum_q ds_q = dPhi/ds.
    mean = loss.detach().double().reshape(1).clone()
    dist.all_reduce(mean)
    expect = torch.zeros(1, dtype=torch.float64)
    for k0 in range(0, world, len(members)):
        a, b = offs[k0], offs[k0 + len(members)]
        expect += clip_loss_ref(x_all[a:b], y_all[a:b], s, label_smoothing=eps)
    _close(mean / world, expect / (world // len(members)), dtype, what + " mean loss")
    if mode == "grouped" and n < world and eps == 0:  # fewer candidates: never above the global loss
        assert float(mean / world) <= float(clip_loss_ref(x_all, y_all, s)) + 1e-6, what
    total_ds = scale.grad.double().reshape(1).clone()
    dist.all_reduce(total_ds)
    if mode == "grouped" and n < world:
        # sum over the world of ds_q = sum over sub-groups k of dPhi_k/ds: each sub-group's first rank
        # contributes its reference.
        mine = ds.reshape(1).clone() if me == 0 else torch.zeros(1, dtype=torch.float64)
        dist.all_reduce(mine)
        _close(total_ds, mine, dtype, what + " sum of ds")
    else:
        _close(total_ds, ds.reshape(1), dtype, what + " sum of ds")
    if bias:
        assert logit_bias.grad is not None and float(logit_bias.grad) == 0.0
    return loss


def _convention_check(rank, world, mode, n=None):
    """With g = 1: dX_q = W * d(loss)/dX_q and mean_q ds_q = d(loss)/ds, the loss from clip_loss_ref."""
    sizes = [5 + q for q in range(world)]
    x_all, y_all, s, offs = make_batch(sizes, 12, seed=7)
    xr = x_all.clone().requires_grad_(True)
    sr = s.clone().requires_grad_(True)
    ref = clip_loss_ref(xr, y_all, sr)
    gx, gs = torch.autograd.grad(ref, (xr, sr))
    lo, hi = offs[rank], offs[rank + 1]
    x = x_all[lo:hi].clone().requires_grad_(True)
    scale = s.clone().requires_grad_(True)
    distributed_clip_loss(x, y_all[lo:hi], scale, mode=mode, group_size=n, backend="torch").backward()
    torch.testing.assert_close(x.grad, world * gx[lo:hi], rtol=1e-9, atol=1e-12)
    mean_ds = scale.grad.reshape(1).clone()
    dist.all_reduce(mean_ds)
    torch.testing.assert_close(mean_ds / world, gs.reshape(1), rtol=1e-9, atol=1e-12)


def _expect_error_everywhere(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def _world2(rank, world):
    f64 = torch.float64
    for mode in ("global", "ring", "hierarchical"):
        _run_case(rank, world, mode, [6, 6], n=1 if mode == "hierarchical" else None, grads=[1.0, -0.5])
    _run_case(rank, world, "grouped", [5, 7], n=1, grads=[0.3, 2.0])   # each rank alone
    _run_case(rank, world, "grouped", [5, 7], n=2, eps=0.1)            # the sub-group is the world
    _run_case(rank, world, "global", [7, 4], eps=0.2, grads=[2.0, 0.5], bias=True)
    _convention_check(rank, world, "global")
    # float32 features: fp32 accumulation, checked against the float64 reference
    _run_case(rank, world, "ring", [9, 8], dtype=torch.float32, eps=0.1)
    _run_case(rank, world, "global", [6, 5], dtype=torch.bfloat16, eps=0.1, grads=[1.0, 0.5])

    # open_clip's ClipLoss(local_loss=True, gather_with_grad=True): same loss and gradients
    spec = importlib.util.spec_from_file_location(
        "open_clip_loss", os.path.join(sysconfig.get_paths()["purelib"], "open_clip", "loss.py"))
    oc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oc)
    x_all, y_all, s, offs = make_batch([8, 8], 16, seed=3)
    lo, hi = offs[rank], offs[rank + 1]

    def same_as_open_clip(local_loss, gather_with_grad, upstream=1.0, mean_ds=False):
        """Loss and gradients of open_clip's ClipLoss and ours with the same arguments, on this rank."""
        results = []
        for impl in (oc.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                 world_size=world),
                     ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                              world_size=world, backend="torch")):
            x = x_all[lo:hi].clone().requires_grad_(True)
            y = y_all[lo:hi].clone().requires_grad_(True)
            scale = s.clone().requires_grad_(True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the truncated-gradient warning
                loss = impl(x, y, scale)
            (loss * upstream).backward()
            ds = scale.grad.reshape(1).clone()
            if mean_ds:
                dist.all_reduce(ds)
            results.append((loss.detach(), x.grad, y.grad, ds))
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)

    # local_loss=True, gather_with_grad=True: same loss and feature gradients; the logit-scale gradient
    # is split over the ranks differently (docs/distributed.md) with the same sum
    same_as_open_clip(True, True, mean_ds=True)
    # local_loss=True, gather_with_grad=False: its truncated gradient, per-rank ds included
    same_as_open_clip(True, False, upstream=1.0 + rank)
    # without local_loss: the full loss on every rank, open_clip's gradient scaling, and the same
    # logit-scale gradient on every rank as open_clip's (compared per rank, not only its mean)
    same_as_open_clip(False, True)
    same_as_open_clip(False, False)

    # mismatched feature sizes / dtypes / bad input on one rank: every rank raises
    x = torch.randn(4, 16 if rank == 0 else 8, dtype=f64)
    _expect_error_everywhere(lambda: clip_loss(x, x, 10.0, mode="global"), ValueError, "feature sizes differ")
    x = torch.randn(4, 8, dtype=f64 if rank == 0 else torch.float32)
    _expect_error_everywhere(lambda: clip_loss(x, x, 10.0, mode="ring"), TypeError, "dtypes differ")
    x = torch.randn(4, 8, dtype=f64)
    bad = x[None] if rank == 1 else x
    _expect_error_everywhere(lambda: clip_loss(bad, x, 10.0, mode="global"), ValueError,
                             "on rank \\[1\\]: rank 1: ValueError: image_features must be 2-D")
    # the bad rank's TypeError stays a TypeError, on every rank, naming the rank and the problem
    ints = x.long() if rank == 1 else x
    _expect_error_everywhere(lambda: clip_loss(ints, ints, 10.0, mode="ring"), TypeError,
                             "rank 1: TypeError: image_features must be float32")
    nan = x.clone()
    if rank == 0:
        nan[1, 1] = float("nan")
    _expect_error_everywhere(lambda: clip_loss(nan, x, 10.0, mode="global", check_finite=True), ValueError,
                             "rank 0: ValueError: image_features contains NaN")
    _expect_error_everywhere(lambda: clip_loss(x, x, 10.0, mode="global", label_smoothing=0.1 + rank),
                             ValueError, "rank 1: ValueError: label_smoothing must be in")
    _expect_error_everywhere(lambda: clip_loss(x, x, 10.0, mode="global",
                                               backend="cuda" if rank else "torch"),
                             ValueError, "rank 1: ValueError: backend must be one of")
    _expect_error_everywhere(lambda: clip_loss(x, x[:3] if rank else x, 10.0, mode="global"), ValueError,
                             "rank 1: ValueError: batch sizes differ")
    _expect_error_everywhere(lambda: clip_loss(x, x, 10.0 + rank, mode="global", check_finite=True),
                             ValueError, "logit_scale differs")
    empty = torch.zeros(0, 8, dtype=f64)
    _expect_error_everywhere(lambda: clip_loss(empty, empty, 10.0, mode="global"), ValueError, "empty")
    with pytest.raises(ValueError, match="mode must be one of"):
        clip_loss(x, x, 10.0, mode="nope")
    _expect_error_everywhere(lambda: ClipLoss(rank=rank, world_size=3)(x, x, 10.0), ValueError,
                             "rank=0, world_size=3 do not match the process group")
    # a wrong rank/world_size on one rank only: every rank raises (none waits in a collective)
    for make in (lambda: ClipLoss(rank=rank, world_size=2 if rank == 0 else 3, local_loss=True),
                 lambda: ClipLoss(rank=0, world_size=2, mode="global")):
        _expect_error_everywhere(lambda make=make: make()(x, x, 10.0), ValueError,
                                 "rank \\[1\\]: rank 1: .*do not match")
    _expect_error_everywhere(lambda: clip_loss(x, x, 10.0, mode="grouped", group_size=1 if rank == 0 else 3),
                             ValueError, "on rank \\[1\\]: rank 1: ValueError: group_size=3 does not divide")
    _expect_error_everywhere(lambda: clip_loss(x, x, 10.0, mode="grouped", group_size=1 + rank), ValueError,
                             "disagree on \\(mode, group_size\\)")
    # no-grad calls give the same share
    x_all, y_all, s, offs = make_batch([5, 6], 8, seed=4)
    xs, ys = x_all[offs[rank]:offs[rank + 1]], y_all[offs[rank]:offs[rank + 1]]
    with torch.no_grad():
        share = clip_loss(xs, ys, s, mode="ring", backend="torch")
    assert not share.requires_grad
    torch.testing.assert_close(share, shares_ref(x_all, y_all, s, offs, [1.0, 1.0])[0][rank])
    # the group is still usable after the errors
    _run_case(rank, world, "global", [3, 3])


def _world3(rank, world):
    # uneven shards, an empty shard, label smoothing, arbitrary upstream gradients
    for mode, n in (("global", None), ("ring", None), ("hierarchical", 1), ("grouped", 3)):
        _run_case(rank, world, mode, [4, 9, 6], n=n, eps=0.1, grads=[1.0, -2.0, 0.5])
        _run_case(rank, world, mode, [5, 0, 7], n=n, grads=[0.7, 1.3, 1.0], seed=1)
    _convention_check(rank, world, "ring")
    # float32 through the triton kernels (interpreter) at tiny sizes
    _run_case(rank, world, "ring", [5, 8, 3], backend="triton", dtype=torch.float32, eps=0.05)
    _run_case(rank, world, "global", [8, 8, 6], backend="triton", dtype=torch.float32)


def _world4(rank, world):
    # sub-groups of 2 in a world of 4
    _run_case(rank, world, "hierarchical", [6, 3, 5, 4], n=2, eps=0.1, grads=[1.0, 0.5, -1.0, 2.0])
    _run_case(rank, world, "hierarchical", [4, 0, 5, 4], n=2, seed=2)
    _run_case(rank, world, "grouped", [6, 3, 5, 4], n=2, eps=0.1, grads=[1.0, 0.5, -1.0, 2.0])
    _run_case(rank, world, "grouped", [4, 0, 0, 4], n=2, seed=2)
    _run_case(rank, world, "global", [6, 6, 6, 6])
    _run_case(rank, world, "ring", [6, 5, 6, 1], grads=[1.0, 2.0, 3.0, 4.0])
    _convention_check(rank, world, "hierarchical", n=2)
    os.environ["LOCAL_WORLD_SIZE"] = "2"   # the default group size for hierarchical / grouped
    _run_case(rank, world, "hierarchical", [5, 5, 5, 5])
    del os.environ["LOCAL_WORLD_SIZE"]
    for mode, n in (("global", None), ("ring", None), ("hierarchical", 2), ("grouped", 2)):
        _run_case(rank, world, mode, [8, 6, 8, 7], n=n, backend="triton", dtype=torch.float32, eps=0.1)
    # an empty sub-group: every rank raises
    x = torch.randn(0 if rank < 2 else 4, 8, dtype=torch.float64)
    _expect_error_everywhere(lambda: clip_loss(x, x, 10.0, mode="grouped", group_size=2), ValueError,
                             "sub-group\\(s\\) \\[0\\]")

    # topology helpers
    sub = consecutive_subgroups(2)
    assert (sub.size, sub.num_groups, sub.index, sub.local_rank) == (2, 2, rank // 2, rank % 2)
    assert list(dist.get_process_group_ranks(sub.inner)) == [rank // 2 * 2, rank // 2 * 2 + 1]
    assert list(dist.get_process_group_ranks(sub.cross)) == [rank % 2, rank % 2 + 2]
    assert consecutive_subgroups(2).inner is sub.inner          # cached, not re-created
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    assert node_subgroups().inner_ranks == sub.inner_ranks
    del os.environ["LOCAL_WORLD_SIZE"]
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE is not set"):
        node_subgroups()
    with pytest.raises(ValueError, match="does not divide"):
        consecutive_subgroups(3)
    pairs = subgroups_from_rank_lists([[0, 2], [1, 3]])
    assert list(dist.get_process_group_ranks(pairs)) == [rank % 2, rank % 2 + 2]
    with pytest.raises(ValueError, match="overlap"):
        subgroups_from_rank_lists([[0, 1], [1, 2, 3]])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("node", "local"))
    assert list(dist.get_process_group_ranks(mesh_dim_group(mesh, "local"))) == list(sub.inner_ranks)
    # a loss over an explicit group (the mesh's "node" dimension: ranks {l, l + 2})
    x_all, y_all, s, offs = make_batch([3, 4, 5, 6], 8, seed=11)
    pg = mesh_dim_group(mesh, "node")
    members = [rank % 2, rank % 2 + 2]
    xs = torch.cat([x_all[offs[q]:offs[q + 1]] for q in members])
    ys = torch.cat([y_all[offs[q]:offs[q + 1]] for q in members])
    x = x_all[offs[rank]:offs[rank + 1]].clone().requires_grad_(True)
    loss = clip_loss(x, y_all[offs[rank]:offs[rank + 1]], s, mode="ring", group=pg, backend="torch")
    loss.backward()
    sub_offs = [0, offs[members[0] + 1] - offs[members[0]], xs.shape[0]]
    shares, dx, _, _ = shares_ref(xs, ys, s, sub_offs, [1.0, 1.0])
    me = members.index(rank)
    torch.testing.assert_close(loss, shares[me])
    torch.testing.assert_close(x.grad, dx[sub_offs[me]:sub_offs[me + 1]])

    # counted bytes of the collectives == comm_bytes formulas (equal shards)
    b, d = 4, 8
    for mode, n, eps in (("global", None, 0.0), ("ring", None, 0.1), ("hierarchical", 2, 0.1),
                         ("grouped", 2, 0.0), ("hierarchical", 1, 0.0), ("grouped", 4, 0.1)):
        x_all, y_all, s, offs = make_batch([b] * world, d, seed=5)
        x = x_all[offs[rank]:offs[rank + 1]].float().requires_grad_(True)
        y = y_all[offs[rank]:offs[rank + 1]].float()
        with CommCounter() as fwd:
            loss = clip_loss(x, y, 10.0, mode=mode, group_size=n, label_smoothing=eps, backend="torch")
        with CommCounter() as bwd:
            loss.backward()
        expect = comm_bytes(mode, b, d, world, group_size=n, dtype=torch.float32, label_smoothing=eps)
        assert fwd.sent == pytest.approx(expect["forward"]["sent"]), (mode, n, fwd.calls)
        assert fwd.received == pytest.approx(expect["forward"]["received"]), (mode, n)
        assert bwd.sent == pytest.approx(expect["backward"]["sent"]), (mode, n, bwd.calls)

    # passes over this rank's b x B logits: forward 1; backward 3, or 2 with the kept dot products
    x_all, y_all, s, offs = make_batch([6, 3, 5, 4], 8, seed=9)
    results = {}
    for mode, n, span in (("global", None, 18), ("ring", None, 18), ("hierarchical", 2, 18),
                          ("grouped", 2, 9 if rank < 2 else 9)):
        for store in (False, True):
            x = x_all[offs[rank]:offs[rank + 1]].float().requires_grad_(True)
            y = y_all[offs[rank]:offs[rank + 1]].float().requires_grad_(True)
            scale = s.float().requires_grad_(True)
            with PassCounter() as fwd:
                loss = clip_loss(x, y, scale, mode=mode, group_size=n, label_smoothing=0.1, backend="torch",
                                 store_logits=store)
            with PassCounter() as bwd:
                (loss * (rank + 1)).backward()
            b = x.shape[0]
            assert fwd.passes(b, span) == 1, (mode, store, fwd.calls)
            assert bwd.passes(b, span) == (2 if store else 3), (mode, store, bwd.calls)
            results[mode, store] = (loss.detach(), x.grad, y.grad, scale.grad)
    for mode in ("global", "ring", "hierarchical", "grouped"):
        for a, b in zip(results[mode, False], results[mode, True]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # differentiable collectives: backward runs the other way
    x = torch.full((2, 3), float(rank), dtype=torch.float64, requires_grad=True)
    sizes = [2, 1, 0, 2]
    part = x[:sizes[rank]]
    full = C.all_gather_with_grad(part, sizes=sizes)
    assert full.shape[0] == sum(sizes)
    (full * torch.arange(1, 6, dtype=torch.float64)[:, None]).sum().backward()
    offs = [0, 2, 3, 3, 5]
    expect = torch.zeros(2, 3, dtype=torch.float64)
    mine = torch.arange(offs[rank] + 1, offs[rank + 1] + 1, dtype=torch.float64)
    expect[:sizes[rank]] = world * mine[:, None]
    torch.testing.assert_close(x.grad, expect)
    x = torch.full((3,), float(rank), dtype=torch.float64, requires_grad=True)
    got = C.ring_shift(x)
    assert float(got[0]) == (rank - 1) % world
    (got * (rank + 1)).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), float((rank + 1) % world + 1), dtype=torch.float64))
    x = torch.full((world * 2,), float(rank + 1), dtype=torch.float64, requires_grad=True)
    got = C.reduce_scatter_with_grad(x)
    torch.testing.assert_close(got, torch.full((2,), 10.0, dtype=torch.float64))
    (got * (rank + 1)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(1, world + 1, dtype=torch.float64).repeat_interleave(2))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_modes_against_reference(world):
    spawn({2: _world2, 3: _world3, 4: _world4}[world], world)


def test_comm_bytes_formulas():
    # closed forms (bytes, fp32, b=8 rows, D=64, W=4): the features dominate
    # (the log-sum-exps travel in float64)
    g = comm_bytes("global", 8, 64, 4)
    assert g["forward"]["sent"] == 3 * 8 * 8 + 3 * 8 * 64 * 4 + 4 * 3 * 8 * 8
    r = comm_bytes("ring", 8, 64, 4)
    assert r["forward"]["sent"] == 3 * 8 * 8 + 3 * 8 * 64 * 4 + 4 * 8 * 8
    assert comm_bytes("hierarchical", 8, 64, 4, group_size=4) == g
    assert comm_bytes("hierarchical", 8, 64, 4, group_size=1) == r
    assert comm_bytes("grouped", 8, 64, 4, group_size=2)["backward"]["sent"] == 4 + 8 * 64 * 4
    with pytest.raises(ValueError, match="does not divide"):
        comm_bytes("grouped", 8, 64, 4, group_size=3)
    with pytest.raises(ValueError, match="mode"):
        comm_bytes("sideways", 8, 64, 4)


def test_single_process_unchanged_and_argument_errors():
    x = torch.randn(6, 8, dtype=torch.float64)
    y = torch.randn(6, 8, dtype=torch.float64)
    torch.testing.assert_close(clip_loss(x, y, 5.0), clip_loss_ref(x, y, 5.0))
    with pytest.raises(ValueError, match="need a distributed mode"):
        clip_loss(x, y, 5.0, group_size=2)
    with pytest.raises(ValueError, match="need a distributed mode"):
        ClipLoss(group_size=2)
    with pytest.raises(ValueError, match="mode must be"):
        ClipLoss(mode="local")
    with pytest.raises(RuntimeError, match="not initialized"):
        clip_loss(x, y, 5.0, mode="global")

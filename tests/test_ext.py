"""The csrc/ extension: built, loaded, and equal to torch.distributed (gloo) through both paths.

The CI builds the extension with `pip install --no-build-isolation -e .` (scripts/setup_env.sh), so a
missing extension FAILS here unless the build was turned off with M2_BUILD_EXT=0.
"""

from __future__ import annotations

import os
import tempfile
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m2kernels import _ext
from m2kernels.distributed import collectives as co

EXT_EXPECTED = os.environ.get("M2_BUILD_EXT", "auto").strip().lower() not in ("0", "false", "no", "off")


def _require_ext():
    if not EXT_EXPECTED:
        pytest.skip("M2_BUILD_EXT=0: the extension was not built on purpose")
    assert _ext.load(), f"extension not loaded: {_ext.status()['_C'].reason}"


# ------------------------------------------------------------------------------------------------
# build and load


def test_extension_is_built_and_matches_torch():
    if not EXT_EXPECTED:
        pytest.skip("M2_BUILD_EXT=0")
    path = _ext.find_library("_C")
    assert path is not None, "m2kernels/_C*.so missing: run `pip install --no-build-isolation -e .`"
    assert _ext.library_torch_version(path) == torch.__version__
    _require_ext()
    st = _ext.status()["_C"]
    assert st.loaded and st.matches_torch
    assert torch.ops.m2kernels.build_torch_version() == torch.__version__
    assert co.using_extension()


def test_library_built_for_other_torch_is_refused(monkeypatch, tmp_path):
    path = _ext.find_library("_C")
    if path is None:
        pytest.skip("no library to refuse")
    # The marker is read from the file itself: a copy with another version string reads back as such.
    data = open(path, "rb").read()
    marker = f"M2KERNELS_BUILD_TORCH_VERSION={torch.__version__};".encode()
    assert data.count(marker) == 1
    other = "9" * len(torch.__version__)
    (tmp_path / "copy.so").write_bytes(data.replace(marker, marker.replace(torch.__version__.encode(),
                                                                           other.encode())))
    assert _ext.library_torch_version(str(tmp_path / "copy.so")) == other
    monkeypatch.setattr(_ext, "_status", {})
    monkeypatch.setattr(_ext, "_warned", False)
    monkeypatch.setattr(_ext, "library_torch_version", lambda path: "1.0.0")
    with pytest.warns(RuntimeWarning, match="built for torch 1.0.0"):
        assert _ext.load() is False
    st = _ext._status["_C"]
    assert not st.loaded and st.matches_torch is False


def test_disable_env_forces_python_path():
    """The choice is made once, at import: a process started with M2_DISABLE_EXT=1 uses Python."""
    import subprocess
    import sys

    code = ("from m2kernels.distributed import collectives as co; from m2kernels import _ext; "
            "assert co.USE_EXTENSION is False and co.using_extension() is False and _ext.load() is False; "
            "print('python path')")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, M2_DISABLE_EXT="1"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "python path" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# single-process (world size 1) checks: validation errors and torch.compile


@pytest.fixture(scope="module")
def world1():
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    fd, path = tempfile.mkstemp(prefix="m2ext_")
    os.close(fd)
    os.unlink(path)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        if os.path.exists(path):
            os.unlink(path)


@pytest.mark.parametrize("use_ext", [True, False])
def test_bad_inputs_raise_clear_errors(world1, use_ext):
    if use_ext:
        _require_ext()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="non-empty"):
        co.all_gather_coalesced([], use_extension=use_ext)
    with pytest.raises(TypeError, match="list of tensors"):
        co.all_gather_coalesced(x, use_extension=use_ext)
    with pytest.raises(ValueError, match="0-dimensional"):
        co.ring_exchange([x, torch.tensor(1.0)], use_extension=use_ext)
    # Mixed dtypes in a reduce-scatter: one collective per dtype, results in input order.
    a, b = co.reduce_scatter_coalesced([x, x.double()], use_extension=use_ext)
    assert a.dtype == torch.float32 and b.dtype == torch.float64
    assert torch.equal(a, x) and torch.equal(b, x.double())
    with pytest.raises(TypeError, match="torch.Tensor"):
        co.all_gather_coalesced([x, 3], use_extension=use_ext)


def test_compiled_ops_check_inputs_themselves(world1):
    _require_ext()
    name = world1.group_name
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="one dtype"):
        torch.ops.m2kernels.reduce_scatter_coalesced([x, x.double()], name)
    with pytest.raises(ValueError, match="non-empty"):
        torch.ops.m2kernels.all_gather_coalesced([], name)
    with pytest.raises(ValueError, match="0-dimensional"):
        torch.ops.m2kernels.ring_exchange([torch.tensor(2.0)], name)


def test_torch_compile_fullgraph(world1):
    """The ops trace under torch.compile(fullgraph=True), forward and backward.

    backend="aot_eager": it runs the same FakeTensor/AOTAutograd tracing as inductor (Meta kernels,
    the registered autograd formula) without inductor's C++ code generation, which alone would take
    minutes on the 2-core CI machine.
    """
    _require_ext()
    name = world1.group_name

    def f(x, y):
        gx, gy = torch.ops.m2kernels.all_gather_coalesced([x, y], name)
        (rx,) = torch.ops.m2kernels.reduce_scatter_coalesced([gx * 2.0], name)
        (ry,) = torch.ops.m2kernels.ring_exchange([gy], name)
        return (rx.sum() + (gy * ry).sum()) * 0.5

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.randn(5, 2, requires_grad=True)
    out = compiled(x, y)
    out.backward()
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    ref = f(x2, y2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    # World size 1: rx = 2x, so d(0.5 * sum(2x))/dx = 1; gy = y and ring(y) = y (ring is detached).
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    torch.testing.assert_close(y.grad, 0.5 * y.detach())

    # The public functions trace too (with check=False: the rank-agreement check is eager-only).
    def g(x, y):
        a, b = co.all_gather_coalesced([x, y], world1, check=False)
        (r,) = co.reduce_scatter_coalesced([a * 3.0], world1, check=False)
        return r.sum() + b.sum()

    x.grad = y.grad = None
    out = torch.compile(g, fullgraph=True, backend="aot_eager")(x, y)
    out.backward()
    torch.testing.assert_close(out, 3.0 * x.detach().sum() + y.detach().sum())
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    torch.testing.assert_close(y.grad, torch.ones_like(y))


# ------------------------------------------------------------------------------------------------
# multi-process gloo checks


def _rank_tensors(seed: int, requires_grad: bool = False) -> list[torch.Tensor]:
    """A deterministic mixed-dtype list that depends on the (global) rank `seed`."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = [
        torch.randn(3, 5, generator=g),
        torch.randn(2, 1, 4, generator=g).double(),
        torch.randint(-50, 50, (4,), generator=g),
        torch.randn(1, 3, generator=g).to(torch.bfloat16),
        torch.randn(6, 2, generator=g)[:, :1],  # non-contiguous
        torch.zeros(0, 7),  # empty
    ]
    if requires_grad:
        for t in out[:2]:
            t.requires_grad_(True)
    return out


def _check_paths(group, members: list[int], use_ext: bool) -> None:
    """All ops on `group` (global ranks `members`) against locally known and dist results."""
    rank = dist.get_rank()
    me = members.index(rank)
    world = len(members)
    mine = _rank_tensors(rank)

    # all-gather == concatenation of every member's tensors; also == dist.all_gather per tensor.
    got = co.all_gather_coalesced(mine, group, use_extension=use_ext)
    for i, t in enumerate(mine):
        expected = torch.cat([_rank_tensors(r)[i] for r in members])
        assert got[i].dtype == t.dtype and got[i].shape == expected.shape, (i, got[i].shape)
        assert torch.equal(got[i], expected), f"all_gather tensor {i} differs"
    pieces = [torch.empty_like(mine[0]) for _ in members]
    dist.all_gather(pieces, mine[0], group=group)
    assert torch.equal(got[0], torch.cat(pieces))

    # reduce-scatter (sum) == dist.reduce_scatter of the same chunks.
    fl = [torch.randn(2 * world, 3, generator=torch.Generator().manual_seed(rank)),
          torch.randn(world, generator=torch.Generator().manual_seed(50 + rank)).double(),
          torch.zeros(0, 3),
          torch.randn(world, 2, generator=torch.Generator().manual_seed(90 + rank))]
    got = co.reduce_scatter_coalesced(fl, group, use_extension=use_ext)
    for i, t in enumerate(fl):
        if t.numel() == 0:
            assert got[i].shape == (0, 3) and got[i].dtype == t.dtype
            continue
        ref = torch.empty_like(t.chunk(world)[0])
        dist.reduce_scatter(ref, list(t.chunk(world)), op=dist.ReduceOp.SUM, group=group)
        assert got[i].dtype == t.dtype
        torch.testing.assert_close(got[i], ref, rtol=1e-6, atol=1e-6)
        expected = sum(
            [torch.randn(2 * world, 3, generator=torch.Generator().manual_seed(r)),
             torch.randn(world, generator=torch.Generator().manual_seed(50 + r)).double(),
             torch.zeros(0, 3),
             torch.randn(world, 2, generator=torch.Generator().manual_seed(90 + r))][i] for r in members
        ).chunk(world)[me]
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-6)

    # ring: receive what the previous member sent (the next one with reverse=True); blocking and
    # async give the same.
    for reverse in (False, True):
        src = members[(me + 1) % world] if reverse else members[(me - 1) % world]
        for got in (co.ring_exchange(mine, group, reverse=reverse, use_extension=use_ext),
                    co.ring_exchange_async(mine, group, reverse=reverse, use_extension=use_ext).wait()):
            for i, t in enumerate(_rank_tensors(src)):
                assert got[i].dtype == t.dtype and torch.equal(got[i], t), f"ring tensor {i} differs"

    # gradients through the all-gather: loss_k = sum_i <w_k,i, gathered_i> on every member k, so
    # d(sum_k loss_k)/d x_r = sum_k (rows of member r in w_k,i).
    xs = _rank_tensors(rank, requires_grad=True)[:2]
    gathered = co.all_gather_coalesced(xs, group, use_extension=use_ext)

    def weights(k):
        g = torch.Generator().manual_seed(777 + k)
        return [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in gathered]

    loss = sum((w * o).sum() for w, o in zip(weights(rank), gathered))
    loss.backward()
    for i, x in enumerate(xs):
        n = x.shape[0]
        expected = sum(weights(k)[i][me * n:(me + 1) * n] for k in members)
        torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def _worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        paths = [False] + ([True] if EXT_EXPECTED else [])
        if EXT_EXPECTED:
            assert _ext.load(), _ext.status()["_C"].reason
        for use_ext in paths:
            _check_paths(dist.group.WORLD, list(range(world)), use_ext)
        if world == 4:
            groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            mine = groups[rank // 2]
            for use_ext in paths:
                _check_paths(mine, [rank // 2 * 2, rank // 2 * 2 + 1], use_ext)
        if world == 2:
            # Ranks that disagree on shapes get a ValueError on every rank, not a hang.
            bad = [torch.zeros(2 + rank, 3)]
            for use_ext in paths:
                try:
                    co.reduce_scatter_coalesced([torch.zeros(3, 2)], use_extension=use_ext)
                except ValueError as e:
                    assert "not divisible by the group size 2" in str(e)
                else:
                    raise AssertionError("3 rows were scattered over 2 ranks")
                try:
                    co.all_gather_coalesced(bad, use_extension=use_ext)
                except ValueError as e:
                    assert "disagree" in str(e)
                else:
                    raise AssertionError("mismatched shapes were not detected")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(result_dir, f"error_{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    open(os.path.join(result_dir, f"ok_{rank}"), "w").close()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_collectives_match_torch_distributed(world, tmp_path):
    init_file = str(tmp_path / "init")
    mp.spawn(_worker, args=(world, init_file, str(tmp_path)), nprocs=world, join=True)
    errors = sorted(tmp_path.glob("error_*.txt"))
    assert not errors, errors[0].read_text()
    assert len(list(tmp_path.glob("ok_*"))) == world

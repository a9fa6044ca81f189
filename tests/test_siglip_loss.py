"""The fused sigmoid (SigLIP) loss against a float64 reference and against open_clip's SigLipLoss.

Tolerance rule (flash-attention's, as in tests/test_clip_loss.py): a backend's error against the float64
reference must be at most twice the error of plain PyTorch computing the same loss in the same dtype,
plus a small atol relative to the size of the terms that add up in each output.
"""

import pytest
import torch
import torch.nn.functional as F

from m2kernels import SigLipLoss, siglip_loss, siglip_loss_ref
from m2kernels.ops import siglip_loss as siglip_ops
from m2kernels.ops import tiling
from m2kernels.ops.clip_loss import BlockOptions
from m2kernels.ops.tiling import HAS_TRITON
from m2kernels.reference import open_clip_loss_module
from tests.layouts import non_contiguous_pairs

# dtype -> (factor, atol relative to the sum of the absolute terms of each output)
TOLERANCE = {
    torch.float32: (2.0, 2e-6),
    torch.float16: (2.0, 1e-3),
    torch.bfloat16: (2.0, 8e-3),
}
NAMES = ["loss", "d_image", "d_text", "d_scale", "d_bias"]

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.fixture
def small_tiles(monkeypatch):
    """32 x 32 tiles under the interpreter: small batches then span many tiles (partials of many tiles,
    tiles that hold part of the diagonal or none of it, the grouped tile order)."""
    monkeypatch.setattr(tiling, "INTERPRETER_CONFIG", dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, GROUP_M=2))


def make_inputs(b, d, dtype=torch.float32, seed=0, scale=10.0, bias=-5.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = x + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)  # positives are correlated
    x, y = F.normalize(x, dim=-1).to(dtype), F.normalize(y, dim=-1).to(dtype)
    return x, y, torch.tensor(scale), torch.tensor(bias)


def loss_and_grads(fn, x, y, s, t, upstream):
    x, y, s = (v.detach().clone().requires_grad_(True) for v in (x, y, s))
    t = None if t is None else t.detach().clone().requires_grad_(True)
    loss = fn(x, y, s, t)
    inputs = [x, y, s] + ([t] if t is not None else [])
    grads = torch.autograd.grad(loss * upstream, inputs)
    return [loss.detach()] + [g.detach() for g in grads]


def term_magnitudes(x, y, s, t, upstream):
    """Per output, the sum of the absolute values of the terms that add up in it (float64)."""
    x, y = x.double(), y.double()
    b = x.shape[0]
    dots = x @ y.T
    z = float(s) * dots + (0.0 if t is None else float(t))
    labels = 2 * torch.eye(b, dtype=torch.float64) - 1
    g = (torch.sigmoid(-labels * z)).abs() * abs(float(upstream)) / b  # |G| with its weight
    terms = F.softplus(-labels * z).sum() / b
    s = abs(float(s))
    return [float(terms), s * float((g @ y.abs()).max()), s * float((g.T @ x.abs()).max()),
            float((g * dots.abs()).sum()), float(g.sum())]


def assert_close_rule(ours, plain, ref, dtype, what, magnitudes):
    factor, atol = TOLERANCE[dtype]
    for name, o, p, r, mag in zip(NAMES, ours, plain, ref, magnitudes):
        r = r.double()
        err = (o.double() - r).abs().max().item()
        plain_err = (p.double() - r).abs().max().item()
        bound = factor * plain_err + atol * max(r.abs().max().item(), mag)
        assert err <= bound, (f"{what}: {name} error {err:.3g} > {bound:.3g} "
                              f"(plain {dtype} error {plain_err:.3g})")


def check(backend, b, d, dtype=torch.float32, chunk=None, bias=True, seed=0, inputs=None, **kw):
    x, y, s, t = inputs if inputs is not None else make_inputs(b, d, dtype, seed=seed)
    t = t if bias else None
    upstream = torch.randn((), generator=torch.Generator().manual_seed(seed + 1)).double() + 1.5
    ours = loss_and_grads(lambda x, y, s, t: siglip_loss(x, y, s, t, backend=backend, chunk_size=chunk, **kw),
                          x, y, s, t, upstream.float())
    plain = loss_and_grads(lambda x, y, s, t: siglip_loss_ref(x, y, s, t, upcast=False), x, y, s, t,
                           upstream.to(dtype))
    ref = loss_and_grads(lambda x, y, s, t: siglip_loss_ref(x, y, s, t), x, y, s, t, upstream)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == x.dtype and ours[1].shape == x.shape
    assert ours[3].dtype == s.dtype
    assert_close_rule(ours, plain, ref, dtype, f"{backend} b={b} d={d} {dtype} chunk={chunk} bias={bias}",
                      term_magnitudes(x, y, s, t, upstream))
    return ours, ref


# ---------------------------------------------------------------------------------------------
# torch backend: awkward shapes and dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 2, 3, 127, 300])
@pytest.mark.parametrize("d", [1, 17, 64, 257])
def test_torch_backend_shapes(b, d):
    check("torch", b, d, chunk=max(1, b // 3 + 1), bias=bool(d % 2))  # chunks that do not divide b


def test_torch_backend_large_batch():
    check("torch", 1000, 33, chunk=333)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d", [(3, 17), (300, 64), (127, 257)])
def test_torch_backend_half(dtype, b, d):
    check("torch", b, d, dtype=dtype, chunk=50)


# ---------------------------------------------------------------------------------------------
# triton backend (interpreter on the CPU)
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("b,d", [(1, 1), (2, 17), (3, 64), (127, 257), (300, 512), (129, 1)])
def test_triton_backend_shapes(b, d):
    check("triton", b, d, bias=b != 3)


@needs_triton
@pytest.mark.parametrize("b,d,chunk", [(33, 40, None), (100, 64, 37), (161, 17, 64)])
def test_triton_many_tiles(small_tiles, b, d, chunk):
    check("triton", b, d, chunk=chunk)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d", [(3, 17), (300, 64)])
def test_triton_backend_half(dtype, b, d):
    check("triton", b, d, dtype=dtype)


@needs_triton
def test_triton_fp16_native_at_2048_no_underflow():
    """fp16 runs natively under the interpreter (no upcast): G is stored in fp16, and its entries
    for the negatives (sigmoid of z ~ -10) would be lost to fp16's range without the storage scale."""
    from m2kernels.ops.siglip_kernels import launch_args

    x, y, s, t = make_inputs(2048, 16, torch.float16, seed=4, bias=-10.0)
    assert launch_args(x, y, s, t, None, torch.zeros(3, 1), None, True)["UPCAST"] is False  # only bf16 is
    ours, _ = check("triton", 2048, 16, torch.float16, inputs=(x, y, s, t))  # upcast under the interpreter
    assert (ours[2].float().norm(dim=1) > 0).all()


def test_triton_matches_torch_backend():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    a, _ = check("triton", 257, 40)
    b, _ = check("torch", 257, 40, chunk=64)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    ours, _ = check(backend, 200, 33)
    again, _ = check(backend, 200, 33)
    for a, b in zip(ours, again):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# numerics: tiny terms, huge logits, autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_of_tiny_negative_terms(backend):
    """A block without positives whose z are all near -20: each term is ~2e-9, below fp32's rounding of
    1 + e, and their sum is what the loss is. log(1 + e) would give 0; log1p must be exact there."""
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(150, 32, generator=g), dim=-1)
    y = F.normalize(torch.randn(170, 32, generator=g), dim=-1)
    s, t = torch.tensor([4.0]), torch.tensor([-20.0])
    z = s.double() * (x.double() @ y.double().T) + t.double()
    want = F.softplus(z).sum()  # labels -1 everywhere
    opts = BlockOptions(backend, 1 << 30, 64)
    got = siglip_ops.siglip_block(x, y, s, t, None, opts).loss
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    with_grad = siglip_ops.siglip_block(x, y, s, t, None, opts, want_grad=True)
    torch.testing.assert_close(with_grad.loss.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(with_grad.dt.double(), torch.sigmoid(z).sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e3, 1e6, 1e8])
def test_large_logits_against_float64(backend, magnitude):
    """Unnormalised features: |z| up to ~1e8, softplus far in both tails, sigmoid saturated."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(96, 24, generator=g, dtype=torch.float64)
    y = x + 0.1 * torch.randn(96, 24, generator=g, dtype=torch.float64)
    x, y = ((v * (magnitude / 24) ** 0.5).float() for v in (x, y))
    ours, _ = check(backend, 96, 24, inputs=(x, y, torch.tensor(1.0), torch.tensor(-3.0)))
    assert ours[0] >= 0 and all(torch.isfinite(v).all() for v in ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_change_the_loss(backend):
    """open_clip_train calls the loss inside autocast: it must still accumulate in fp32."""
    x, y, s, t = make_inputs(130, 40, seed=8)
    fn = lambda x, y, s, t: siglip_loss(x, y, s, t, backend=backend)
    plain = loss_and_grads(fn, x, y, s, t, torch.tensor(1.3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = loss_and_grads(fn, x, y, s, t, torch.tensor(1.3))
    for a, b in zip(plain, under):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# semantics: open_clip, bias, chunking, no_grad, non-contiguous, compile, passes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,d", [(1, 8), (3, 5), (128, 64), (77, 33)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_open_clip(b, d, backend):
    oc = open_clip_loss_module()
    x, y, s, t = make_inputs(b, d, seed=5)
    upstream = torch.tensor(0.7)
    for bias in (t, None):  # open_clip's get_logits skips a None bias
        ref = loss_and_grads(lambda x, y, s, t: oc.SigLipLoss()(x, y, s, t), x, y, s, bias, upstream)
        ours = loss_and_grads(lambda x, y, s, t: SigLipLoss(backend=backend)(x, y, s, t), x, y, s, bias,
                              upstream)
        for name, o, r in zip(NAMES, ours, ref):
            torch.testing.assert_close(o, r, rtol=2e-5, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")
    out = SigLipLoss(backend=backend)(x, y, s, t, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], oc.SigLipLoss()(x, y, s, t, output_dict=True)
                               ["contrastive_loss"], rtol=2e-5, atol=2e-6)


def test_open_clip_constructor_arguments_accepted():
    x, y, s, t = make_inputs(9, 4)
    want = siglip_loss_ref(x, y, s, t)
    for impl in (None, "bidir", "shift", "reduce", "gather"):
        loss = SigLipLoss(cache_labels=True, rank=0, world_size=1, dist_impl=impl)
        assert loss.dist_impl == (impl or "bidir") and loss.cache_labels
        torch.testing.assert_close(loss(x, y, s, t).double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(siglip_loss(x, y, 10.0, -5.0).double(), want, rtol=1e-6, atol=1e-6)


def test_bias_gradient_is_the_sum_of_G():
    """d loss / d t = 1/b sum_ij G_ij: not zero (unlike the softmax loss), and the bias shifts the loss."""
    x, y, s, t = make_inputs(50, 16)
    tt = t.clone().requires_grad_(True)
    (dt,) = torch.autograd.grad(siglip_loss(x, y, s, tt, backend="torch"), [tt])
    z = s.double() * x.double() @ y.double().T + t.double()
    labels = 2 * torch.eye(50, dtype=torch.float64) - 1
    want = (-labels * torch.sigmoid(-labels * z)).sum() / 50
    assert abs(float(want)) > 1.0
    torch.testing.assert_close(dt.double(), want, rtol=1e-5, atol=1e-6)
    assert float(siglip_loss(x, y, s, t)) != float(siglip_loss(x, y, s, t + 1))


def test_float64_torch_backend_is_exact():
    x, y, s, t = make_inputs(65, 9, torch.float64)
    s, t = s.double(), t.double()
    got = loss_and_grads(lambda *a: siglip_loss(*a, backend="torch", chunk_size=7), x, y, s, t, 1.0)
    ref = loss_and_grads(lambda *a: siglip_loss_ref(*a), x, y, s, t, 1.0)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 64, 99, 100, 1000])
def test_chunk_sizes_agree(chunk):
    x, y, s, t = make_inputs(99, 31)
    ref = loss_and_grads(lambda *a: siglip_loss(*a, backend="reference"), x, y, s, t, 1.0)
    got = loss_and_grads(lambda *a: siglip_loss(*a, backend="torch", chunk_size=chunk), x, y, s, t, 1.0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_call_is_one_pass(backend):
    x, y, s, t = make_inputs(40, 8)
    x.requires_grad_(True)
    with torch.no_grad(), tiling.PassCounter() as passes:
        loss = siglip_loss(x, y, s, t, backend=backend)
    assert not loss.requires_grad and passes.passes(40, 40) == 1
    torch.testing.assert_close(loss.double(), siglip_loss_ref(x, y, s, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pass_counts(backend):
    """With gradients: 3 passes over S in the forward (G with the loss, then G Y and G^T X), none in the
    backward; without: 1."""
    x, y, s, t = make_inputs(200, 32)
    xx = x.clone().requires_grad_(True)
    with tiling.PassCounter() as fwd:
        loss = siglip_loss(xx, y, s, t, backend=backend, chunk_size=64)
    with tiling.PassCounter() as bwd:
        loss.backward()
    assert fwd.passes(200, 200) == 3 and bwd.passes(200, 200) == 0
    assert [m for kind, m, _ in fwd.calls if kind == "recompute"] == [64, 64, 64, 8]  # chunks of 64 rows


def test_backward_allocates_no_feature_sized_buffer():
    """The forward already holds the feature gradients; autograd must not fill B x D zero gradients for
    those outputs (it did), and the backward only scales them in place."""
    from tests.memory_utils import LargestAllocation

    x, y, s, t = make_inputs(256, 8)
    xx = x.clone().requires_grad_(True)
    loss = siglip_loss(xx, y, s, t, backend="torch")
    with LargestAllocation() as seen:
        loss.backward()
    assert seen.numel < 256 * 8


def test_memory_budget_sizes_the_chunks():
    assert tiling.default_memory_budget(torch.device("cpu")) == 64 << 20
    assert tiling.default_memory_budget(torch.device("cuda")) == 1 << 30
    x, y, s, t = make_inputs(100, 8)
    xx = x.clone().requires_grad_(True)
    with tiling.PassCounter() as fwd:  # 16 bytes per fp32 element with G: 1600 B per row of 100
        siglip_loss(xx, y, s, t, backend="torch", memory_budget=1600 * 30)
    assert [m for kind, m, _ in fwd.calls if kind == "recompute"] == [30, 30, 30, 10]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    x, y, s, t = make_inputs(60, 24)
    for a, b in non_contiguous_pairs(x, y):
        got = loss_and_grads(lambda *v: siglip_loss(*v, backend=backend), a, b, s, t, 1.0)
        ref = loss_and_grads(lambda *v: siglip_loss_ref(*v), a, b, s, t, 1.0)
        for u, v in zip(got, ref):
            torch.testing.assert_close(u.double(), v.double(), rtol=1e-5, atol=1e-6)


def test_gradient_check_catches_a_wrong_gradient(monkeypatch):
    """The comparison machinery must fail on a kernel whose gradient is off by a little."""
    real = siglip_ops.siglip_block

    def wrong(*args, **kwargs):
        sums = real(*args, **kwargs)
        return sums._replace(gtx=None if sums.gtx is None else sums.gtx * 1.001)

    monkeypatch.setattr(siglip_ops, "siglip_block", wrong)
    with pytest.raises(AssertionError, match="d_text"):
        check("torch", 64, 16)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, y, s, t = make_inputs(48, 16)
    fn = torch.compile(lambda x, y, s, t: siglip_loss(x, y, s, t, backend="torch", check_finite=True),
                       fullgraph=True, backend="aot_eager")
    got = loss_and_grads(fn, x, y, s, t, 1.0)
    ref = loss_and_grads(lambda *a: siglip_loss_ref(*a), x, y, s, t, 1.0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, y, s, t).double(), ref[0], rtol=1e-5, atol=1e-6)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(x, y, s, t)


# ---------------------------------------------------------------------------------------------
# non-finite inputs and bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda x, y, s, t: (x[:, :, None], y, s, t), ValueError, "2-D"),
        (lambda x, y, s, t: (x, y[:-1], s, t), ValueError, "batch sizes differ"),
        (lambda x, y, s, t: (x, y[:, :-1], s, t), ValueError, "feature sizes differ"),
        (lambda x, y, s, t: (x[:0], y[:0], s, t), ValueError, "empty batch"),
        (lambda x, y, s, t: (x, y.double(), s, t), TypeError, "same dtype"),
        (lambda x, y, s, t: (x.long(), y.long(), s, t), TypeError, "float32, float16, bfloat16 or float64"),
        (lambda x, y, s, t: (x, y, torch.ones(2), t), ValueError, "logit_scale must be a scalar"),
        (lambda x, y, s, t: (x, y, s, torch.zeros(6)), ValueError, "logit_bias must be a scalar"),
        (lambda x, y, s, t: (x, y, s, "1"), TypeError, "logit_bias"),
        (lambda x, y, s, t: (x, y.to("meta"), s, t), ValueError, "are on"),
    ],
)
def test_bad_input_errors(make, exc, match):
    x, y, s, t = make_inputs(6, 4)
    with pytest.raises(exc, match=match):
        siglip_loss(*make(x, y, s, t), backend="torch")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(memory_budget=0), ValueError, "memory_budget"),
        (dict(dist_impl="ring"), ValueError, "dist_impl must be None or one of"),
        (dict(group=object()), ValueError, "group needs a distributed mode"),
        (dict(rank=1), ValueError, "a single process is rank 0"),
        (dict(mode="global"), RuntimeError, "not initialized"),
        (dict(world_size=2, rank=1), RuntimeError, "not initialized"),
    ],
)
def test_bad_options(kwargs, exc, match):
    x, y, s, t = make_inputs(6, 4)
    with pytest.raises(exc, match=match):
        siglip_loss(x, y, s, t, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dist_impl="ring"), "dist_impl must be None or one of"),
        (dict(mode="hierarchical"), "no sub-group modes"),
        (dict(mode="ring", group_size=2), "no group_size"),
        (dict(group=object()), "group needs a distributed mode"),
        (dict(rank=2, world_size=2), "rank=2 must be smaller"),
        (dict(world_size=0), "world_size must be an int >= 1"),
    ],
)
def test_bad_module_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SigLipLoss(**kwargs)


@needs_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, y, s, t = make_inputs(6, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        siglip_loss(x, y, s, t, backend="triton")


def test_second_backward_through_a_retained_graph_is_an_error():
    """The backward scales the forward's gradients in place: a second one must fail, not double them."""
    x, y, s, t = make_inputs(20, 8)
    x.requires_grad_(True)
    loss = siglip_loss(x, y, s, t, backend="torch")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    torch.testing.assert_close(x.grad, first)

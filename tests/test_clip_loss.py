"""The fused contrastive loss against a float64 reference and against open_clip's ClipLoss.

Tolerance rule (flash-attention's): a backend's error against the float64 reference must be at most
twice the error of plain PyTorch computing the same loss in the same dtype, plus a small atol
(relative to the largest reference value), per dtype below.
"""

import pytest
import torch
import torch.nn.functional as F

from m2kernels import ClipLoss, clip_loss, clip_loss_ref
from m2kernels.ops import tiling
from m2kernels.ops.tiling import HAS_TRITON
from m2kernels.reference import open_clip_loss_module
from tests.layouts import non_contiguous_pairs

# dtype -> (factor, atol relative to max |reference|)
TOLERANCE = {
    torch.float32: (2.0, 2e-6),
    torch.float16: (2.0, 1e-3),
    torch.bfloat16: (2.0, 8e-3),
}

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def small_tiles(monkeypatch):
    """32 x 32 tiles under the interpreter: small batches then span many tiles (merging of the
    partial log-sum-exps, tiles that hold part of the diagonal, the grouped tile order)."""
    monkeypatch.setattr(tiling, "INTERPRETER_CONFIG", dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, GROUP_M=2))


def make_inputs(b, d, dtype=torch.float32, seed=0, normalize=True, scale=14.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = x + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)  # positives are correlated
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    x, y = x.to(dtype), y.to(dtype)
    s = torch.tensor(scale, dtype=torch.float32)
    t = torch.tensor(-2.5, dtype=torch.float32)
    return x, y, s, t


def loss_and_grads(fn, x, y, s, t, upstream):
    x, y, s = (v.detach().clone().requires_grad_(True) for v in (x, y, s))
    t = None if t is None else t.detach().clone().requires_grad_(True)
    loss = fn(x, y, s, t)
    inputs = [x, y, s] + ([t] if t is not None else [])
    grads = torch.autograd.grad(loss * upstream, inputs, allow_unused=True)
    return [loss.detach()] + [
        g.detach() if g is not None else torch.zeros_like(i) for g, i in zip(grads, inputs)
    ]


def term_magnitudes(x, y, s, upstream):
    """Size of the terms that add up (and may cancel) in each output: atol is relative to these."""
    b = x.shape[0]
    g, s = abs(float(upstream)), abs(float(s))
    mx, my = x.double().abs().max().item(), y.double().abs().max().item()
    nx, ny = x.double().norm(dim=1).max().item(), y.double().norm(dim=1).max().item()
    return [s * nx * ny + 1.0, g * s * my / b, g * s * mx / b, g * nx * ny, g]


def assert_close_rule(ours, plain, ref, dtype, what, magnitudes):
    factor, atol = TOLERANCE[dtype]
    names = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
    for name, o, p, r, mag in zip(names, ours, plain, ref, magnitudes):
        r = r.double()
        err = (o.double() - r).abs().max().item()
        plain_err = (p.double() - r).abs().max().item()
        bound = factor * plain_err + atol * max(r.abs().max().item(), mag)
        assert err <= bound, (
            f"{what}: {name} error {err:.3g} > {bound:.3g} (plain {dtype} error {plain_err:.3g})"
        )


def check(backend, b, d, dtype=torch.float32, chunk=None, eps=0.0, bias=True, seed=0, **kw):
    kw.setdefault("store_logits", False)
    x, y, s, t = make_inputs(b, d, dtype, seed=seed)
    t = t if bias else None
    upstream = torch.randn((), generator=torch.Generator().manual_seed(seed + 1)).double() + 1.5
    ours = loss_and_grads(
        lambda x, y, s, t: clip_loss(
            x, y, s, t, label_smoothing=eps, backend=backend, chunk_size=chunk, **kw
        ),
        x,
        y,
        s,
        t,
        upstream.to(torch.float32),
    )
    plain = loss_and_grads(
        lambda x, y, s, t: clip_loss_ref(x, y, s, t, label_smoothing=eps, upcast=False),
        x,
        y,
        s,
        t,
        upstream.to(dtype),
    )
    ref = loss_and_grads(
        lambda x, y, s, t: clip_loss_ref(x, y, s, t, label_smoothing=eps, upcast=True), x, y, s, t, upstream
    )
    assert ours[1].dtype == x.dtype and ours[1].shape == x.shape
    assert ours[3].dtype == s.dtype
    assert_close_rule(
        ours,
        plain,
        ref,
        dtype,
        f"{backend} b={b} d={d} {dtype} chunk={chunk} eps={eps}",
        term_magnitudes(x, y, s, upstream),
    )
    return ours, ref


# ---------------------------------------------------------------------------------------------
# torch backend: the full grid of awkward shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 2, 3, 127, 300, 1000])
@pytest.mark.parametrize("d", [1, 17, 64, 257, 512])
def test_torch_backend_shapes(b, d):
    chunk = max(1, b // 3 + 1)  # does not divide the batch
    check("torch", b, d, chunk=chunk, store_logits=bool(d % 2))  # both backward paths


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d", [(3, 17), (300, 64), (127, 257)])
def test_torch_backend_half(dtype, b, d):
    check("torch", b, d, dtype=dtype, chunk=50)


# ---------------------------------------------------------------------------------------------
# triton backend (interpreter on the CPU): every batch and feature size from the grid, in pairs
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("b,d", [(1, 1), (2, 17), (3, 64), (127, 257), (300, 512), (1000, 17), (129, 1)])
def test_triton_backend_shapes(b, d, store):
    check("triton", b, d, store_logits=store)


@needs_triton
@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("b,d,chunk", [(33, 40, None), (100, 64, 37), (161, 17, 64)])
def test_triton_many_tiles(small_tiles, b, d, chunk, store):
    check("triton", b, d, chunk=chunk, store_logits=store, eps=0.1 if b == 100 else 0.0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d", [(3, 17), (300, 64)])
def test_triton_backend_half(dtype, b, d):
    check("triton", b, d, dtype=dtype, store_logits=False)


@needs_triton
def test_triton_fp16_native_at_2048_no_underflow():
    """fp16 runs natively under the interpreter (no upcast): G is stored in fp16, whose entries at
    B = 2048 (~1/B times the upstream gradient) would flush to zero without the storage scale."""
    from m2kernels.ops.clip_kernels import _common

    x, y, s, _ = make_inputs(2048, 16, torch.float16, seed=4)
    assert _common(x, y)["UPCAST"] is False  # only bf16 is upcast under the interpreter
    ours = loss_and_grads(lambda x, y, s, t: clip_loss(x, y, s, backend="triton", store_logits=False),
                          x, y, s, None, torch.tensor(1.0))
    plain = loss_and_grads(lambda x, y, s, t: clip_loss_ref(x, y, s, upcast=False), x, y, s, None,
                           torch.tensor(1.0, dtype=torch.float16))
    ref = loss_and_grads(lambda x, y, s, t: clip_loss_ref(x, y, s), x, y, s, None, torch.tensor(1.0).double())
    assert_close_rule(ours, plain, ref, torch.float16, "fp16 B=2048", term_magnitudes(x, y, s, 1.0))
    # no gradient row may vanish (underflow would zero the small entries of G first)
    assert (ours[1].float().norm(dim=1) > 0).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_backward_is_deterministic(backend):
    for store in (False, True):
        ours, _ = check(backend, 200, 33, store_logits=store)
        again, _ = check(backend, 200, 33, store_logits=store)
        for a, b in zip(ours, again):
            assert torch.equal(a, b)


@needs_triton
def test_triton_matches_torch_backend_with_smoothing():
    a, _ = check("triton", 257, 40, eps=0.2)
    b, _ = check("torch", 257, 40, eps=0.2, chunk=64)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# semantics: label smoothing, logit bias, chunking, no_grad, non-contiguous, open_clip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_label_smoothing_matches_cross_entropy(eps, backend):
    x, y, s, _ = make_inputs(37, 23, torch.float64 if backend == "torch" else torch.float32, seed=3)
    logits = s.double() * x.double() @ y.double().T
    labels = torch.arange(37)
    want = 0.5 * (
        F.cross_entropy(logits, labels, label_smoothing=eps)
        + F.cross_entropy(logits.T, labels, label_smoothing=eps)
    )
    got = clip_loss(x, y, s, label_smoothing=eps, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    check(backend, 37, 23, eps=eps)


def test_logit_bias_gradient_is_zero_and_value_invariant():
    x, y, s, t = make_inputs(50, 16)
    t = t.clone().requires_grad_(True)
    loss = clip_loss(x, y, s, t, backend="torch")
    (dt,) = torch.autograd.grad(loss, [t])
    assert dt.item() == 0.0
    torch.testing.assert_close(loss, clip_loss(x, y, s, backend="torch"))
    torch.testing.assert_close(loss.double(), clip_loss_ref(x, y, s, t), rtol=1e-6, atol=1e-6)


def test_float64_torch_backend_is_exact():
    x, y, s, t = make_inputs(65, 9, torch.float64)
    s = s.double()
    got = clip_loss(x, y, s, backend="torch", chunk_size=7)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, clip_loss_ref(x, y, s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 64, 99, 100, 1000])
def test_chunk_sizes_agree(chunk):
    x, y, s, _ = make_inputs(99, 31)
    ref = clip_loss(x, y, s, backend="reference")
    torch.testing.assert_close(
        clip_loss(x, y, s, backend="torch", chunk_size=chunk), ref, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_no_grad_call(backend):
    x, y, s, _ = make_inputs(40, 8)
    x.requires_grad_(True)
    with torch.no_grad():
        loss = clip_loss(x, y, s, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), clip_loss_ref(x, y, s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_non_contiguous_inputs(backend):
    x, y, s, _ = make_inputs(60, 24)
    for a, b in non_contiguous_pairs(x, y):
        a = a.detach().requires_grad_(True)
        loss = clip_loss(a, b, s, backend=backend)
        (grad,) = torch.autograd.grad(loss, [a])
        a64 = a.detach().double().requires_grad_(True)
        ref = clip_loss_ref(a64, b, s)
        (grad_ref,) = torch.autograd.grad(ref, [a64])
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("b,d,eps", [(1, 8, 0.0), (3, 5, 0.0), (128, 64, 0.0), (77, 33, 0.1)])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_matches_open_clip(b, d, eps, backend):
    oc = open_clip_loss_module()
    x, y, s, t = make_inputs(b, d, seed=5)
    upstream = torch.tensor(0.7)
    if eps:
        # open_clip's ClipLoss has no label smoothing; compare to its logits with F.cross_entropy.
        def theirs(x, y, s, t):
            lpi, lpt = oc.ClipLoss().get_logits(x, y, s, t)
            labels = torch.arange(b)
            return 0.5 * (
                F.cross_entropy(lpi, labels, label_smoothing=eps)
                + F.cross_entropy(lpt, labels, label_smoothing=eps)
            )
    else:
        theirs = lambda x, y, s, t: oc.ClipLoss()(x, y, s, t)
    ref = loss_and_grads(theirs, x, y, s, t, upstream)
    ours = loss_and_grads(
        lambda x, y, s, t: ClipLoss(backend=backend, label_smoothing=eps)(x, y, s, t), x, y, s, t, upstream
    )
    for name, o, r in zip(["loss", "d_image", "d_text", "d_scale", "d_bias"], ours, ref):
        torch.testing.assert_close(o, r, rtol=2e-5, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")
    out = ClipLoss(backend=backend)(x, y, s, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(
        out["contrastive_loss"],
        oc.ClipLoss()(x, y, s, output_dict=True)["contrastive_loss"],
        rtol=2e-5,
        atol=2e-6,
    )


def test_open_clip_constructor_arguments_accepted():
    loss = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    x, y, s, _ = make_inputs(9, 4)
    torch.testing.assert_close(loss(x, y, s).double(), clip_loss_ref(x, y, s), rtol=1e-5, atol=1e-6)


def test_gradient_check_catches_a_wrong_gradient(monkeypatch):
    """The comparison machinery must fail on a kernel whose backward is off by a little."""
    from m2kernels.ops import clip_loss as mod

    real = mod.grad_block

    def wrong(*args, **kwargs):
        gy, gx, ds = real(*args, **kwargs)
        return gy * 1.001, gx, ds

    monkeypatch.setattr(mod, "grad_block", wrong)
    with pytest.raises(AssertionError, match="d_image"):
        check("torch", 64, 16)


def test_torch_compile_fullgraph():
    x, y, s, _ = make_inputs(48, 16)
    x.requires_grad_(True)
    fn = torch.compile(
        lambda x, y, s: clip_loss(x, y, s, backend="torch"), fullgraph=True, backend="aot_eager"
    )
    loss = fn(x, y, s)
    loss.backward()
    x64 = x.detach().double().requires_grad_(True)
    ref = clip_loss_ref(x64, y, s)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# non-finite inputs and bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda x, y, s: (x[:, :, None], y, s), ValueError, "2-D"),
        (lambda x, y, s: (x, y[:-1], s), ValueError, "batch sizes differ"),
        (lambda x, y, s: (x, y[:, :-1], s), ValueError, "feature sizes differ"),
        (lambda x, y, s: (x[:0], y[:0], s), ValueError, "empty batch"),
        (lambda x, y, s: (x, y.double(), s), TypeError, "same dtype"),
        (lambda x, y, s: (x.long(), y.long(), s), TypeError, "float32, float16, bfloat16 or float64"),
        (lambda x, y, s: (x.numpy(), y, s), TypeError, "torch.Tensor"),
        (lambda x, y, s: (x, y, torch.ones(2)), ValueError, "scalar"),
        (lambda x, y, s: (x, y, torch.tensor(3)), TypeError, "floating-point"),
        (lambda x, y, s: (x, y, "3.0"), TypeError, "logit_scale"),
        (lambda x, y, s: (x, y.to("meta"), s), ValueError, "are on"),
    ],
)
def test_bad_input_errors(make, exc, match):
    x, y, s, _ = make_inputs(6, 4)
    a, b, c = make(x, y, s)
    with pytest.raises(exc, match=match):
        clip_loss(a, b, c, backend="torch")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing="x"), TypeError, "label_smoothing"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.5), ValueError, "chunk_size"),
        (dict(memory_budget=0), ValueError, "memory_budget"),
        (dict(store_logits="yes"), ValueError, "store_logits"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
        (dict(group_size=2), ValueError, "need a distributed mode"),
        (dict(world_size=2, rank=1), ValueError, "need a distributed mode"),
    ],
)
def test_bad_options(kwargs, exc, match):
    x, y, s, _ = make_inputs(6, 4)
    with pytest.raises(exc, match=match):
        clip_loss(x, y, s, **kwargs)


def test_bias_must_be_scalar():
    x, y, s, _ = make_inputs(6, 4)
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        clip_loss(x, y, s, torch.zeros(6))


@needs_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, y, s, _ = make_inputs(6, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        clip_loss(x, y, s, backend="triton")


@needs_triton
def test_triton_rejects_float64():
    x, y, s, _ = make_inputs(6, 4, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        clip_loss(x, y, s, backend="triton")


def test_auto_backend_on_cpu_is_torch():
    assert tiling.resolve_backend("auto", torch.device("cpu")) == "torch"


# ---------------------------------------------------------------------------------------------
# what a real trainer and real data do: autocast, TF32 settings, huge logits, compile, pass counts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_autocast_does_not_change_the_loss(backend):
    """open_clip_train calls the loss inside autocast: it must still accumulate in fp32."""
    x, y, s, t = make_inputs(130, 40, seed=8)
    fn = lambda x, y, s, t: clip_loss(x, y, s, t, backend=backend, label_smoothing=0.1)
    plain = loss_and_grads(fn, x, y, s, t, torch.tensor(1.3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = loss_and_grads(fn, x, y, s, t, torch.tensor(1.3))
    for a, b in zip(plain, under):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_triton
def test_tf32_set_through_the_new_api(monkeypatch):
    """Reading the legacy allow_tf32 flag raises once the new API was used; the kernels read the new."""
    old = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert tiling.matmul_precision(torch.float32) == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert tiling.matmul_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        check("triton", 70, 16)  # runs (the interpreter computes tf32 dots in fp32)
    finally:
        torch.backends.cuda.matmul.fp32_precision = old


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("magnitude", [1e3, 1e6, 1e8])
def test_large_logits_against_float64(backend, magnitude):
    """Unnormalised features: |S| up to ~1e8. The diagonal comes from the same fp32 tile as the
    log-sum-exp, so r_i - S_ii cancels exactly where dense fp32 cross-entropy does."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(96, 24, generator=g, dtype=torch.float64)
    y = x + 0.1 * torch.randn(96, 24, generator=g, dtype=torch.float64)
    x, y = (v * (magnitude / 24) ** 0.5 for v in (x, y))
    x, y = x.float(), y.float()
    s = torch.tensor(1.0)
    for store in (False, True):
        ours = loss_and_grads(lambda x, y, s, t, store=store: clip_loss(x, y, s, backend=backend,
                                                                         store_logits=store),
                              x, y, s, None, torch.tensor(1.0))
        plain = loss_and_grads(lambda x, y, s, t: clip_loss_ref(x, y, s, upcast=False), x, y, s, None,
                               torch.tensor(1.0))
        ref = loss_and_grads(lambda x, y, s, t: clip_loss_ref(x, y, s), x, y, s, None,
                             torch.tensor(1.0).double())
        assert ours[0] >= 0, f"negative loss {ours[0]}"
        assert_close_rule(ours, plain, ref, torch.float32, f"|S|~{magnitude:g}",
                          term_magnitudes(x, y, s, 1.0))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_pass_counts(backend):
    """Forward 1 pass over S; backward 3 (recompute G, G Y, G^T X), or 2 with the kept dot products."""
    x, y, s, _ = make_inputs(200, 32)
    for store, backward_passes in ((False, 3), (True, 2)):
        xx = x.clone().requires_grad_(True)
        with tiling.PassCounter() as fwd:
            loss = clip_loss(xx, y, s, backend=backend, store_logits=store, chunk_size=64)
        with tiling.PassCounter() as bwd:
            loss.backward()
        assert fwd.passes(200, 200) == 1
        assert bwd.passes(200, 200) == backward_passes


def test_store_logits_auto_follows_the_budget():
    from m2kernels.validation import keep_logits

    assert keep_logits("auto", 1000, 1000, 4_000_000) and not keep_logits("auto", 1000, 1000, 3_999_999)
    assert keep_logits(True, 10**6, 10**6, 1) and not keep_logits(False, 2, 2, 10**9)
    x, y, s, _ = make_inputs(100, 8)
    xx = x.clone().requires_grad_(True)
    with tiling.PassCounter() as bwd:
        loss = clip_loss(xx, y, s, backend="torch", memory_budget=4 * 100 * 100 - 1)
        loss.backward()
    assert bwd.passes(100, 100) == 4  # did not fit: recomputed


def test_stored_logits_get_no_gradient_buffer():
    """With ``store_logits`` the op also returns the B x B dot products; autograd must not fill a B x B
    zero gradient for them (it did: twice the stored logits at the backward's peak)."""
    from tests.memory_utils import LargestAllocation

    x, y, s, _ = make_inputs(256, 8)
    xx = x.clone().requires_grad_(True)
    budget = 4 * 256 * 256 + 64 * 256 * 16  # the dots fit, and G comes in row chunks
    loss = clip_loss(xx, y, s, backend="torch", store_logits=True, memory_budget=budget)
    with LargestAllocation() as seen:
        loss.backward()
    assert seen.numel < 256 * 256  # row chunks of G only
    xr = x.double().requires_grad_(True)
    clip_loss_ref(xr, y.double(), s.double()).backward()
    torch.testing.assert_close(xx.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)


def test_torch_compile_dynamic_with_smoothing_and_check_finite():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, y, s, eps: clip_loss(x, y, s, backend="torch", label_smoothing=eps,
                                                      check_finite=True),
                       fullgraph=True, dynamic=True, backend="aot_eager")
    for b, eps in ((16, 0.1), (23, 0.2)):
        x, y, s, _ = make_inputs(b, 8)
        torch.testing.assert_close(fn(x, y, s, eps).double(), clip_loss_ref(x, y, s, label_smoothing=eps),
                                   rtol=1e-5, atol=1e-6)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(x, y, s, 0.1)

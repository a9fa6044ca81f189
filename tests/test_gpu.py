"""GPU checks of the Triton kernels (run by bench/device_check.sh on a CUDA machine).

Skipped where no CUDA device exists: the same kernels are tested on the CPU under the Triton
interpreter in test_clip_loss.py, and compiled for sm_80/sm_90 in test_triton_compile.py.
"""

import pytest
import torch

from m2kernels import clip_loss
from tests.test_clip_loss import check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to_cuda_check(backend, b, d, dtype, **kw):
    # check() builds CPU inputs; run the same comparison with the inputs moved to the GPU.
    import tests.test_clip_loss as t

    orig = t.make_inputs

    def make_cuda(*args, **kwargs):
        return tuple(v.cuda() for v in orig(*args, **kwargs))

    t.make_inputs = make_cuda
    try:
        return check(backend, b, d, dtype=dtype, **kw)
    finally:
        t.make_inputs = orig


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,d", [(1, 1), (3, 17), (127, 257), (1000, 512), (4099, 1024)])
def test_triton_cuda_against_float64(dtype, b, d, store):
    _to_cuda_check("triton", b, d, dtype, store_logits=store)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_cuda_native_matmuls(dtype):
    """The torch backend on CUDA: 16-bit matmuls with fp32 results (out_dtype), chunked."""
    _to_cuda_check("torch", 3000, 256, dtype, chunk=700, eps=0.1)
    _to_cuda_check("torch", 3000, 256, dtype, chunk=700, store_logits=True)


def test_autocast_cuda_changes_nothing():
    x = torch.nn.functional.normalize(torch.randn(4096, 512, device="cuda"), dim=-1).requires_grad_(True)
    y = torch.nn.functional.normalize(torch.randn(4096, 512, device="cuda"), dim=-1)
    plain = clip_loss(x, y, torch.tensor(14.0, device="cuda"))
    (gx,) = torch.autograd.grad(plain, [x])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        under = clip_loss(x, y, torch.tensor(14.0, device="cuda"))
    (gx2,) = torch.autograd.grad(under, [x])
    assert torch.equal(plain, under) and torch.equal(gx, gx2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_deterministic_and_smoothing(dtype):
    for store in (False, True):
        ours, _ = _to_cuda_check("triton", 2048, 768, dtype, eps=0.1, store_logits=store)
        again, _ = _to_cuda_check("triton", 2048, 768, dtype, eps=0.1, store_logits=store)
        for a, b in zip(ours, again):  # no atomics: bitwise reproducible
            assert torch.equal(a, b)


def test_auto_backend_is_triton_on_cuda():
    from m2kernels.ops.tiling import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "triton"


def test_large_batch_no_logits_memory():
    b, d, budget = 65536, 256, 64 << 20
    x = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", dtype=torch.bfloat16), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", dtype=torch.bfloat16), dim=-1)
    x.requires_grad_(True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    clip_loss(x, y, torch.tensor(14.0, device="cuda"), memory_budget=budget).backward()
    peak = torch.cuda.max_memory_allocated() - base
    # the budget (G chunks), fp32 accumulators and outputs of both gradients: nothing B x B
    assert peak < budget + 4 * b * d * 4 + (16 << 20), f"peak {peak} bytes is more than the memory model"

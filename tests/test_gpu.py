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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,d", [(1, 1), (3, 17), (127, 257), (1000, 512), (4099, 1024)])
def test_triton_cuda_against_float64(dtype, b, d):
    _to_cuda_check("triton", b, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_deterministic_and_smoothing(dtype):
    _to_cuda_check("triton", 2048, 768, dtype, deterministic=True, eps=0.1)


def test_auto_backend_is_triton_on_cuda():
    from m2kernels.ops.clip_loss import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "triton"


def test_large_batch_no_logits_memory():
    b, d = 65536, 256
    x = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", dtype=torch.bfloat16), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", dtype=torch.bfloat16), dim=-1)
    x.requires_grad_(True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    clip_loss(x, y, torch.tensor(14.0, device="cuda")).backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 0.01 * b * b * 2, f"peak {peak} bytes looks like a materialised B x B matrix"

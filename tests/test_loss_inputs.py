"""Non-finite input, the same for both contrastive losses (softmax and sigmoid) and every backend."""

import pytest
import torch

from m2kernels import clip_loss, siglip_loss
from m2kernels.ops.tiling import HAS_TRITON

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


@pytest.mark.parametrize("loss_fn", [clip_loss, siglip_loss], ids=["clip", "siglip"])
@pytest.mark.parametrize("where", ["image", "text", "scale", "bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_propagates_or_raises(loss_fn, where, backend):
    """A NaN or Inf anywhere gives a non-finite loss (never a silently finite one), and with
    ``check_finite=True`` a ValueError instead."""
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    s, t = torch.tensor(14.0), torch.tensor(-2.0)
    if where == "image":
        x[3, 2] = float("nan")
    elif where == "text":
        y[7, 0] = float("inf")
    elif where == "scale":
        s = torch.tensor(float("nan"))
    else:
        t = torch.tensor(float("inf"))
    loss = loss_fn(x, y, s, t, backend=backend)
    assert not torch.isfinite(loss), f"non-finite {where} gave a finite loss {loss}"
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss_fn(x, y, s, t, backend=backend, check_finite=True)

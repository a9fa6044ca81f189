"""Plain-PyTorch references for the contrastive losses, imported by tests and benchmarks.

These materialise the full B x B logits on purpose: they are the definition, not the product.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def clip_loss_ref(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    upcast: bool = True,
) -> torch.Tensor:
    """Dense bidirectional CLIP loss: the definition (docs/loss.md).

    ``S = logit_scale * X @ Y.T (+ logit_bias)``; the loss is the mean of the row-wise and the
    column-wise cross-entropy against the diagonal, with optional label smoothing as in
    ``torch.nn.functional.cross_entropy(label_smoothing=)``. With ``upcast=True`` everything is
    computed in float64 (the reference that kernels are judged against); with ``upcast=False`` it runs
    in the input dtype, which is how "plain PyTorch in the same dtype" is measured.
    """
    x, y = image_features, text_features
    s = logit_scale if torch.is_tensor(logit_scale) else torch.tensor(logit_scale, device=x.device)
    t = logit_bias
    if upcast:
        x, y, s = x.double(), y.double(), s.double()
        t = t.double() if t is not None else None
    else:
        s = s.to(x.dtype)
        t = t.to(x.dtype) if t is not None else None
    logits = s.reshape(()) * (x @ y.T)
    if t is not None:
        logits = logits + t.reshape(())
    labels = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (
        F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)
    )


def siglip_loss_ref(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    upcast: bool = True,
) -> torch.Tensor:
    """Dense sigmoid (SigLIP) loss: the definition (docs/loss.md), as open_clip's ``SigLipLoss``.

    ``z = logit_scale * X @ Y.T + logit_bias`` (no bias for None), labels +1 on the diagonal and -1
    elsewhere, ``loss = -sum(logsigmoid(labels * z)) / B``. ``upcast=True``: in float64 (the
    reference); ``upcast=False``: in the input dtype ("plain PyTorch in the same dtype").
    """
    x, y = image_features, text_features
    s = logit_scale if torch.is_tensor(logit_scale) else torch.tensor(logit_scale, device=x.device)
    t = logit_bias
    if t is not None and not torch.is_tensor(t):
        t = torch.tensor(t, device=x.device)
    dtype = torch.float64 if upcast else x.dtype
    x, y, s = x.to(dtype), y.to(dtype), s.to(dtype)
    logits = s.reshape(()) * (x @ y.T)
    if t is not None:
        logits = logits + t.to(dtype).reshape(())
    labels = 2 * torch.eye(x.shape[0], device=x.device, dtype=dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]


def open_clip_loss_module():
    """open_clip's ``loss.py`` loaded on its own (``import open_clip`` needs a working torchvision).

    Returns the module (``.ClipLoss``, ``.SigLipLoss``); raises ImportError when open-clip-torch is not
    installed.
    """
    import importlib.util
    import os
    import sys

    name = "_open_clip_loss"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ImportError("open-clip-torch is not installed (pip install --no-deps open-clip-torch==3.3.0)")
    path = os.path.join(os.path.dirname(spec.origin), "loss.py")
    loss_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    sys.modules[name] = module
    return module

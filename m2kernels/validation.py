"""Validation of the loss arguments, in one place for every entry point (local and distributed).

Each check raises a ``TypeError`` or ``ValueError`` that names the argument and the problem, before
any kernel runs. The checks are plain comparisons on Python values and tensor metadata: no host
synchronisation, and nothing ``torch.compile(fullgraph=True, dynamic=True)`` cannot trace (a symbolic
``label_smoothing`` passes; NaN is caught by the range comparison). NaN/Inf in tensor *values* is
checked only with ``check_finite=True``, inside the ops.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from m2kernels.ops.tiling import default_memory_budget, resolve_backend

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
STORE_LOGITS = ("auto", True, False)


class LossInputs(NamedTuple):
    """Validated arguments: features with a contiguous last dimension, the scale (and bias) as
    one-element tensors on the features' device, the options resolved."""

    x: torch.Tensor
    y: torch.Tensor
    scale: torch.Tensor
    bias: Optional[torch.Tensor]
    label_smoothing: float
    backend: str
    memory_budget: int
    chunk_size: Optional[int]
    store_logits: object


def check_scalar(value, name: str) -> None:
    """A Python number or a one-element floating-point tensor."""
    if isinstance(value, (int, float, torch.SymFloat, torch.SymInt)) and not isinstance(value, bool):
        return
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must be a tensor or a Python number, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")


def as_scalar_tensor(value, name: str, like: torch.Tensor) -> torch.Tensor:
    """A Python number or a one-element floating tensor, as a tensor on ``like``'s device."""
    check_scalar(value, name)
    if not torch.is_tensor(value):  # a fill, not a host-to-device copy (which would synchronise)
        return torch.full((), float(value), device=like.device, dtype=torch.float32)
    if value.device != like.device:
        if value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        value = value.to(like.device)  # a CPU scalar (e.g. a Python-side constant) moves along
    return value


def check_features(image_features, text_features, *, allow_empty: bool = False) -> None:
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FEATURE_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    x, y = image_features, text_features
    if x.device != y.device:
        raise ValueError(f"image_features are on {x.device} but text_features are on {y.device}")
    if x.dtype != y.dtype:
        raise TypeError(f"image_features ({x.dtype}) and text_features ({y.dtype}) must have the same dtype")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: image_features {tuple(x.shape)}, "
                         f"text_features {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: image_features {tuple(x.shape)}, text_features "
                         f"{tuple(y.shape)}; pairs are matched by row")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError("empty batch: image_features and text_features have 0 rows")
    if x.shape[1] == 0:
        raise ValueError("feature size is 0")


def _positive_int(value, name: str, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_options(label_smoothing, chunk_size, memory_budget, store_logits, device: torch.device) -> tuple:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float, torch.SymFloat)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:  # also False for NaN
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    chunk_size = _positive_int(chunk_size, "chunk_size")
    memory_budget = _positive_int(memory_budget, "memory_budget")
    if not any(store_logits is v for v in STORE_LOGITS):
        raise ValueError(f"store_logits must be 'auto', True or False, got {store_logits!r}")
    if memory_budget is None:
        memory_budget = default_memory_budget(device)
    return label_smoothing, chunk_size, memory_budget


def loss_inputs(image_features, text_features, logit_scale, logit_bias, *, label_smoothing=0.0,
                backend="auto", chunk_size=None, memory_budget=None, store_logits="auto",
                allow_empty=False) -> LossInputs:
    """Validate every argument of a loss call; returns the normalised :class:`LossInputs`."""
    check_features(image_features, text_features, allow_empty=allow_empty)
    x, y = image_features, text_features
    scale = as_scalar_tensor(logit_scale, "logit_scale", x)
    bias = None if logit_bias is None else as_scalar_tensor(logit_bias, "logit_bias", x)
    eps, chunk_size, budget = check_options(label_smoothing, chunk_size, memory_budget, store_logits,
                                            x.device)
    backend = resolve_backend(backend, x.device, x.dtype)
    x = x if x.stride(-1) == 1 or x.numel() == 0 else x.contiguous()
    y = y if y.stride(-1) == 1 or y.numel() == 0 else y.contiguous()
    return LossInputs(x, y, scale, bias, eps, backend, budget, chunk_size, store_logits)


def keep_logits(store_logits, m: int, n: int, budget: int) -> bool:
    """Whether the forward keeps the (m x n) fp32 dot products for the backward."""
    if store_logits == "auto":
        return 4 * m * n <= budget
    return bool(store_logits)

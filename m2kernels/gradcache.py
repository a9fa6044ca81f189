"""A gradient cache for contrastive losses: large effective batches with the memory of a micro-batch.

``GradCache(loss_fn, accum_steps=K)`` is the GradCache technique (Gao et al., 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"): every optimizer step is split into ``K``
micro-batches;

1. ``add``: each micro-batch is encoded under ``torch.no_grad()``; only its embeddings (and the inputs
   and random-number-generator states needed to encode it again) are kept;
2. ``backward``: the ``K`` cached micro-batches are concatenated into one local batch of ``K * b`` rows,
   the contrastive loss and its gradient with respect to the cached embeddings and the logit scale are
   computed; then each micro-batch is encoded again *with* autograd, under the random state it had the
   first time, and the cached embedding gradients are injected into it (``torch.autograd.backward``).

The parameter gradients equal those of the same ``loss_fn`` evaluated on the concatenated ``K * b``
batch in one piece, exactly (up to floating-point summation order), provided the forward is
deterministic given its inputs and random state. Nothing here communicates: with a distributed
``loss_fn`` the collectives are the loss's.

With the grouped loss (``ClipLoss(mode="grouped", group_size=n)``) this is our reconstruction of the
M2-Encoder paper's grouped ITC with batch accumulation (GBA-ITC): each positive pair is contrasted
against ``n * b * K`` candidates; ``GBAAccumulator`` is that name for the same class. See docs/gba.md
for what this objective is and is not.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from m2kernels import validation

__all__ = ["GBAAccumulator", "GradCache"]

_OUTPUT_KEYS = ("image_features", "text_features", "logit_scale", "logit_bias")


@dataclass(slots=True)
class _MicroBatch:
    """What one ``add`` keeps: how to run the forward again, under which random and autocast state,
    and the embeddings it gave."""

    forward_fn: Callable
    args: tuple
    kwargs: dict
    image: torch.Tensor
    text: torch.Tensor
    cpu_rng: torch.Tensor
    cuda_rng: dict
    autocast: dict


def _tensor_devices(obj, out: set) -> set:
    """Collect the CUDA device indices of the tensors in a nested structure of args."""
    if torch.is_tensor(obj):
        if obj.device.type == "cuda":
            out.add(obj.device.index if obj.device.index is not None else torch.cuda.current_device())
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensor_devices(item, out)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            _tensor_devices(item, out)
    return out


def _clone_tensors(obj):
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        return tuple(_clone_tensors(o) for o in obj)
    if isinstance(obj, list):
        return [_clone_tensors(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    return obj


def _autocast_state() -> dict:
    state = {}
    for device_type in ("cpu", "cuda"):
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        if torch.is_autocast_enabled(device_type):
            state[device_type] = torch.get_autocast_dtype(device_type)
    return state


def _autocast_context(state: dict) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        if device_type in state:
            stack.enter_context(torch.autocast(device_type, dtype=state[device_type], enabled=True))
        else:
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _unpack_outputs(out) -> tuple:
    """(image_features, text_features, logit_scale, logit_bias) from a forward_fn's return value."""
    if isinstance(out, Mapping):
        missing = [k for k in _OUTPUT_KEYS[:3] if k not in out]
        if missing:
            raise TypeError(f"forward_fn returned a mapping without the key(s) {missing}; expected "
                            f"{list(_OUTPUT_KEYS[:3])} (and optionally 'logit_bias')")
        img, txt, scale, bias = (out.get(k) for k in _OUTPUT_KEYS)
    elif isinstance(out, (tuple, list)):
        if len(out) not in (3, 4):
            raise TypeError("forward_fn must return (image_features, text_features, logit_scale) or "
                            f"(image_features, text_features, logit_scale, logit_bias); got a "
                            f"{type(out).__name__} of length {len(out)}")
        img, txt, scale = out[:3]
        bias = out[3] if len(out) == 4 else None
    else:
        raise TypeError("forward_fn must return a tuple (image_features, text_features, logit_scale) "
                        f"or a mapping with those keys; got {type(out).__name__}")
    if scale is None:
        raise TypeError("forward_fn returned logit_scale=None; expected a scalar tensor or number")
    try:  # the checks every loss entry point makes
        validation.check_features(img, txt)
        validation.check_scalar(scale, "logit_scale")
        if bias is not None:
            validation.check_scalar(bias, "logit_bias")
    except (TypeError, ValueError) as e:
        raise type(e)(f"forward_fn returned invalid outputs: {e}") from None
    return img, txt, scale, bias


def _detach(v):
    return v.detach() if torch.is_tensor(v) else v


def _same_scalar(a, b) -> bool:
    if torch.is_tensor(a) != torch.is_tensor(b):
        return False
    if not torch.is_tensor(a):
        return float(a) == float(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))


def _leaf_like(v):
    """A fresh leaf (requires_grad) copy of a cached scalar tensor; numbers stay numbers."""
    if torch.is_tensor(v):
        return v.detach().clone().requires_grad_(True)
    return v


class GradCache:
    """A gradient cache (GradCache-style re-forward) for a contrastive loss; see the module docs.

    ``acc = GradCache(loss_fn, accum_steps=K)``; for each optimizer step call
    ``acc.add(forward_fn, *args, **kwargs)`` ``K`` times, then ``loss = acc.backward(no_sync=...)``,
    then ``optimizer.step()``::

        acc = GradCache(ClipLoss(mode="grouped", group_size=n), accum_steps=K)   # GBA-ITC
        for micro_batches in loader:                      # K micro-batches of b pairs
            for images, texts in micro_batches:
                acc.add(ddp_model, images, texts)        # no graph kept, embeddings cached
            loss = acc.backward(no_sync=ddp_model.no_sync)  # parameter .grad filled
            optimizer.step(); optimizer.zero_grad()

    ``forward_fn(*args, **kwargs)`` returns ``(image_features, text_features, logit_scale)``, optionally
    with a 4th element ``logit_bias``, or a mapping with those keys (open_clip's ``output_dict``);
    ``logit_scale`` is already exponentiated. ``loss_fn(image_features, text_features, logit_scale)``
    (plus ``logit_bias`` when one is returned) must return a scalar tensor, or a mapping whose values
    are summed (open_clip's ``output_dict`` losses).

    ``backward`` concatenates the ``K`` cached micro-batches (a local batch of ``K * b`` rows), computes
    ``loss_fn`` and its gradient w.r.t. the cached embeddings, the scale and the bias, then re-runs each
    micro-batch forward with autograd and injects the cached gradients. The gradient of the logit scale (and
    bias) is injected once, with the last micro-batch; the other re-runs inject an exact zero into it, so
    that every parameter receives a gradient in every re-run (as DDP expects). Each re-run restores the CPU
    random state (and the CUDA random state of the current device and of the devices of the tensor
    arguments) that the micro-batch had in ``add``, and the autocast state, so dropout and in-forward
    augmentation draw the same masks; the caller's random streams are left as they were after the last
    ``add``. With ``no_sync`` (e.g. ``ddp_model.no_sync``), all re-runs but the last run inside it, so DDP
    all-reduces the gradients once. ``scaler`` (a ``torch.amp.GradScaler``) scales the injected gradients as
    ``scaler.scale(loss).backward()`` would. Returns the detached loss (with a distributed ``loss_fn``, this
    rank's share: the mean over ranks is the loss) and clears the cache (also when the backward fails
    part-way: parameter gradients may then be partly filled; zero them).

    Memory: only the embeddings (``2 * K * b * D`` values, plus the inputs, which the caller holds
    anyway) are cached between ``add`` and ``backward``; activations are recomputed, one micro-batch at
    a time, as in GradCache. The price is one extra forward per micro-batch.

    Caveats: inputs are kept by reference; if the data loader reuses its output buffers (some DALI
    pipelines do), pass ``clone_inputs=True``. Modules with running statistics (BatchNorm) update them
    twice per micro-batch. ``check_recompute=True`` verifies that each re-run reproduces the cached
    embeddings (to ``recompute_atol``) and raises otherwise (non-deterministic kernels, RNG used
    outside the restored generators, parameters changed between ``add`` and ``backward``).
    """

    def __init__(self, loss_fn: Callable[..., Any], accum_steps: int, *, clone_inputs: bool = False,
                 check_recompute: bool = False, recompute_atol: float = 0.0):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
        if not isinstance(recompute_atol, (int, float)) or recompute_atol < 0:
            raise ValueError(f"recompute_atol must be a non-negative number, got {recompute_atol!r}")
        self.loss_fn = loss_fn
        self.accum_steps = accum_steps
        self.clone_inputs = bool(clone_inputs)
        self.check_recompute = bool(check_recompute)
        self.recompute_atol = float(recompute_atol)
        self._cache: list[_MicroBatch] = []
        self._scale = None
        self._bias = None
        self._warned_rng = False

    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._cache)

    @property
    def ready(self) -> bool:
        """True when ``accum_steps`` micro-batches have been added and ``backward`` may be called."""
        return len(self._cache) == self.accum_steps

    def clear(self) -> None:
        """Drop the cached micro-batches (e.g. to skip a step)."""
        self._cache = []
        self._scale = None
        self._bias = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(loss_fn={self.loss_fn!r}, accum_steps={self.accum_steps}, "
                f"cached={len(self)})")

    # ------------------------------------------------------------------------------------------
    def add(self, forward_fn: Callable[..., Any], *args, **kwargs) -> None:
        """Encode one micro-batch without autograd and cache its embeddings, inputs and RNG states."""
        if not callable(forward_fn):
            raise TypeError(f"forward_fn must be callable, got {type(forward_fn).__name__}")
        if self.ready:
            raise RuntimeError(f"{type(self).__name__} already holds accum_steps={self.accum_steps} "
                               "micro-batches; "
                               "call backward() before adding more")
        if self.clone_inputs:
            args, kwargs = _clone_tensors(args), _clone_tensors(kwargs)
        cuda_devices: set = set()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_devices = _tensor_devices((args, kwargs), {torch.cuda.current_device()})
        cpu_rng = torch.get_rng_state()
        cuda_rng = {d: torch.cuda.get_rng_state(d) for d in sorted(cuda_devices)}
        autocast = _autocast_state()
        with torch.no_grad():
            out = forward_fn(*args, **kwargs)
        img, txt, scale, bias = _unpack_outputs(out)
        out_devices = _tensor_devices((img, txt), set())
        if out_devices - set(cuda_rng) and not self._warned_rng:
            warnings.warn(f"the CUDA random state of device(s) {sorted(out_devices - set(cuda_rng))} was not "
                          "captured (CUDA was not initialised before the first forward); random ops on it "
                          "may differ on the re-run", RuntimeWarning, stacklevel=2)
            self._warned_rng = True
        if self._cache:
            first = self._cache[0]
            for name, new, old in (("image_features", img, first.image), ("text_features", txt, first.text)):
                if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
                    raise ValueError(
                        f"micro-batch {len(self._cache)} has {name} of shape {tuple(new.shape)}, {new.dtype} "
                        f"on {new.device}, but micro-batch 0 had {tuple(old.shape)}, {old.dtype} on "
                        f"{old.device}; all micro-batches must match")
            if not _same_scalar(_detach(scale), self._scale):
                raise ValueError("logit_scale differs between micro-batches of one step; parameters must not "
                                 "change between add() calls (call optimizer.step() after backward())")
            if (bias is None) != (self._bias is None) or (
                    bias is not None and not _same_scalar(_detach(bias), self._bias)):
                raise ValueError("logit_bias differs between micro-batches of one step")
        else:
            self._scale, self._bias = _detach(scale), _detach(bias)
        self._cache.append(_MicroBatch(forward_fn, args, kwargs, img.detach(), txt.detach(), cpu_rng,
                                       cuda_rng, autocast))

    # ------------------------------------------------------------------------------------------
    def _rerun(self, mb: _MicroBatch):
        with torch.random.fork_rng(devices=sorted(mb.cuda_rng), device_type="cuda"):
            torch.set_rng_state(mb.cpu_rng)
            for d, state in mb.cuda_rng.items():
                torch.cuda.set_rng_state(state, d)
            with torch.enable_grad(), _autocast_context(mb.autocast):
                out = mb.forward_fn(*mb.args, **mb.kwargs)
        return _unpack_outputs(out)

    def backward(self, no_sync: Optional[Callable[[], Any]] = None, scaler=None) -> torch.Tensor:
        """Loss over the ``K`` cached micro-batches; fills parameter ``.grad``; returns the detached loss."""
        if not self.ready:
            raise RuntimeError(f"backward() needs accum_steps={self.accum_steps} micro-batches, "
                               f"{len(self._cache)} added")
        if no_sync is not None and not callable(no_sync):
            raise TypeError(f"no_sync must be a context-manager factory (e.g. ddp_model.no_sync), "
                            f"got {type(no_sync).__name__}")
        cache = self._cache
        try:
            img = torch.cat([mb.image for mb in cache]).requires_grad_(True)
            txt = torch.cat([mb.text for mb in cache]).requires_grad_(True)
            scale, bias = _leaf_like(self._scale), _leaf_like(self._bias)
            loss_args = (img, txt, scale) if bias is None else (img, txt, scale, bias)
            with torch.enable_grad():
                loss = self.loss_fn(*loss_args)
                if isinstance(loss, Mapping):
                    loss = sum(loss.values())
                if not torch.is_tensor(loss) or loss.numel() != 1:
                    raise TypeError("loss_fn must return a scalar tensor (or a mapping of scalar tensors), "
                                    f"got {type(loss).__name__}"
                                    + (f" of shape {tuple(loss.shape)}" if torch.is_tensor(loss) else ""))
                if not loss.requires_grad:
                    raise RuntimeError("the loss returned by loss_fn does not depend on the features "
                                       "(no grad_fn); nothing to backpropagate")
                inputs = [img, txt] + [v for v in (scale, bias) if torch.is_tensor(v)]
                target = scaler.scale(loss) if scaler is not None else loss
                grads = torch.autograd.grad(target.reshape(()), inputs, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
            g_img = grads[0].split([mb.image.shape[0] for mb in cache])
            g_txt = grads[1].split([mb.text.shape[0] for mb in cache])
            g_scalars = grads[2:]
            del img, txt, grads

            injected = False
            last = len(cache) - 1
            for i, mb in enumerate(cache):
                ctx = no_sync() if (no_sync is not None and i < last) else contextlib.nullcontext()
                with ctx:
                    r_img, r_txt, r_scale, r_bias = self._rerun(mb)
                    self._check_rerun(i, mb, r_img, r_txt)
                    tensors, grad_tensors = [], []
                    for t, g in ((r_img, g_img[i]), (r_txt, g_txt[i])):
                        if t.requires_grad:
                            tensors.append(t)
                            grad_tensors.append(g)
                    # The scale (and bias) gradient goes in once, with the last micro-batch; the others
                    # get an exact zero so that every parameter they use receives a gradient (DDP without
                    # no_sync or find_unused_parameters requires it).
                    scalar_outs = [v for v, c in ((r_scale, self._scale), (r_bias, self._bias))
                                   if torch.is_tensor(c)]
                    for v, g in zip(scalar_outs, g_scalars):
                        if torch.is_tensor(v) and v.requires_grad:
                            tensors.append(v)
                            g = g.reshape(v.shape).to(v.dtype)
                            grad_tensors.append(g if i == last else torch.zeros_like(g))
                    if tensors:
                        torch.autograd.backward(tensors, grad_tensors)
                        injected = True
            if not injected:
                raise RuntimeError("no output of forward_fn requires grad on the re-run; is the model frozen "
                                   "or forward_fn running under torch.no_grad()?")
            return loss.detach().reshape(())
        finally:
            self.clear()

    def _check_rerun(self, i: int, mb: _MicroBatch, img: torch.Tensor, txt: torch.Tensor) -> None:
        for name, new, old in (("image_features", img, mb.image), ("text_features", txt, mb.text)):
            if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
                raise RuntimeError(f"re-running micro-batch {i} gave {name} of shape {tuple(new.shape)}, "
                                   f"{new.dtype} on {new.device}; the cached ones were {tuple(old.shape)}, "
                                   f"{old.dtype} on {old.device}")
            if self.check_recompute:
                err = (new.detach() - old).abs().max().item()
                if not err <= self.recompute_atol:
                    raise RuntimeError(f"re-running micro-batch {i} did not reproduce the cached {name}: max "
                                       f"abs difference {err:.3g} > recompute_atol={self.recompute_atol:g} "
                                       "(non-deterministic forward, or parameters changed since add())")


# The M2-Encoder name for the same thing (grouped ITC with batch accumulation uses it with the grouped loss).
GBAAccumulator = GradCache

"""What a training run is made of: the model, the optimizer, the learning-rate schedule and the loss."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .env import Env


def build_model(cfg: TrainConfig):
    from m2model.config import get_config
    from m2model.modeling import M2Encoder

    model = M2Encoder(get_config(cfg.model, **cfg.model_overrides))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _apex_available() -> bool:
    try:
        import apex.optimizers  # noqa: F401
    except Exception:
        return False
    return True


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW/LAMB; no weight decay on biases, norms, embeddings, tokens and the logit scale (as open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name or "token" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    use_apex = device.type == "cuda" and (cfg.use_apex == "true"
                                          or (cfg.use_apex == "auto" and _apex_available()))
    if cfg.use_apex == "true" and not use_apex:
        raise ValueError("config key 'use_apex': true, but apex cannot be imported (or the device is not "
                         "CUDA)")
    if cfg.optimizer == "lamb":
        if not use_apex:
            raise ValueError("config key 'optimizer': 'lamb' needs apex (FusedLAMB) on CUDA")
        from apex.optimizers import FusedLAMB

        return FusedLAMB(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if use_apex:
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True)
    use_fused = cfg.fused == "true" or (cfg.fused == "auto" and device.type == "cuda")
    kwargs = {"fused": True} if use_fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs)


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Linear warm-up to the base lr, then cosine decay to ``min_lr_ratio`` x base lr."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(cfg: TrainConfig, env: Env) -> torch.nn.Module:
    """The m2kernels contrastive loss. One process: the plain (local) loss. Several: the configured mode;
    ``grouped`` and ``hierarchical`` default to node-local groups (``LOCAL_WORLD_SIZE`` ranks)."""
    from m2kernels import ClipLoss

    if not env.distributed or cfg.loss_mode == "local":
        return ClipLoss(backend=cfg.loss_backend)
    group_size = cfg.group_size or env.local_world_size
    if env.world_size % group_size:
        raise ValueError(f"config key 'group_size': {group_size} does not divide the world size "
                         f"{env.world_size}")
    try:
        return ClipLoss(mode=cfg.loss_mode, group_size=group_size, backend=cfg.loss_backend)
    except TypeError as e:
        raise ValueError(f"loss_mode {cfg.loss_mode!r} needs m2kernels' distributed loss modes, which this "
                         f"installation lacks ({e})") from None


def build_accumulator(loss_fn, accum_steps: int):
    """GBA batch accumulation over ``accum_steps`` micro-batches (None for one)."""
    if accum_steps == 1:
        return None
    try:
        from m2kernels.distributed import GBAAccumulator
    except ImportError:
        raise ValueError("config key 'accum_steps': > 1 needs m2kernels.distributed.GBAAccumulator, which "
                         "this installation lacks; use accum_steps: 1") from None
    return GBAAccumulator(loss_fn, accum_steps=accum_steps)

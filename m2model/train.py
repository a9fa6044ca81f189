"""Contrastive (ITC) training of the M2-Encoder, on one process or under torchrun.

    python -m m2model.train --config CONFIG.yaml [--key value ...]
    torchrun --standalone --nproc_per_node N -m m2model.train --config CONFIG.yaml

Every key of :class:`TrainConfig` can be set in the config file (JSON or YAML) and overridden on the
command line (``--lr 1e-3``, ``--model_overrides '{width: 128}'``; values are parsed as YAML).

DDP over gloo (CPU) or NCCL (CUDA); AdamW (fused on CUDA; apex FusedAdam / FusedLAMB when ``import
apex`` works); cosine schedule with linear warm-up; gradient clipping; optional bf16/fp16 autocast and
gradient checkpointing; the m2kernels contrastive loss in the configured distributed mode with GBA batch
accumulation over ``accum_steps`` micro-batches; a tqdm bar; metrics as jsonl; atomic checkpoints every
``save_every`` steps and on SIGTERM/SIGINT; ``--resume`` continues exactly where a checkpoint was taken.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import signal
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

LOSS_MODES = ("grouped", "global", "ring", "hierarchical", "local")
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    # model
    model: str = "tiny"  # m2model.config size name
    model_overrides: dict = field(default_factory=dict)  # M2Config fields, e.g. {"image_size": 32}
    tokenizer: str = "bert-base-chinese"
    context_length: Optional[int] = None  # tokens per text (default: the model's max_text_len)
    # data: a jsonl ({"image", "caption": [...]}) and/or webdataset shards (brace pattern, glob or list)
    train_jsonl: Optional[str] = None
    train_shards: Any = None
    image_root: Optional[str] = None
    data_backend: str = "auto"  # auto (DALI if installed) | dali | pillow
    data_threads: int = 1
    prefetch: int = 0  # batches decoded ahead in a background thread
    crop_scale: tuple = (0.8, 1.0)
    flip_prob: float = 0.5  # horizontal flips (0 when captions name left and right)
    # optimisation
    batch_size: int = 32  # per rank and micro-step
    accum_steps: int = 1  # K micro-steps per optimizer step (GBA batch accumulation)
    max_steps: Optional[int] = None  # optimizer steps; default: epochs * (micro-batches per epoch // K)
    epochs: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.2
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: Optional[float] = 1.0
    optimizer: str = "adamw"  # adamw | lamb (lamb needs apex)
    use_apex: str = "auto"  # auto | true | false
    fused: str = "auto"  # fused AdamW: auto (on CUDA) | true | false
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    # loss
    loss_mode: str = "grouped"  # grouped | global | ring | hierarchical | local
    group_size: Optional[int] = None  # grouped/hierarchical: ranks per group (default: ranks per node)
    loss_backend: str = "auto"
    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    num_threads: Optional[int] = None  # torch intra-op threads per process (default 1 when distributed)
    output_dir: str = "runs/train"
    save_every: int = 0  # steps; 0: only at the end and on a signal
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: Optional[str] = None  # a checkpoint path, or "auto" (the newest in output_dir)
    progress: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {self.loss_mode!r}")
        if self.optimizer not in ("adamw", "lamb"):
            raise ValueError(f"optimizer must be adamw or lamb, got {self.optimizer!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not self.train_jsonl and not self.train_shards:
            raise ValueError("set train_jsonl and/or train_shards")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """A TrainConfig from a JSON/YAML file plus overrides; unknown keys are a ValueError."""
    data: dict = {}
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping of TrainConfig keys")
    data.update(overrides or {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in data.items():
        data[key] = _coerce(key, value, hints[key])
    cfg = TrainConfig(**data)
    cfg.validate()
    return cfg


def _coerce(key: str, value, hint):
    """Config values from YAML/CLI to the field's type ("5e-4" is a string in YAML 1.1)."""
    if value is None:
        return None
    base = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) else [hint]
    base = base[0] if len(base) == 1 else None
    try:
        if base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if base is int and not isinstance(value, bool) and isinstance(value, (int, str, float)):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if base is tuple:
            return tuple(float(v) for v in value)
        if base is str and not isinstance(value, str):
            return str(value)
    except (TypeError, ValueError):
        name = getattr(base, "__name__", base)
        raise ValueError(f"config key {key!r}: cannot read {value!r} as {name}") from None
    return value


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Env:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig, rank: Optional[int] = None, world_size: Optional[int] = None,
                      init_method: Optional[str] = None, local_world_size: Optional[int] = None) -> Env:
    """Read torchrun's environment (or explicit rank/world_size/init_method) and join the process group."""
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        init_method = init_method or "env://"
    else:
        world_size = world_size or 1
        local_world_size = local_world_size or world_size
        local_rank = rank % local_world_size
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    threads = cfg.num_threads or (1 if world_size > 1 else None)
    if threads:
        torch.set_num_threads(threads)
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return Env(rank, world_size, local_rank, local_world_size, device)


def build_model(cfg: TrainConfig):
    from m2model.config import get_config
    from m2model.modeling import M2Encoder

    mcfg = get_config(cfg.model, **cfg.model_overrides)
    if cfg.context_length is not None and cfg.context_length > mcfg.max_text_len:
        raise ValueError(f"context_length {cfg.context_length} exceeds the model's max_text_len "
                         f"{mcfg.max_text_len}")
    model = M2Encoder(mcfg)
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
    apex_wanted = str(cfg.use_apex).lower()
    use_apex = device.type == "cuda" and (apex_wanted == "true"
                                          or (apex_wanted == "auto" and _apex_available()))
    if apex_wanted == "true" and not use_apex:
        raise ValueError("use_apex is true but apex cannot be imported (or the device is not CUDA)")
    if cfg.optimizer == "lamb":
        if not use_apex:
            raise ValueError("optimizer 'lamb' needs apex (FusedLAMB) on CUDA")
        from apex.optimizers import FusedLAMB

        return FusedLAMB(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if use_apex:
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True)
    fused = str(cfg.fused).lower()
    use_fused = fused == "true" or (fused == "auto" and device.type == "cuda")
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
        raise ValueError(f"group_size {group_size} does not divide the world size {env.world_size}")
    try:
        return ClipLoss(mode=cfg.loss_mode, group_size=group_size, backend=cfg.loss_backend)
    except TypeError as e:
        raise ValueError(f"loss_mode {cfg.loss_mode!r} needs m2kernels' distributed loss modes, which this "
                         f"installation lacks ({e})") from None


def _make_accumulator(loss_fn, k: int):
    try:
        from m2kernels.distributed import GBAAccumulator
    except ImportError:
        return None
    return GBAAccumulator(loss_fn, accum_steps=k)


# ------------------------------------------------------------------------------------------ checkpoints
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace (never a torn file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_checkpoints(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, "checkpoint-*.pt")))


def find_resume_checkpoint(cfg: TrainConfig) -> Optional[str]:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(cfg.output_dir)
        return found[-1] if found else None
    if not os.path.isfile(cfg.resume):
        raise ValueError(f"resume checkpoint {cfg.resume!r} does not exist")
    return cfg.resume


def _all_gather_object(obj, env: Env) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------ the loop
class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and returns."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if threading_is_main():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to(batch, device):
    nb = device.type == "cuda"
    return (batch.images.to(device, non_blocking=nb), batch.input_ids.to(device, non_blocking=nb),
            batch.attention_mask.to(device, non_blocking=nb))


def _stream(loader, ended_epochs: list):
    """Micro-batches across epochs (the loader advances its epoch when one is exhausted). When the last
    batch of an epoch is handed out, (epoch, that epoch's data counts) is appended to ``ended_epochs``."""
    while True:
        for batch in loader:
            if loader.step >= len(loader):
                ended_epochs.append((batch.epoch, dict(loader.stats)))
            yield batch


def train(cfg: TrainConfig, rank: Optional[int] = None, world_size: Optional[int] = None,
          init_method: Optional[str] = None, local_world_size: Optional[int] = None,
          on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run training; returns a summary dict (final step, last loss, checkpoint path, whether interrupted).

    ``rank``/``world_size``/``init_method`` start a process group without torchrun (e.g. mp.spawn with
    ``file://``). ``on_step(step, metrics)`` is called after every optimizer step.
    """
    from m2model.data import ImageTextLoader, load_records
    from m2model.tokenizers import get_tokenizer

    cfg.validate()
    env = setup_distributed(cfg, rank, world_size, init_method, local_world_size)
    try:
        return _train(cfg, env, on_step, ImageTextLoader, load_records, get_tokenizer)
    finally:
        if env.distributed and rank is not None and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, env, on_step, ImageTextLoader, load_records, get_tokenizer) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = env.device
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg).to(device)
    image_size = model.cfg.image_size
    tokenizer = get_tokenizer(cfg.tokenizer, context_length=cfg.context_length or model.cfg.max_text_len)
    records, index_stats = load_records(cfg.train_jsonl, cfg.train_shards, cfg.image_root)
    loader = ImageTextLoader(records, tokenizer, image_size, cfg.batch_size, train=True, seed=cfg.seed,
                             shard_id=env.rank, num_shards=env.world_size, backend=cfg.data_backend,
                             device=device.type, num_threads=cfg.data_threads, crop_scale=cfg.crop_scale,
                             flip_prob=cfg.flip_prob,
                             prefetch=cfg.prefetch)
    k = cfg.accum_steps
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * (len(loader) // k)
    if total_steps < 1 and cfg.max_steps is None:
        raise ValueError(f"an epoch has {len(loader)} micro-batches, fewer than accum_steps={k}; "
                         "set max_steps")
    ddp = DDP(model) if env.distributed else None
    net = ddp if ddp is not None else model
    optimizer = build_optimizer(cfg, model, device)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    loss_fn = build_loss(cfg, env)
    accumulator = _make_accumulator(loss_fn, k) if k > 1 else None
    if k > 1 and accumulator is None:
        raise ValueError("accum_steps > 1 needs m2kernels.distributed.GBAAccumulator, which this "
                         "installation lacks; use accum_steps=1")

    # torch RNG drives dropout; seeded per rank so ranks differ, restored exactly on resume
    torch.manual_seed(cfg.seed + 1000003 * (env.rank + 1))
    np.random.seed((cfg.seed + env.rank) & 0xFFFFFFFF)
    random.seed(cfg.seed + env.rank)

    step = 0
    ckpt_path = find_resume_checkpoint(cfg)
    if ckpt_path:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("world_size") != env.world_size:
            raise ValueError(f"{ckpt_path} was written by {ckpt.get('world_size')} processes, this run has "
                             f"{env.world_size}; the data position cannot be carried over exactly")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"][env.rank])
        set_rng_state(ckpt["rng"][env.rank])
        step = int(ckpt["step"])
        del ckpt

    if env.main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1, default=str)
    metrics_file = None
    if env.main:
        metrics_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a", encoding="utf-8")

    def log(obj: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(obj) + "\n")
            metrics_file.flush()

    def save(reason: str) -> str:
        loader_states = _all_gather_object(loader.state_dict(), env)
        rngs = _all_gather_object(rng_state(), env)
        path = os.path.join(cfg.output_dir, f"checkpoint-{step:08d}.pt")
        if env.main:
            atomic_save({"version": CHECKPOINT_VERSION, "step": step, "world_size": env.world_size,
                         "config": dataclasses.asdict(cfg), "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "loader": loader_states, "rng": rngs,
                         "reason": reason}, path)
            for old in list_checkpoints(cfg.output_dir)[: -max(1, cfg.keep_checkpoints)]:
                os.remove(old)
            log({"event": "checkpoint", "step": step, "path": path, "reason": reason})
        if env.distributed:
            dist.barrier()
        return path

    if env.main:
        log({"event": "start", "step": step, "world_size": env.world_size, "total_steps": total_steps,
             "records": len(records), "index_stats": dict(index_stats), "data_backend": loader.backend,
             "loss": type(loss_fn).__name__, "loss_mode": cfg.loss_mode if env.distributed else "local",
             "accum_steps": k, "resumed_from": ckpt_path})
        if index_stats:
            print(f"[data] index: {index_stats.summary()}", file=sys.stderr)

    bar = None
    if env.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)

    def forward(images, ids, mask):
        with _autocast(cfg, device):
            img, txt, scale = net(images, ids, mask)
        return img.float(), txt.float(), scale.float()

    ended_epochs: list = []
    stream = _stream(loader, ended_epochs)
    global_batch = cfg.batch_size * k * env.world_size
    last_loss, interrupted, ckpt_written = float("nan"), False, None
    t_last, steps_since = time.perf_counter(), 0
    stop_t = torch.zeros(1)
    with _StopFlag() as stop:
        while step < total_steps:
            model.train()
            if accumulator is None:
                batch = next(stream)
                images, ids, mask = _to(batch, device)
                img, txt, scale = forward(images, ids, mask)
                loss = loss_fn(img, txt, scale)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: the loss is {loss.item()}")
                scaler.scale(loss).backward()
                loss = loss.detach()
            else:
                for _ in range(k):
                    batch = next(stream)
                    accumulator.add(forward, *_to(batch, device))
                loss = accumulator.backward(no_sync=ddp.no_sync if ddp is not None else None,
                                            scaler=scaler if scaler.is_enabled() else None)
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            else:
                grad_norm = None
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            steps_since += 1

            for ended, counts in ended_epochs:
                counts = _sum_counts(counts, env)
                if env.main:
                    log({"event": "epoch_end", "epoch": ended, "step": step, "data": counts})
                    if counts:
                        text = ", ".join(f"{a}={b}" for a, b in sorted(counts.items()))
                        print(f"[data] epoch {ended}: {text}", file=sys.stderr)
            ended_epochs.clear()

            stats = None
            if step % cfg.log_every == 0 or step == total_steps:
                loss_avg = loss.clone()
                if env.distributed:
                    dist.all_reduce(loss_avg)
                    loss_avg /= env.world_size
                now = time.perf_counter()
                ips = global_batch * steps_since / max(now - t_last, 1e-9)
                t_last, steps_since = now, 0
                last_loss = loss_avg.item()
                stats = {"step": step, "epoch": batch.epoch, "loss": last_loss,
                         "lr": scheduler.get_last_lr()[-1], "logit_scale": model.logit_scale.exp().item(),
                         "images_per_s": ips}
                if grad_norm is not None:
                    stats["grad_norm"] = float(grad_norm)
                log(stats)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{stats['lr']:.2e}", img_s=f"{ips:.0f}")
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(step, stats or {"step": step, "loss": float(loss)})

            stop_t.fill_(stop.signum)
            if env.distributed:
                dist.all_reduce(stop_t, op=dist.ReduceOp.MAX)
            if stop_t.item():
                ckpt_written = save(f"signal {int(stop_t.item())}")
                interrupted = True
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                ckpt_written = save("periodic")
        else:
            ckpt_written = save("final")
    if bar is not None:
        bar.close()
    if env.main:
        log({"event": "end", "step": step, "interrupted": interrupted, "checkpoint": ckpt_written})
        metrics_file.close()
    return {"step": step, "loss": last_loss, "checkpoint": ckpt_written, "interrupted": interrupted,
            "model": model}


def _sum_counts(counts: dict, env: Env) -> dict:
    if not env.distributed:
        return counts
    merged: dict = {}
    for c in _all_gather_object(counts, env):
        for key, v in c.items():
            merged[key] = merged.get(key, 0) + v
    return merged


# ---------------------------------------------------------------------------------------------- CLI
def _parse_value(text: str):
    """A command-line value read as YAML (numbers, booleans, null, lists, mappings), else as a string."""
    try:
        import yaml
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="python -m m2model.train", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="JSON or YAML file of TrainConfig keys")
    for f in dataclasses.fields(TrainConfig):
        extra = {"nargs": "?", "const": "auto"} if f.name == "resume" else {}  # --resume alone: auto
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        ap.add_argument(f"--{f.name}", dest=f.name, default=None, type=_parse_value, metavar="VALUE",
                        help=f"(default: {default})", **extra)
    args = vars(ap.parse_args(argv))
    path = args.pop("config")
    overrides = {key: v for key, v in args.items() if v is not None}
    if "resume" in overrides and overrides["resume"] is True:
        overrides["resume"] = "auto"
    return load_config(path, overrides)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage.*")
        out = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        state = "interrupted" if out["interrupted"] else "finished"
        print(f"{state} at step {out['step']}; loss {out['loss']:.4f}; checkpoint {out['checkpoint']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training loop: DDP, the m2kernels contrastive loss (with GBA accumulation), clipping, the
schedule, metrics as jsonl with the data counts in every record, atomic checkpoints every ``save_every``
steps and on SIGTERM/SIGINT, and an exact resume."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from m2model import checkpoint as ckpt_io
from m2model.progress import progress_bar

from .builders import build_accumulator, build_loss, build_model, build_optimizer, cosine_schedule
from .config import TrainConfig
from .env import Env, all_gather_object, setup_distributed, sum_counts


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and returns."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


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
    """Run training; returns a summary dict (final step, last loss, checkpoint path, whether interrupted,
    the model, the data counts).

    ``rank``/``world_size``/``init_method`` start a process group without torchrun (e.g. mp.spawn with
    ``file://``). ``on_step(step, metrics)`` is called after every optimizer step.
    """
    cfg.validate()  # every key, before anything is loaded
    env = setup_distributed(cfg, rank, world_size, init_method, local_world_size)
    try:
        return _train(cfg, env, on_step)
    finally:
        if env.distributed and rank is not None and dist.is_initialized():
            dist.destroy_process_group()


def _resume(cfg: TrainConfig, env: Env):
    """(path, checkpoint) to resume from, after removing temporary files of killed runs."""
    if env.main:
        removed = ckpt_io.remove_stale_temp_files(cfg.output_dir)
        if removed:
            print(f"[checkpoint] removed temporary files of interrupted saves: {', '.join(removed)}",
                  file=sys.stderr)
    if env.distributed:
        dist.barrier()
    path, ckpt, skipped = ckpt_io.load_resume_checkpoint(cfg.resume, cfg.output_dir)
    if env.main:
        for p, reason in skipped:
            print(f"[checkpoint] skipped {p}: {reason}", file=sys.stderr)
        if path:
            print(f"[checkpoint] resuming from {path}", file=sys.stderr)
    return path, ckpt, skipped


def _train(cfg: TrainConfig, env: Env, on_step) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from m2model.data import ImageTextLoader, build_index
    from m2model.tokenizers import get_tokenizer, require_vocab_match

    device = env.device
    ckpt_path, ckpt, skipped = _resume(cfg, env)
    if ckpt is not None and ckpt.get("world_size") != env.world_size:
        raise ValueError(f"{ckpt_path} was written by {ckpt.get('world_size')} processes, this run has "
                         f"{env.world_size}; the data position cannot be carried over exactly")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg).to(device)
    tokenizer = get_tokenizer(cfg.tokenizer, context_length=cfg.context_length or model.cfg.max_text_len)
    try:  # a model trained on another tokenizer's ids cannot be evaluated with its own (evaluation checks)
        require_vocab_match(tokenizer, model.cfg.vocab_size, f"the model ({cfg.model!r} + model_overrides)")
    except ValueError as e:
        raise ValueError(f"config key 'tokenizer': {e}; or set model_overrides.vocab_size") from None
    index = build_index(cfg.train_jsonl, cfg.train_shards, cfg.image_root)
    loader = ImageTextLoader(index, tokenizer, model.cfg.image_size, cfg.batch_size, train=True,
                             seed=cfg.seed, shard_id=env.rank, num_shards=env.world_size,
                             backend=cfg.data_backend, device=device.type, workers=cfg.data_threads,
                             prefetch=cfg.prefetch, crop_scale=cfg.crop_scale, flip_prob=cfg.flip_prob)
    try:
        return _loop(cfg, env, on_step, model, loader, index, ckpt_path, ckpt, skipped, DDP)
    finally:
        loader.close()


def _loop(cfg, env, on_step, model, loader, index, ckpt_path, ckpt, skipped, DDP) -> dict:
    device = env.device
    k = cfg.accum_steps
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * (len(loader) // k)
    if total_steps < 1 and cfg.max_steps is None:
        raise ValueError(f"an epoch has {len(loader)} micro-batches per rank, fewer than accum_steps={k}; "
                         "set max_steps or lower accum_steps")
    ddp = DDP(model) if env.distributed else None
    net = ddp if ddp is not None else model
    optimizer = build_optimizer(cfg, model, device)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    loss_fn = build_loss(cfg, env)
    accumulator = build_accumulator(loss_fn, k)

    # torch RNG drives dropout; seeded per rank so ranks differ, restored exactly on resume
    torch.manual_seed(cfg.seed + 1000003 * (env.rank + 1))
    np.random.seed((cfg.seed + env.rank) & 0xFFFFFFFF)
    random.seed(cfg.seed + env.rank)

    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"][env.rank])
        ckpt_io.set_rng_state(ckpt["rng"][env.rank])
        step = int(ckpt["step"])
        del ckpt

    metrics_file = None
    if env.main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=1, default=str)
        metrics_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a", encoding="utf-8")

    def log(obj: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(obj) + "\n")
            metrics_file.flush()

    def data_counts() -> dict:
        """Index counts plus every rank's decode failures so far (a collective: all ranks call it)."""
        counts = dict(loader.index_stats)
        for key, v in sum_counts(loader.run_stats, env).items():
            counts[key] = counts.get(key, 0) + v
        return dict(sorted(counts.items()))

    def save(reason: str) -> str:
        loader_states = all_gather_object(loader.state_dict(), env)
        rngs = all_gather_object(ckpt_io.rng_state(), env)
        path = os.path.join(cfg.output_dir, f"checkpoint-{step:08d}.pt")
        if env.main:
            ckpt_io.atomic_save({"version": ckpt_io.CHECKPOINT_VERSION, "step": step,
                                 "world_size": env.world_size, "config": cfg.to_dict(),
                                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                 "loader": loader_states, "rng": rngs, "reason": reason}, path)
            for old in ckpt_io.list_checkpoints(cfg.output_dir)[: -cfg.keep_checkpoints]:
                os.remove(old)
            log({"event": "checkpoint", "step": step, "path": path, "reason": reason})
        if env.distributed:
            dist.barrier()
        return path

    if env.main:
        log({"event": "start", "step": step, "world_size": env.world_size, "total_steps": total_steps,
             "records": len(loader.records), "data": dict(index.stats), "data_backend": loader.backend,
             "loss": type(loss_fn).__name__, "loss_mode": cfg.loss_mode if env.distributed else "local",
             "accum_steps": k, "resumed_from": ckpt_path,
             "skipped_checkpoints": [os.path.basename(p) for p, _ in skipped]})
        print(f"[data] {len(loader.records)} usable samples, {loader.backend} decoding; index: "
              f"{index.stats.summary()}", file=sys.stderr)
        if index.problems:
            print(f"[data] first problems: {index.problems.summary()}", file=sys.stderr)

    bar = None
    if env.main and cfg.progress:
        bar = progress_bar(total_steps, initial=step, desc="train", unit="step")

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
                img, txt, scale = forward(*_to(batch, device))
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
            if cfg.grad_clip is not None:
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
                counts = sum_counts(counts, env)
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
                         "images_per_s": ips, "data": data_counts()}
                if grad_norm is not None:
                    stats["grad_norm"] = float(grad_norm)
                log(stats)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{stats['lr']:.2e}", img_s=f"{ips:.0f}",
                                    refresh=False)
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
    counts = data_counts()
    if env.main:
        log({"event": "end", "step": step, "interrupted": interrupted, "checkpoint": ckpt_written,
             "data": counts})
        metrics_file.close()
        print(f"[data] this run: {', '.join(f'{a}={b}' for a, b in counts.items()) or 'no bad samples'}",
              file=sys.stderr)
    return {"step": step, "loss": last_loss, "checkpoint": ckpt_written, "interrupted": interrupted,
            "model": model, "data": counts}

"""Process group and device of one training process (torchrun's environment, or explicit arguments)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .config import TrainConfig


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
            raise ValueError("config key 'device': 'cuda' requested but CUDA is not available")
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


def all_gather_object(obj, env: Env) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def sum_counts(counts: dict, env: Env) -> dict:
    """Named counts summed over the ranks."""
    merged: dict = {}
    for c in all_gather_object(dict(counts), env):
        for key, v in c.items():
            merged[key] = merged.get(key, 0) + v
    return merged

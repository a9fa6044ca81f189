"""Helpers for tests that spawn gloo process groups on the CPU (torch.multiprocessing.spawn)."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, env: dict, fn, args) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, env: dict | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; re-raise the first failure.

    ``fn`` must be a module-level function (it is pickled). ``env`` is added to each process's
    environment before the process group is created.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world_size, init_file, dict(env or {}), fn, args), nprocs=world_size,
                 join=True)


def make_batch(sizes, dim, seed=0, dtype=torch.float32, scale=10.0):
    """The same global batch on every rank: normalised features, one shard per entry of ``sizes``.

    Returns ``(X, Y, s)`` in float64 (the full batch) and the shard offsets.
    """
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x = torch.nn.functional.normalize(torch.randn(total, dim, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(x + 0.5 * torch.randn(total, dim, generator=g, dtype=torch.float64),
                                      dim=-1)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    x, y = x.to(dtype).double(), y.to(dtype).double()  # representable in dtype
    return x, y, torch.tensor(scale, dtype=torch.float64), offsets


def shares_ref(x, y, s, offsets, grads, label_smoothing=0.0):
    """Float64 reference of the per-rank shares L_q and of the gradients of Phi = sum_q g_q L_q.

    Returns ``(shares, dX, dY, ds)`` with ``dX``/``dY`` over the whole batch and ``ds`` = dPhi/ds.
    """
    x = x.detach().double().requires_grad_(True)
    y = y.detach().double().requires_grad_(True)
    s = s.detach().double().requires_grad_(True)
    logits = s * x @ y.T
    labels = torch.arange(x.shape[0])
    rows = torch.nn.functional.cross_entropy(logits, labels, reduction="none",
                                             label_smoothing=label_smoothing)
    cols = torch.nn.functional.cross_entropy(logits.T, labels, reduction="none",
                                             label_smoothing=label_smoothing)
    w, b = len(offsets) - 1, x.shape[0]
    shares = torch.stack([(rows[offsets[q]:offsets[q + 1]].sum() + cols[offsets[q]:offsets[q + 1]].sum())
                          * w / (2 * b) for q in range(w)])
    phi = (torch.as_tensor(grads, dtype=torch.float64) * shares).sum()
    dx, dy, ds = torch.autograd.grad(phi, (x, y, s))
    return shares.detach(), dx, dy, ds

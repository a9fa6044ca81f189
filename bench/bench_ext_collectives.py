"""One coalesced collective per step against separate torch.distributed calls per tensor.

    python -m bench.bench_ext_collectives [--world 2] [--backend gloo] [--iters 30] [--csv PATH]

A training step of the distributed loss moves two feature tensors (image and text, b x D each):
all-gather forward, reduce-scatter of their gradients backward, or one ring step. Providers:

- ``separate``: one torch.distributed call per tensor (what a loss issues today);
- ``coalesced-python``: m2kernels.distributed.collectives through torch.distributed (one flat buffer);
- ``coalesced-ext``: the same through the compiled torch.ops.m2kernels ops (when built).

Every call is timed on rank 0 between barriers; the table shows the median and the 20/80 % quantiles
in microseconds. The coalesced calls run with ``check=False`` (the hot-loop setting; the rank
agreement check adds one tiny all-gather). CSV rows name the device, backend and versions.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [(64, 256), (256, 512), (1024, 768)]  # (rows per rank, feature dim)
OPS = ["all_gather", "reduce_scatter", "ring"]


def _separate(op: str, tensors, group):
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if op == "all_gather":
        out = []
        for t in tensors:
            o = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype)
            dist.all_gather_single(o, t, group=group)
            out.append(o)
        return out
    if op == "reduce_scatter":
        out = []
        for t in tensors:
            o = torch.empty((t.shape[0] // world, *t.shape[1:]), dtype=t.dtype)
            dist.reduce_scatter_single(o, t, group=group)
            out.append(o)
        return out
    recv = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, recv):
        ops.append(dist.P2POp(dist.isend, t, group=group, group_peer=(rank + 1) % world))
        ops.append(dist.P2POp(dist.irecv, r, group=group, group_peer=(rank - 1) % world))
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    return recv


def _coalesced(op: str, tensors, group, use_ext: bool):
    from m2kernels.distributed import collectives as co

    fn = {"all_gather": co.all_gather_coalesced, "reduce_scatter": co.reduce_scatter_coalesced,
          "ring": co.ring_exchange}[op]
    return fn(tensors, group, check=False, use_extension=use_ext)


def _worker(rank, world, backend, init_file, iters, warmup, queue):
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    from m2kernels import _ext

    providers = ["separate", "coalesced-python"] + (["coalesced-ext"] if _ext.load() else [])
    rows = []
    for b, d in SIZES:
        g = torch.Generator().manual_seed(rank)
        for op in OPS:
            n = b * world if op == "reduce_scatter" else b
            tensors = [torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)]
            calls = {}
            for prov in providers:
                if prov == "separate":
                    calls[prov] = functools.partial(_separate, op, tensors, None)
                else:
                    calls[prov] = functools.partial(_coalesced, op, tensors, None, prov == "coalesced-ext")
            # Providers interleaved call by call, so drifting machine load hits all of them alike.
            times = {prov: [] for prov in providers}
            for i in range(warmup + iters):
                for prov in providers:
                    dist.barrier()
                    t0 = time.perf_counter()
                    calls[prov]()
                    dt = time.perf_counter() - t0
                    if i >= warmup:
                        times[prov].append(dt * 1e6)
            if rank == 0:
                for prov in providers:
                    q = statistics.quantiles(times[prov], n=10)
                    rows.append({"op": op, "rows_per_rank": b, "dim": d, "provider": prov,
                                 "median_us": statistics.median(times[prov]), "p20_us": q[1], "p80_us": q[7]})
    dist.destroy_process_group()
    if rank == 0:
        queue.put(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--csv", default=os.path.join("bench", "results", "ext_collectives.csv"))
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    fd, init_file = tempfile.mkstemp(prefix="m2bench_")
    os.close(fd)
    os.unlink(init_file)
    mp.start_processes(_worker, args=(args.world, args.backend, init_file, args.iters, args.warmup, queue),
                       nprocs=args.world, join=True, start_method="spawn")
    rows = queue.get()
    meta = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "backend": args.backend, "world": args.world, "torch": torch.__version__}
    print(f"{meta['device']}, {args.backend}, world {args.world}, torch {torch.__version__}; "
          "two fp32 tensors per step; microseconds per call (median [p20, p80])")
    providers = dict.fromkeys(r["provider"] for r in rows)
    print(f"{'op':<15}{'b x D':>11}  " + "".join(f"{p:>26}" for p in providers))
    for key in dict.fromkeys((r["op"], r["rows_per_rank"], r["dim"]) for r in rows):
        cells = [r for r in rows if (r["op"], r["rows_per_rank"], r["dim"]) == key]
        line = f"{key[0]:<15}{f'{key[1]}x{key[2]}':>11}  "
        line += "".join(f"{c['median_us']:>10.0f} [{c['p20_us']:>5.0f},{c['p80_us']:>6.0f}]   "
                        for c in cells)
        print(line)
    if args.csv:
        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*meta, *rows[0]])
            w.writeheader()
            for r in rows:
                w.writerow({**meta, **r})
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()

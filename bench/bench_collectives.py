"""Time and bytes per step of the distributed contrastive-loss modes over gloo (CPU processes).

    python -m bench.bench_collectives                      # default: small grid, a few minutes on 2 cores
    python -m bench.bench_collectives --full               # 1024 .. 8192 samples per rank
    python -m bench.bench_collectives --worlds 2 --samples 1024 4096 --steps 5 --modes global ring

For every world size one set of gloo processes is spawned (``file://`` rendezvous); each configuration
(mode x samples per rank) runs ``--warmup`` + ``--steps`` forward+backward steps of
``m2kernels.distributed.distributed_clip_loss`` on random unit-norm fp32 features (``--dim``, default
512) with the chunked ``torch`` backend. A step's time is the slowest rank's (all-reduce MAX); the
median and the 20th/80th percentiles over steps are reported. Bytes are those one rank sends per step:
``comm_bytes`` (closed form, bandwidth-optimal ring accounting) and, as a cross-check, the bytes the
collectives recorded while the step ran (``CommCounter``).

Outputs ``bench/results/collectives.csv`` (one row per world, mode and size; columns name the device,
torch version and date) and ``bench/results/collectives.png`` (time vs samples per rank).

On a CPU machine this measures mostly the loss arithmetic (4 passes over a b x (n*b) block per rank),
not the network: use the bytes columns to compare communication. World sizes above the number of CPU
cores are oversubscribed (processes share cores) and the output says so.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import device_name

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_SAMPLES = (1024, 2048)
FULL_SAMPLES = (1024, 2048, 4096, 8192)
COLUMNS = ["device", "torch_version", "date", "comm_backend", "loss_backend", "world_size", "cpu_cores",
           "load_avg_1m", "oversubscribed", "mode", "group_size", "samples_per_rank", "global_batch",
           "candidates_per_positive", "dim", "dtype", "steps", "time_median_ms", "time_p20_ms",
           "time_p80_ms", "bytes_sent_formula", "bytes_sent_counted", "mib_sent"]


def available_modes() -> list[str]:
    """The loss modes this installation provides (empty when m2kernels.distributed has none)."""
    try:
        from m2kernels.distributed import MODES
    except ImportError:
        return []
    return list(MODES)


def group_size_for(mode: str, world: int, group_size: int | None) -> int | None:
    if mode in ("global", "ring"):
        return None
    n = group_size if group_size is not None else max(1, world // 2)
    if world % n:
        raise ValueError(f"--group-size {n} does not divide world size {world}")
    return n


def candidates(mode: str, world: int, n: int | None, b: int) -> int:
    return b * (n if mode == "grouped" else world)


def _percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _bench_one(rank, world, mode, n, b, dim, steps, warmup, loss_backend):
    from m2kernels.distributed import distributed_clip_loss

    try:
        from m2kernels.distributed import CommCounter
    except ImportError:
        CommCounter = None

    g = torch.Generator().manual_seed(1000 + rank)
    x0 = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1)
    y0 = torch.nn.functional.normalize(x0 + 0.5 * torch.randn(b, dim, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    times, counted = [], None
    for step in range(warmup + steps):
        x = x0.clone().requires_grad_(True)
        y = y0.clone().requires_grad_(True)
        counter = CommCounter() if CommCounter is not None else None
        dist.barrier()
        t0 = time.perf_counter()
        if counter is not None:
            with counter:
                loss = distributed_clip_loss(x, y, scale, mode=mode, group_size=n, backend=loss_backend)
                loss.backward()
        else:
            loss = distributed_clip_loss(x, y, scale, mode=mode, group_size=n, backend=loss_backend)
            loss.backward()
        elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if not torch.isfinite(loss) or not bool(torch.isfinite(x.grad).all()):
            raise RuntimeError(f"non-finite loss or gradient in mode {mode}, b={b}")
        if step >= warmup:
            times.append(elapsed.item())
        if counter is not None:
            counted = counter.sent
    return times, counted


def _agreement_latency(calls: int = 500) -> float:
    """Median seconds of the host-side agreement exchange every distributed loss call starts with."""
    from m2kernels.distributed.agreement import agree

    fields = list(range(7))  # as many ints as the loss exchanges
    for _ in range(50):
        agree(dist.group.WORLD, "loss", None, fields)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        agree(dist.group.WORLD, "loss", None, fields)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank, world, init_file, out_file, cfg):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        agreement_s = _agreement_latency()
        if rank == 0:
            print(f"  world {world} agreement exchange (every loss call): median {agreement_s * 1e6:.0f} us",
                  flush=True)
        rows = []
        for b in cfg["samples"]:
            for mode in cfg["modes"]:
                n = group_size_for(mode, world, cfg["group_size"])
                times, counted = _bench_one(rank, world, mode, n, b, cfg["dim"], cfg["steps"], cfg["warmup"],
                                            cfg["loss_backend"])
                rows.append({"mode": mode, "group_size": n, "samples_per_rank": b, "times": times,
                             "counted": counted})
                if rank == 0:
                    ms = 1e3 * statistics.median(times)
                    print(f"  world {world} {mode:>12} b={b:5d}: median {ms:9.1f} ms", flush=True)
        if rank == 0:
            torch.save({"rows": rows, "agreement_s": agreement_s}, out_file)
    finally:
        dist.destroy_process_group()


def run_world(world: int, cfg: dict) -> tuple[list[dict], float]:
    """The rows of one world size and the median agreement-exchange time (seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out_file, cfg), nprocs=world, join=True)
        out = torch.load(out_file)
        return out["rows"], out["agreement_s"]


def formula_bytes(mode, b, dim, world, n):
    try:
        from m2kernels.distributed import comm_bytes
    except ImportError:
        return None
    return comm_bytes(mode, b, dim, world, group_size=n)["total"]["sent"]


def write_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4.2), squeeze=False)
    for ax, w in zip(axes[0], worlds):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            pts = sorted((r["samples_per_rank"], r["time_median_ms"]) for r in rows
                         if r["world_size"] == w and r["mode"] == mode)
            if pts:
                n = next(r["group_size"] for r in rows if r["world_size"] == w and r["mode"] == mode)
                label = mode if n in (None, "") else f"{mode} (n={n})"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        over = any(r["oversubscribed"] for r in rows if r["world_size"] == w)
        ax.set_title(f"world {w}, gloo" + (" (oversubscribed)" if over else ""))
        ax.set_xscale("log", base=2)
        ticks = sorted({r["samples_per_rank"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("samples per rank")
        ax.set_ylabel("forward+backward time per step (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{rows[0]['device']}, torch {rows[0]['torch_version']}, D={rows[0]['dim']} fp32",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--samples", type=int, nargs="+", default=None,
                   help=f"samples per rank (default {list(DEFAULT_SAMPLES)}; --full: {list(FULL_SAMPLES)})")
    p.add_argument("--full", action="store_true", help="1024 to 8192 samples per rank (slow on few cores)")
    p.add_argument("--modes", nargs="+", default=None, help="default: every mode available")
    p.add_argument("--group-size", type=int, default=None,
                   help="ranks per sub-group for hierarchical/grouped (default world // 2)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loss-backend", default="torch")
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)

    modes = available_modes()
    if not modes:
        print("m2kernels.distributed provides no loss modes in this installation; nothing to run",
              file=sys.stderr)
        return 1
    if args.modes:
        unknown = [m for m in args.modes if m not in modes]
        if unknown:
            p.error(f"unknown or unavailable mode(s) {unknown}; available: {modes}")
        modes = args.modes
    samples = args.samples or (FULL_SAMPLES if args.full else DEFAULT_SAMPLES)
    if any(w < 1 for w in args.worlds) or any(b < 1 for b in samples) or args.steps < 1 or args.dim < 1:
        p.error("world sizes, samples, steps and dim must be positive")
    for w in args.worlds:
        for m in modes:
            group_size_for(m, w, args.group_size)  # fail early on a group size that does not divide

    cores = os.cpu_count() or 1
    device = f"CPU {device_name(torch.device('cpu'))}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{device}; torch {torch.__version__}; gloo; modes {modes}; samples per rank {list(samples)}; "
          f"D={args.dim} fp32; {args.warmup} warm-up + {args.steps} timed steps")
    cfg = dict(samples=list(samples), modes=modes, group_size=args.group_size, dim=args.dim, steps=args.steps,
               warmup=args.warmup, loss_backend=args.loss_backend)
    rows, agreement = [], {}
    for w in args.worlds:
        over = w > cores
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        if load > cores:
            print(f"note: 1-minute load average {load:.1f} exceeds the {cores} cores: other processes "
                  "compete for the CPU and the times are inflated", flush=True)
        print(f"world {w}" + (f": OVERSUBSCRIBED ({w} processes on {cores} CPU cores; times include CPU "
                              "contention, compare modes within this world size only)" if over else ""),
              flush=True)
        world_rows, agreement[w] = run_world(w, cfg)
        for r in world_rows:
            times = r["times"]
            formula = formula_bytes(r["mode"], r["samples_per_rank"], args.dim, w, r["group_size"])
            counted = r["counted"]
            sent = formula if formula is not None else counted
            rows.append({
                "device": device, "torch_version": torch.__version__, "date": date, "comm_backend": "gloo",
                "loss_backend": args.loss_backend, "world_size": w, "cpu_cores": cores,
                "load_avg_1m": round(load, 2), "oversubscribed": over,
                "mode": r["mode"], "group_size": "" if r["group_size"] is None else r["group_size"],
                "samples_per_rank": r["samples_per_rank"], "global_batch": w * r["samples_per_rank"],
                "candidates_per_positive": candidates(r["mode"], w, r["group_size"], r["samples_per_rank"]),
                "dim": args.dim, "dtype": "float32", "steps": len(times),
                "time_median_ms": round(1e3 * statistics.median(times), 2),
                "time_p20_ms": round(1e3 * _percentile(times, 0.2), 2),
                "time_p80_ms": round(1e3 * _percentile(times, 0.8), 2),
                "bytes_sent_formula": "" if formula is None else int(formula),
                "bytes_sent_counted": "" if counted is None else int(counted),
                "mib_sent": "" if sent is None else float(f"{sent / 2**20:.4g}"),
            })

    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "collectives.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    png_path = os.path.join(args.out, "collectives.png")
    write_plot(rows, png_path)

    print()
    print("| world | mode | n | samples/rank | candidates/positive | median ms (p20-p80) "
          "| MiB sent/rank (formula; counted) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        counted = "" if r["bytes_sent_counted"] == "" else f"{r['bytes_sent_counted'] / 2**20:.4g}"
        print(f"| {r['world_size']}{'*' if r['oversubscribed'] else ''} | {r['mode']} | {r['group_size']} | "
              f"{r['samples_per_rank']} | {r['candidates_per_positive']} | {r['time_median_ms']:.1f} "
              f"({r['time_p20_ms']:.1f}-{r['time_p80_ms']:.1f}) | {r['mib_sent']}; {counted} |")
    if any(r["oversubscribed"] for r in rows):
        print(f"* oversubscribed: more processes than the {cores} CPU cores")
    for w, seconds in agreement.items():
        print(f"world {w}{'*' if w > cores else ''}: host-side agreement exchange, part of every step above: "
              f"median {seconds * 1e6:.0f} us a call")
    print(f"\nwrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

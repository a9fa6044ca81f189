"""What the two loss benchmarks share: the inputs, which providers can run, one measurement per child
process, the command line, the table, the plot and the CSV rows."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from bench.common import RESULTS_DIR, append_csv, environment, fmt_bytes, time_fn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def feature_pair(b: int, d: int, dtype: torch.dtype, device: torch.device):
    """Unit-norm image features and text features correlated with them (seeded), as a trained model's."""
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(b, d, device=device), dim=-1).to(dtype)
    y = torch.nn.functional.normalize(x.float() + 0.5 * torch.randn(b, d, device=device), dim=-1).to(dtype)
    return x, y


def common_provider_available(name: str, device: torch.device) -> tuple[bool, str]:
    """m2kernels' triton backend (benchmarked on CUDA only) and open_clip's loss.py; others can run."""
    if name.startswith("m2-triton"):
        from m2kernels.ops.tiling import triton_available

        ok, why = triton_available(device)
        if ok and device.type != "cuda":
            return False, "the triton backend is benchmarked on CUDA only (the CPU interpreter is for tests)"
        return ok, why
    if name == "open_clip":
        try:
            from m2kernels.reference import open_clip_loss_module

            open_clip_loss_module()
            return True, ""
        except ImportError as exc:
            return False, str(exc)
    return True, ""


def available_providers(wanted, device: torch.device, check) -> list[str]:
    providers = []
    for prov in wanted:
        ok, why = check(prov, device)
        if ok:
            providers.append(prov)
        else:
            print(f"skipping {prov}: {why}")
    return providers


def run_child(module: str, cfg: dict, timeout: float) -> dict:
    """One measurement by ``python -m module --worker cfg`` in a fresh process: its last JSON line, or
    the row with an ``error``."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(cfg)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A fixed mmap threshold: every allocation of 1 MiB or more is its own mapping, returned to the
    # system when freed, so the resident-set high-water mark tracks live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    except subprocess.TimeoutExpired:
        return dict(cfg, error=f"timed out after {timeout:.0f} s")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        if out.returncode in (-9, 137):
            err = "killed (out of memory?)"
        return dict(cfg, error=err[:300])
    return json.loads(lines[-1])


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """The measured dense matmul rate, the yardstick of the GPU tables."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, reps=10, warmup=3)
    return 2.0 * n**3 / (t["median_ms"] * 1e-3) / 1e12


def parser(description: str, name: str, modes: list[str], providers: list[str]) -> argparse.ArgumentParser:
    """The options both loss benchmarks take; results go to bench/results/<name>.csv and .png."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--dim", type=int, nargs="+", default=[512])
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--mode", nargs="+", default=["full"], choices=modes)
    p.add_argument("--providers", nargs="+", default=None, choices=providers)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 10 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    p.add_argument("--csv", default=os.path.join(RESULTS_DIR, f"{name}.csv"))
    p.add_argument("--plot", default=os.path.join(RESULTS_DIR, f"{name}.png"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def run_worker(args, measure) -> int:
    """The child side of ``run_child``: one measurement printed as a JSON line."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    print(json.dumps(measure(json.loads(args.worker))), flush=True)
    return 0


def start(args, cpu_batches: list[int]):
    """(device, environment, batches, dtypes, repetitions, warm-up steps), and the device line printed:
    bf16 at 16384 and 65536 on CUDA; fp32 on the CPU, where the memory measurement (one full step, first
    in each child) is the warm-up."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    env = environment(device)
    batches = args.batch or ([16384, 65536] if cuda else cpu_batches)
    dtypes = args.dtype or (["bf16"] if cuda else ["fp32"])
    reps = args.reps or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 0)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
    return device, env, batches, dtypes, reps, warmup


def stamp(row: dict, env: dict, matmul_rate: float) -> dict:
    """The row, printed, with the environment it was measured in and the dense matmul rate."""
    row.update(env_device=env["device"], env_torch=env["torch"], env_triton=env["triton"],
               env_date=env["date"], matmul_tflops=matmul_rate)
    report(row)
    return row


def report(row: dict) -> None:
    msg = row.get("error") or f"{row['median_ms']:.1f} ms, peak {fmt_bytes(row['peak_bytes'])}"
    print(f"  {row['provider']:>10} B={row['batch']:<7} D={row['dim']:<5} {row['dtype']} {row['mode']}: "
          f"{msg}", flush=True)


def print_table(rows: list[dict], baseline: str = "open_clip") -> None:
    by_key = {}
    for r in rows:
        by_key.setdefault((r["batch"], r["dim"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    print(
        f"\n{'batch':>7} {'dim':>5} {'dtype':>5} {'mode':>8} {'provider':>10} {'median ms':>10} "
        f"{'q20-q80 ms':>17} {'peak mem':>10} {'model':>10} {'time/' + baseline:>14} {'mem/' + baseline:>13}"
    )
    for key in sorted(by_key):
        base = by_key[key].get(baseline)
        for prov, r in by_key[key].items():
            if "error" in r:
                print(f"{key[0]:>7} {key[1]:>5} {key[2]:>5} {key[3]:>8} {prov:>10}  {r['error']}")
                continue
            tr = mr = "-"
            if base and "error" not in base:
                tr = f"{r['median_ms'] / base['median_ms']:.2f}x"
                mr = f"{r['peak_bytes'] / max(base['peak_bytes'], 1):.3f}x"
            print(
                f"{key[0]:>7} {key[1]:>5} {key[2]:>5} {key[3]:>8} {prov:>10} {r['median_ms']:>10.1f} "
                f"{r['q20_ms']:>8.1f}-{r['q80_ms']:<8.1f} {fmt_bytes(r['peak_bytes']):>10} "
                f"{fmt_bytes(r['model_bytes']):>10} {tr:>14} {mr:>13}"
            )


def plot(rows: list[dict], path: str, title: str) -> None:
    """Time and peak memory against batch size, one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for prov in sorted({r["provider"] for r in ok}):
        pts = sorted((r["batch"], r["median_ms"], r["peak_bytes"]) for r in ok if r["provider"] == prov)
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax_m.plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], marker="o", label=prov)
    r0 = ok[0]
    for ax, lab in ((ax_t, "median time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}, D={r0['dim']}, {r0['dtype']}, {r0['mode']} — {r0['env_device']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(rows: list[dict], args, title: str) -> None:
    """CSV rows (every key any row has) and the plot."""
    keys = sorted({k for r in rows for k in r})
    path = append_csv(args.csv, [{k: r.get(k, "") for k in keys} for r in rows])
    plot(rows, args.plot, title)
    print(f"\nCSV: {path}\nplot: {args.plot}")

"""Sigmoid (SigLIP) loss benchmark: m2kernels against open_clip's SigLipLoss.

    python -m bench.bench_siglip_loss                     # CPU default: torch backend vs open_clip
    python -m bench.bench_siglip_loss --batch 8192 --dim 512 --dtype fp32 --reps 3

Providers (each where it can run): ``m2-triton`` (CUDA), ``m2-torch`` (chunked PyTorch), ``open_clip``
(open-clip-torch's SigLipLoss, its loss.py loaded on its own). Every (provider, batch, dim, dtype, mode)
runs in a fresh child process, interleaved by batch size, so peak memory is measured without what
earlier runs left in the allocator (after one call at B = 16, which takes the one-time imports out of
it). Results: median and 20/80% quantiles of the time, peak memory above
the inputs, the analytic memory model, appended as CSV rows naming device, versions and date; a PNG
plot of time and memory against batch size; on CUDA the achieved TFLOP/s over the passes over S each
provider makes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from bench.bench_clip_loss import matmul_tflops, print_table
from bench.common import (
    RESULTS_DIR,
    PeakMemory,
    append_csv,
    environment,
    failed,
    fmt_bytes,
    small_first_call,
    time_fn,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROVIDERS = ["m2-triton", "m2-torch", "open_clip"]
# Passes over S (B x B x D multiply-adds each), forward + backward: m2kernels forms G in the forward
# (the loss's pass, then G Y and G^T X) and its backward makes none; open_clip's autograd makes the
# logits matmul and the two gradient matmuls.
PASSES = {"m2-triton": 3, "m2-torch": 3, "open_clip": 3}
SCALE, BIAS = 10.0, -10.0  # SigLIP's initialisation: logit_scale = exp(log 10), logit_bias = -10


def provider_available(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "m2-triton":
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


def make_loss(name: str):
    if name.startswith("m2-"):
        from m2kernels import siglip_loss

        backend = "triton" if name == "m2-triton" else "torch"
        return lambda x, y, s, t: siglip_loss(x, y, s, t, backend=backend)
    if name == "open_clip":
        from m2kernels.reference import open_clip_loss_module

        loss = open_clip_loss_module().SigLipLoss()
        return lambda x, y, s, t: loss(x, y, s, t)
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


def memory_model(name: str, b: int, d: int, elem: int, budget: int) -> float:
    """Peak bytes above the two input matrices for forward + backward, from what each provider stores.

    open_clip: the logits, the labels (built from a ones matrix and an identity), ``labels * logits``
    and logsigmoid's output and buffer are B x B matrices in the input dtype; about five are alive at
    the end of the forward, and the backward's are as many: 5 B^2 e.
    m2 (either backend): the fp32 gradients formed in the forward (2 B D 4; the backward scales them in
    place, and casts them for 16-bit inputs: 2 B D e more), plus one row chunk of temporaries within the
    memory budget (``budget``; the torch backend's chunk holds about 16 bytes per element on the CPU,
    the triton backend's G chunk e bytes).
    """
    if name == "open_clip":
        return 5.0 * b * b * elem
    features = 2.0 * b * d * (4 + (elem if elem != 4 else 0))
    per_element = elem if name == "m2-triton" else 12.0 + elem
    return min(budget, b * b * per_element) + features


def measure(cfg: dict) -> dict:
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    dtype = DTYPES[cfg["dtype"]]
    b, d = cfg["batch"], cfg["dim"]
    x = torch.nn.functional.normalize(torch.randn(b, d, device=device), dim=-1).to(dtype)
    y = torch.nn.functional.normalize(x.float() + 0.5 * torch.randn(b, d, device=device), dim=-1).to(dtype)
    s = torch.tensor(SCALE, device=device)
    t = torch.tensor(BIAS, device=device)
    loss_fn = make_loss(cfg["provider"])

    def leaves():
        return [v.detach().clone().requires_grad_(True) for v in (x, y, s, t)]

    def forward(state):
        return loss_fn(*state)

    def full(state):
        forward(state).backward()

    mode = cfg["mode"]
    small_first_call(full, (x, y, s, t))
    # Peak memory next, in this fresh process, before timing loops leave freed memory in malloc's pools.
    state = leaves()
    with PeakMemory(device) as pm:
        out = forward(state)
        if mode == "full":
            out.backward()
    del out, state
    timing = time_fn(full if mode == "full" else forward, device, cfg["reps"], cfg["warmup"], setup=leaves)
    from m2kernels.ops.tiling import default_memory_budget

    row = dict(cfg)
    row.update(timing)
    row["peak_bytes"] = pm.peak
    budget = default_memory_budget(device)  # the default the providers ran with
    row["model_bytes"] = memory_model(cfg["provider"], b, d, x.element_size(), budget)
    passes = PASSES[cfg["provider"]] if mode == "full" else 1
    row["tflops"] = passes * 2.0 * b * b * d / (timing["median_ms"] * 1e-3) / 1e12
    return row


def run_child(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_siglip_loss", "--worker", json.dumps(cfg)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Every allocation of 1 MiB or more is its own mapping, returned to the system when freed, so the
    # resident-set high-water mark tracks live tensors (as in bench_clip_loss).
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


def plot(rows: list[dict], path: str) -> None:
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
    fig.suptitle(f"SigLIP loss, D={r0['dim']}, {r0['dtype']}, {r0['mode']} — {r0['env_device']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="SigLIP-loss benchmark (see the module docstring).")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--dim", type=int, nargs="+", default=[512])
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--mode", nargs="+", default=["full"], choices=["forward", "full"])
    p.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 10 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    p.add_argument("--csv", default=os.path.join(RESULTS_DIR, "siglip_loss.csv"))
    p.add_argument("--plot", default=os.path.join(RESULTS_DIR, "siglip_loss.png"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        cfg = json.loads(args.worker)
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(json.dumps(measure(cfg)), flush=True)
        return 0

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    env = environment(device)
    batches = args.batch or ([16384, 65536] if cuda else [4096, 8192])
    dtypes = args.dtype or (["bf16"] if cuda else ["fp32"])
    reps = args.reps or (10 if cuda else 3)
    # On the CPU the memory measurement (one full step, first in each child) is the warm-up.
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 0)
    providers = []
    for prov in args.providers or PROVIDERS:
        ok, why = provider_available(prov, device)
        if ok:
            providers.append(prov)
        else:
            print(f"skipping {prov}: {why}")
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")

    rows = []
    for dtype in dtypes:
        rate = matmul_tflops(device, DTYPES[dtype]) if cuda else float("nan")
        for dim in args.dim:
            for mode in args.mode:
                for b in batches:
                    for prov in providers:
                        cfg = dict(provider=prov, device=str(device), batch=b, dim=dim, dtype=dtype,
                                   mode=mode, reps=reps, warmup=warmup)
                        r = run_child(cfg, args.timeout)
                        r.update(env_device=env["device"], env_torch=env["torch"], env_triton=env["triton"],
                                 env_date=env["date"], matmul_tflops=rate)
                        rows.append(r)
                        msg = r.get("error") or f"{r['median_ms']:.1f} ms, peak {fmt_bytes(r['peak_bytes'])}"
                        print(f"  {prov:>10} B={b:<7} D={dim:<5} {dtype} {mode}: {msg}", flush=True)
    print_table(rows)
    if cuda:
        for r in rows:
            if "error" not in r:
                print(f"{r['provider']:>10} B={r['batch']:<7} {r['tflops']:.1f} TFLOP/s over its passes "
                      f"({r['tflops'] / r['matmul_tflops']:.0%} of the dense {r['dtype']} matmul rate)")
    keys = sorted({k for r in rows for k in r})
    path = append_csv(args.csv, [{k: r.get(k, "") for k in keys} for r in rows])
    plot(rows, args.plot)
    print(f"\nCSV: {path}\nplot: {args.plot}")
    return 1 if failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())

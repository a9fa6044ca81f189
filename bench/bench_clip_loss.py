"""Contrastive-loss benchmark: m2kernels against the implementations users have today.

    python -m bench.bench_clip_loss                       # CPU default: torch backend vs open_clip
    python -m bench.bench_clip_loss --batch 4096 8192 --dim 512 --dtype fp32 --mode full
    python -m bench.bench_clip_loss --fit-budget 8        # largest batch within 8 GiB, per provider

Providers (each where it can run): ``m2-triton`` (CUDA; backward recomputes S), ``m2-triton-store``
(CUDA; the forward keeps the fp32 dot products, the backward skips the recompute), ``m2-torch``
(chunked PyTorch), ``m2-torch-store``, ``dense``
(plain PyTorch, logits materialised, same dtype), ``open_clip`` (open-clip-torch's ClipLoss),
``inf-cl`` (CUDA; bidirectional as the mean of two one-direction calls, its documented usage).
Every (provider, batch, dim, dtype, mode) runs in a fresh child process, interleaved by batch size,
so peak memory is measured without what earlier runs left in the allocator. Results: median and
20/80% quantiles of the time, peak memory above the inputs, appended as CSV rows naming device,
versions and date; a PNG plot of time and memory against batch size; on CUDA the achieved TFLOP/s,
counting the passes over S each provider makes.
"""

from __future__ import annotations

import sys

import torch

from bench import loss_harness as H
from bench.common import PeakMemory, append_csv, failed, fmt_bytes, small_first_call, time_fn

PROVIDERS = ["m2-triton", "m2-triton-store", "m2-torch", "m2-torch-store", "dense", "open_clip", "inf-cl"]
# Passes over S (B x B x D multiply-adds each) for forward + backward, per provider.
PASSES = {"m2-triton": (1, 3), "m2-triton-store": (1, 2), "m2-torch": (1, 3), "m2-torch-store": (1, 2),
          "dense": (1, 2), "open_clip": (2, 4), "inf-cl": (2, 8)}
# The effective rate counts this many passes for forward + backward, whoever computes the loss: the
# matmuls the loss needs at the least with recomputation (1 forward, 3 backward).
EFFECTIVE_PASSES = {"full": 4, "forward": 1, "backward": 3}


# --------------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------------


def provider_available(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "inf-cl":
        if device.type != "cuda":
            return False, "Inf-CL runs on CUDA only"
        try:
            import inf_cl  # noqa: F401

            return True, ""
        except Exception as exc:  # its import needs CUDA triton
            return False, f"inf-cl does not import: {exc}"
    return H.common_provider_available(name, device)


def make_loss(name: str):
    if name.startswith("m2-"):
        from m2kernels import clip_loss

        backend = "triton" if name.startswith("m2-triton") else "torch"
        store = name.endswith("-store")
        return lambda x, y, s: clip_loss(x, y, s, backend=backend, store_logits=store)
    if name == "dense":
        from m2kernels.reference import clip_loss_ref

        return lambda x, y, s: clip_loss_ref(x, y, s, upcast=False)
    if name == "open_clip":
        from m2kernels.reference import open_clip_loss_module

        loss = open_clip_loss_module().ClipLoss()
        return lambda x, y, s: loss(x, y, s)
    if name == "inf-cl":
        from inf_cl import cal_inf_loss

        return lambda x, y, s: 0.5 * (cal_inf_loss(x, y, scale=s) + cal_inf_loss(y, x, scale=s))
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


# --------------------------------------------------------------------------------------------------
# analytic memory model (bytes above the inputs, forward + backward peak)
# --------------------------------------------------------------------------------------------------


def memory_model(name: str, b: int, d: int, elem: int, device_type: str = "cuda") -> float:
    """Peak bytes above the two input matrices for forward + backward, from what each provider stores.

    open_clip: two separate B x B logits matmuls and their two log-softmax outputs are alive at the end of
    the forward (4 B^2 in the input dtype); backward frees them as it produces gradients: 4 B^2 e.
    dense (our reference, upcast=False): the unscaled product kept for the logit-scale gradient, the
    scaled logits, two log-softmax outputs, and one gradient buffer at the backward peak: 5 B^2 e.
    m2-triton: one G chunk in the input dtype within the memory budget (m2kernels' default: 1 GiB on
    CUDA, 64 MiB on the CPU), the fp32 dX and dY
    accumulators and the two gradients in the input dtype (2 B D (4 + e)), O(B) log-sum-exps;
    ``-store`` adds the fp32 dot products (4 B^2) kept from the forward.
    m2-torch: about (12 + e) bytes per element of a row chunk within the budget, plus the same B D terms
    (on the CPU, fp32 copies of the features as well: 2 B D 4).
    inf-cl: upcasts to fp32 and keeps fp32 gradients of both calls: about 8 B D fp32.
    Checked against measurements by ``--fit-budget`` and the model column of the main table.
    """
    if name == "open_clip":
        return 4.0 * b * b * elem
    if name == "dense":
        return 5.0 * b * b * elem
    from m2kernels.ops.tiling import default_memory_budget

    budget = default_memory_budget(torch.device(device_type))
    features = 2.0 * b * d * (4 + elem)
    stored = 4.0 * b * b if name.endswith("-store") else 0.0
    if name.startswith("m2-triton"):
        return min(budget, b * b * elem) + features + stored + 32.0 * b
    if name.startswith("m2-torch"):
        return min(budget, b * b * (12 + elem)) + features + 2.0 * b * d * 4 + stored
    if name == "inf-cl":
        return 8.0 * b * d * 4
    raise ValueError(name)


# --------------------------------------------------------------------------------------------------
# one measurement (runs in a child process)
# --------------------------------------------------------------------------------------------------


def measure(cfg: dict) -> dict:
    device = torch.device(cfg["device"])
    b, d = cfg["batch"], cfg["dim"]
    x, y = H.feature_pair(b, d, H.DTYPES[cfg["dtype"]], device)
    s = torch.tensor(1 / 0.07, device=device)
    loss_fn = make_loss(cfg["provider"])
    grad = cfg["mode"] != "forward-nograd"

    def leaves():
        return [t.detach().clone().requires_grad_(grad) for t in (x, y, s)]

    def forward(state=None):
        xx, yy, ss = state if state is not None else leaves()
        return loss_fn(xx, yy, ss)

    def full(state):
        forward(state).backward()

    def backward(state):
        state.backward()

    small_first_call(full, (x, y, s))
    # Peak memory next, in this fresh process, before timing loops leave freed memory in malloc's
    # pools: one full forward (+ backward) above the inputs and leaves.
    mode = cfg["mode"]
    state = leaves()
    with PeakMemory(device) as pm:
        out = forward(state)
        if mode != "forward":
            out.backward()
    del out, state
    if mode == "full":
        timing = time_fn(full, device, cfg["reps"], cfg["warmup"], setup=leaves)
    elif mode == "forward":
        timing = time_fn(forward, device, cfg["reps"], cfg["warmup"], setup=leaves)
    elif mode == "backward":
        timing = time_fn(backward, device, cfg["reps"], cfg["warmup"], setup=lambda: forward(leaves()))
    else:
        raise ValueError(mode)
    row = dict(cfg)
    row.update(timing)
    row["peak_bytes"] = pm.peak
    row["model_bytes"] = memory_model(cfg["provider"], b, d, x.element_size(), device.type)
    fwd, bwd = PASSES[cfg["provider"]]
    passes = {"full": fwd + bwd, "forward": fwd, "backward": bwd}[mode]
    row["tflops"] = passes * 2.0 * b * b * d / (timing["median_ms"] * 1e-3) / 1e12
    row["effective_tflops"] = EFFECTIVE_PASSES[mode] * 2.0 * b * b * d / (timing["median_ms"] * 1e-3) / 1e12
    return row


def run_config(provider, device, batch, dim, dtype, mode, reps, warmup) -> dict:
    """One measurement's settings, as passed to the child process."""
    return dict(provider=provider, device=str(device), batch=batch, dim=dim, dtype=dtype, mode=mode,
                reps=reps, warmup=warmup)


def print_device_table(rows: list[dict]) -> None:
    """The GPU summary: time, effective TFLOP/s (4 passes over S for forward + backward, whoever computes
    the loss), its ratio to the measured dense matmul rate, the provider's own pass count, peak memory."""
    print(f"\n{'provider':>16} {'B':>7} {'D':>5} {'dtype':>5} {'ms':>9} {'eff TFLOP/s':>11} {'of matmul':>9} "
          f"{'passes':>6} {'peak mem':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['provider']:>16} {r['batch']:>7} {r['dim']:>5} {r['dtype']:>5}  {r['error']}")
            continue
        f, b = PASSES[r["provider"]]
        print(f"{r['provider']:>16} {r['batch']:>7} {r['dim']:>5} {r['dtype']:>5} {r['median_ms']:>9.1f} "
              f"{r['effective_tflops']:>11.1f} {r['effective_tflops'] / r['matmul_tflops']:>8.0%} "
              f"{f + b:>6} {fmt_bytes(r['peak_bytes']):>10}")
    rates = {r["matmul_tflops"] for r in rows if "matmul_tflops" in r}
    rate = ", ".join(f"{v:.0f}" for v in rates)
    print(f"dense {rows[0]['dtype'] if rows else ''} matmul (8192^3): {rate} TFLOP/s")


# --------------------------------------------------------------------------------------------------
# largest batch that fits a memory budget
# --------------------------------------------------------------------------------------------------


def fit_budget(providers, device, dim, dtype, budget_bytes, start, time_cap_s, timeout):
    """Double B from ``start`` while the measured peak stays within the budget and one step stays under
    ``time_cap_s``; then bisect between the last fitting and the first failing size (to 1/8 of it)."""
    elem = torch.empty((), dtype=H.DTYPES[dtype]).element_size()
    results = []
    for prov in providers:
        fits, fails, last_time, b, note = None, None, 0.0, start, ""
        measured = []
        while True:
            cfg = run_config(prov, device, b, dim, dtype, "full", reps=1, warmup=0)
            input_bytes = 2 * b * dim * elem
            model = memory_model(prov, b, dim, elem, torch.device(device).type)
            if model + input_bytes > 1.25 * budget_bytes:
                # Not run: far over the budget by the model (on the CPU it could exhaust the machine).
                r = dict(cfg, error="not run: the memory model predicts more than 1.25x the budget")
            else:
                r = H.run_child("bench.bench_clip_loss", cfg, timeout)
            measured.append(r)
            if "error" in r or r["peak_bytes"] + input_bytes > budget_bytes:
                fails = b
            else:
                fits, last_time = b, r["median_ms"] / 1e3
            if fails is not None:
                if fits is None or fails - fits <= max(fits // 8, 1):
                    break
                b = (fits + fails) // 2
                continue
            if last_time * 4.5 > time_cap_s:  # the next doubling would take about 4x longer
                note = f"time cap: B={2 * b} would take about {4 * last_time:.0f} s a step"
                break
            b *= 2
        model_fit = _model_largest(prov, dim, elem, budget_bytes, torch.device(device).type)
        results.append({"provider": prov, "largest_measured": fits, "first_failing": fails, "note": note,
                        "model_largest": model_fit, "measurements": measured})
    return results


def _model_largest(prov, dim, elem, budget, device_type):
    lo, hi = 1, 1 << 26
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory_model(prov, mid, dim, elem, device_type) + 2 * mid * dim * elem <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = H.parser("Contrastive-loss benchmark (see the module docstring).", "clip_loss",
                 ["forward", "backward", "full"], PROVIDERS)
    p.add_argument("--fit-budget", type=float, default=None, metavar="GIB",
                   help="find the largest batch each provider runs forward+backward within GIB")
    p.add_argument("--fit-start", type=int, default=4096)
    p.add_argument("--fit-time-cap", type=float, default=120.0, help="seconds per step before stopping")
    args = p.parse_args(argv)
    if args.worker:
        return H.run_worker(args, measure)

    device, env, batches, dtypes, reps, warmup = H.start(args, [4096, 8192, 16384])
    cuda = device.type == "cuda"
    wanted = args.providers or (PROVIDERS if cuda else ["m2-torch", "open_clip"])
    providers = H.available_providers(wanted, device, provider_available)

    if args.fit_budget:
        budget = int(args.fit_budget * 2**30)
        res = fit_budget(
            providers, device, args.dim[0], dtypes[0], budget, args.fit_start, args.fit_time_cap, args.timeout
        )
        what = f"forward + backward, D={args.dim[0]}, {dtypes[0]}"
        print(f"\nlargest batch within {args.fit_budget:g} GiB ({what}):")
        print(f"{'provider':>10} {'measured fits':>14} {'first failing':>14} {'model predicts':>15}  note")
        rows = []
        for r in res:
            print(
                f"{r['provider']:>10} {str(r['largest_measured']):>14} {str(r['first_failing']):>14} "
                f"{r['model_largest']:>15}  {r['note']}"
            )
            for m in r["measurements"]:
                if "error" not in m:
                    rows.append(
                        dict(
                            m,
                            env_device=env["device"],
                            env_torch=env["torch"],
                            env_date=env["date"],
                            kind="fit-budget",
                        )
                    )
            for m in r["measurements"]:
                if "error" in m:
                    print(f"{'':>10}   B={m['batch']:>7}: {m['error']}")
                else:
                    print(
                        f"{'':>10}   B={m['batch']:>7}: peak {fmt_bytes(m['peak_bytes'])} "
                        f"(model {fmt_bytes(m['model_bytes'])}), {m['median_ms'] / 1e3:.1f} s"
                    )
        append_csv(args.csv.replace(".csv", "_fit.csv"), rows)
        return 0

    rows = []
    for dtype in dtypes:
        base_rate = H.matmul_tflops(device, H.DTYPES[dtype]) if cuda else float("nan")
        elem = torch.empty((), dtype=H.DTYPES[dtype]).element_size()
        total_mem = torch.cuda.get_device_properties(device).total_memory if cuda else float("inf")
        for dim in args.dim:
            for mode in args.mode:
                for b in batches:
                    for prov in providers:
                        cfg = run_config(prov, device, b, dim, dtype, mode, reps, warmup)
                        need = memory_model(prov, b, dim, elem, device.type) + 2 * b * dim * elem
                        if cuda and need > 0.95 * total_mem:
                            r = dict(cfg, error=f"skipped: the memory model predicts {fmt_bytes(need)} "
                                     f"> {fmt_bytes(total_mem)} of GPU memory")
                        else:
                            r = H.run_child("bench.bench_clip_loss", cfg, args.timeout)
                        rows.append(H.stamp(r, env, base_rate))
    H.print_table(rows)
    if cuda:
        print_device_table(rows)
    H.save(rows, args, "CLIP loss")
    return 1 if failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())

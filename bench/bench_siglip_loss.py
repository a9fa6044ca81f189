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

import sys

import torch

from bench import loss_harness as H
from bench.common import PeakMemory, failed, small_first_call, time_fn

PROVIDERS = ["m2-triton", "m2-torch", "open_clip"]
# Passes over S (B x B x D multiply-adds each), forward + backward: m2kernels forms G in the forward
# (the loss's pass, then G Y and G^T X) and its backward makes none; open_clip's autograd makes the
# logits matmul and the two gradient matmuls.
PASSES = {"m2-triton": 3, "m2-torch": 3, "open_clip": 3}
SCALE, BIAS = 10.0, -10.0  # SigLIP's initialisation: logit_scale = exp(log 10), logit_bias = -10


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
    b, d = cfg["batch"], cfg["dim"]
    x, y = H.feature_pair(b, d, H.DTYPES[cfg["dtype"]], device)
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


def main(argv=None) -> int:
    p = H.parser("SigLIP-loss benchmark (see the module docstring).", "siglip_loss", ["forward", "full"],
                 PROVIDERS)
    args = p.parse_args(argv)
    if args.worker:
        return H.run_worker(args, measure)

    device, env, batches, dtypes, reps, warmup = H.start(args, [4096, 8192])
    cuda = device.type == "cuda"
    providers = H.available_providers(args.providers or PROVIDERS, device, H.common_provider_available)

    rows = []
    for dtype in dtypes:
        rate = H.matmul_tflops(device, H.DTYPES[dtype]) if cuda else float("nan")
        for dim in args.dim:
            for mode in args.mode:
                for b in batches:
                    for prov in providers:
                        cfg = dict(provider=prov, device=str(device), batch=b, dim=dim, dtype=dtype,
                                   mode=mode, reps=reps, warmup=warmup)
                        r = H.run_child("bench.bench_siglip_loss", cfg, args.timeout)
                        rows.append(H.stamp(r, env, rate))
    H.print_table(rows)
    if cuda:
        for r in rows:
            if "error" not in r:
                print(f"{r['provider']:>10} B={r['batch']:<7} {r['tflops']:.1f} TFLOP/s over its passes "
                      f"({r['tflops'] / r['matmul_tflops']:.0%} of the dense {r['dtype']} matmul rate)")
    H.save(rows, args, "SigLIP loss")
    return 1 if failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())

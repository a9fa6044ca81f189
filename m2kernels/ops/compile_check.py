"""Compile every Triton kernel configuration for a CUDA target without a GPU.

    python -m m2kernels.ops.compile_check --cc 80 90 [--json]

For each kernel, input dtype, block configuration and compute capability it runs
``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` through to a cubin (ptxas ships with
triton) and reports the shared memory the kernel needs against the chip's opt-in limit. It must run
without TRITON_INTERPRET (under the interpreter the kernels are not compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

# Largest dynamic shared memory a block may opt into, in bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# (name, input dtype, PRECISION constexpr): the variants the launchers pick on a GPU.
DTYPES = [
    ("bf16", torch.bfloat16, "tf32"),
    ("fp16", torch.float16, "tf32"),
    ("fp32", torch.float32, "ieee"),
    ("fp32-tf32", torch.float32, "tf32"),
]
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _signature(kernel: str, ptr: str) -> dict:
    if kernel == "lse":
        names, types = ["Q", "K", "SCALE", "LSE"], [ptr, ptr, "*fp32", "*fp32"]
        scalars = ["M", "N", "D", "stride_qm", "stride_kn"]
        consts = ["BLOCK_M", "BLOCK_N", "BLOCK_D", "UPCAST", "PRECISION"]
    else:
        names = ["X", "Y", "SCALE", "R", "C", "A", "Bw", "DX", "DY"]
        types = [ptr, ptr] + ["*fp32"] * 7
        scalars = ["M", "N", "D", "stride_xm", "stride_yn"]
        consts = ["BLOCK_M", "BLOCK_N", "BLOCK_D", "UPCAST", "PRECISION", "HAS_DY"]
    sig = dict(zip(names, types))
    sig.update({k: ("i64" if k.startswith("stride") else "i32") for k in scalars})
    sig.update({k: "constexpr" for k in consts})
    return sig


def cases(ccs=(80, 90)):
    from m2kernels.ops.clip_loss import _triton_configs

    for cc in ccs:
        for dname, dtype, prec in DTYPES:
            for i, cfg in enumerate(_triton_configs(torch.empty((), dtype=dtype).element_size())):
                for kernel, has_dy in (("lse", None), ("grad", True), ("grad", False)):
                    name = f"sm{cc}-{kernel}{'-dy' if has_dy else ''}-{dname}-cfg{i}"
                    yield name, cc, kernel, dtype, prec, cfg, has_dy


def compile_case(cc, kernel, dtype, precision, cfg, has_dy) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from m2kernels.ops import clip_loss as ops

    fn = ops._lse_kernel if kernel == "lse" else ops._softmax_grad_kernel
    consts = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    consts.update(UPCAST=False, PRECISION=precision)
    if kernel == "grad":
        consts["HAS_DY"] = has_dy
    src = ASTSource(fn=fn, signature=_signature(kernel, _PTR[dtype]), constexprs=consts)
    t0 = time.perf_counter()
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
    )
    ptx = compiled.asm.get("ptx", "")
    return {
        "shared": int(compiled.metadata.shared),
        "limit": SHARED_LIMIT[cc],
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        "wgmma": "wgmma" in ptx,
        "mma": "mma" in ptx,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    p.add_argument("--json", action="store_true", help="print one JSON object (name -> result)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    results, failed = {}, 0
    for name, cc, kernel, dtype, prec, cfg, has_dy in cases(args.cc):
        try:
            results[name] = compile_case(cc, kernel, dtype, prec, cfg, has_dy)
        except Exception as exc:  # report every failure, keep going
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        r = results[name]
        bad = "error" in r or r["shared"] > r["limit"]
        failed += bad
        if not args.json:
            print(
                f"{name:32s} "
                + (
                    r["error"][:200]
                    if "error" in r
                    else f"shared {r['shared']:>7d} / {r['limit']} B  wgmma={r['wgmma']}  {r['seconds']:.1f}s"
                )
                + ("  FAIL" if bad else "")
            )
    if args.json:
        print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

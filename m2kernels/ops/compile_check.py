"""Compile every Triton kernel configuration for a CUDA target without a GPU, as a real launch would.

    python -m m2kernels.ops.compile_check [--cc 80 90] [--json] [--jobs 2]

Each kernel is specialised the way a launch at a real size specialises it: the arguments of a
representative call (B = 65536 columns, a chunk of 8192 rows, D = 1024) go through Triton's own binder,
so pointers carry their 16-byte divisibility, integers their divisibility by 16 and their i32/i64 type.
Then ``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` runs through to a cubin, and ptxas
(shipped with Triton) reports registers and spills. One JSON object per kernel, dtype, configuration
and target (``--json``: one per line) with the keys kernel, target, dtype, config, shared (bytes),
shared_limit, registers, spill_bytes, mma (wgmma / mma.sync / none), atomics, specialized (true).
The exit status is 1 when any case fails to compile or needs more shared memory than the chip has.
It must run without TRITON_INTERPRET (the interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# Largest dynamic shared memory a block may opt into, in bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# (input dtype, matmul precision for fp32): the variants the launchers pick on a GPU.
DTYPES = {"bf16": (torch.bfloat16, "tf32"), "fp16": (torch.float16, "tf32"), "fp32": (torch.float32, "ieee"),
          "fp32-tf32": (torch.float32, "tf32")}

# Kernel variants: (kernel, constexpr switches). The softmax loss's defaults for every dtype; its fast
# path (kept dot products: the backward kernel then has no matmul) for the 16-bit dtypes. The sigmoid
# loss's kernel with every epilogue on (the loss and G in one pass: the forward of a call with
# gradients; its other variants compute a subset of it), for fp32, fp16 and bf16.
VARIANTS = {
    "lse": ("lse", dict(HAS_DIAG=True, STORE_DOTS=False)),
    "grad": ("grad", dict(HAS_DIAG=True, HAS_SMOOTHING=True, LOAD_DOTS=False)),
    "lse-store": ("lse", dict(HAS_DIAG=True, STORE_DOTS=True)),
    "grad-load": ("grad", dict(HAS_DIAG=True, HAS_SMOOTHING=True, LOAD_DOTS=True)),
    "siglip": ("siglip", dict(HAS_DIAG=True, WANT_LOSS=True, WRITE_G=True)),
}
_DEFAULT = ("lse", "grad")
_CLIP_VARIANTS = ("lse", "grad", "lse-store", "grad-load")
_SIGLIP_DTYPES = ("bf16", "fp16", "fp32")

M_CHUNK, N_COLS, DIM = 8192, 65536, 1024


def has_matmul(variant: str) -> bool:
    return not VARIANTS[variant][1].get("LOAD_DOTS", False)


def cases(ccs=(80, 90)):
    """(name, cc, variant, dtype name, config index) for every case compiled."""
    from m2kernels.ops.tiling import tile_configs

    for cc in ccs:
        for dname, (dtype, _) in DTYPES.items():
            variants = _DEFAULT if dtype == torch.float32 else _CLIP_VARIANTS
            if dname in _SIGLIP_DTYPES:
                variants += ("siglip",)
            for variant in variants:
                for i, _cfg in enumerate(tile_configs(torch.empty((), dtype=dtype).element_size())):
                    yield f"sm{cc}-{variant}-{dname}-cfg{i}", cc, variant, dname, i


def _launch_args(kernel: str, dtype: torch.dtype, precision: str, switches: dict) -> dict:
    """The arguments of a representative launch (small tensors: the binder reads only their dtype and
    alignment) as the launchers in ``clip_kernels`` and ``siglip_kernels`` build them."""
    from m2kernels.ops import clip_kernels as ck
    from m2kernels.ops import siglip_kernels as sk
    from m2kernels.ops.tiling import G_STORAGE_SCALE, size_bucket, smallest_tile

    f32 = lambda: torch.empty(64, dtype=torch.float32)  # noqa: E731
    feat = lambda: torch.empty(64, dtype=dtype)  # noqa: E731
    common = dict(M=M_CHUNK, N=N_COLS, D=DIM, stride_x=DIM, stride_y=DIM, M_BUCKET=size_bucket(M_CHUNK),
                  N_BUCKET=size_bucket(N_COLS), EVEN_D=True, UPCAST=False, PRECISION=precision, diag_offset=0,
                  stride_dots=N_COLS)
    if kernel == "siglip":
        del common["stride_dots"]
        tiles = (M_CHUNK // smallest_tile()) * (N_COLS // smallest_tile())  # the partials' row stride
        return dict(fn=sk._siglip_kernel, X=feat(), Y=feat(), SCALE=f32(), BIAS=f32(), G=feat(), PARTS=f32(),
                    **common, stride_g=N_COLS, stride_parts=tiles, G_SCALE=G_STORAGE_SCALE[dtype], **switches)
    if kernel == "lse":
        return dict(fn=ck._clip_lse_kernel, X=feat(), Y=feat(), SCALE=f32(), ROW_MAX=f32(), ROW_SUM=f32(),
                    COL_MAX=f32(), COL_SUM=f32(), DIAG=f32(), DOTS=f32(), **common, **switches)
    return dict(fn=ck._clip_grad_kernel, X=feat(), Y=feat(), SCALE=f32(), R=f32(), C=f32(), A=f32(), Bw=f32(),
                DW=f32(), U=f32(), V=f32(), G=feat(), DS_PART=f32(), DOTS=f32(), stride_g=N_COLS,
                G_SCALE=G_STORAGE_SCALE[dtype], **common, **switches)


def _ptxas_stats(ptx: str, cc: int) -> dict:
    from triton.backends.nvidia import compiler as nv

    path = nv.get_ptxas(cc).path
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": (int(spills.group(1)) + int(spills.group(2))) if spills else None}


def compile_case(cc: int, variant: str, dname: str, index: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from m2kernels.ops.tiling import tile_configs

    dtype, precision = DTYPES[dname]
    kernel, switches = VARIANTS[variant]
    cfg = tile_configs(torch.empty((), dtype=dtype).element_size())[index]
    args = _launch_args(kernel, dtype, precision, switches)
    fn = args.pop("fn")
    kwargs = dict(args, **{k: v for k, v in cfg.items() if k.isupper()}, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"], debug=False)
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    # Triton's own binder: the specialisation (types, divisibility, constants) a launch with these
    # arguments gets.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptx = compiled.asm.get("ptx", "")
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    return {
        "kernel": variant, "target": f"sm_{cc}", "dtype": dname, "config": dict(cfg),
        "shared": int(compiled.metadata.shared), "shared_limit": SHARED_LIMIT[cc], **_ptxas_stats(ptx, cc),
        "mma": mma, "atomics": len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.", ptx, flags=re.M)),
        "specialized": bool(attrs), "cubin_bytes": len(compiled.asm.get("cubin", b"")),
    }


def _run(case):
    name, cc, variant, dname, index = case
    try:
        return name, compile_case(cc, variant, dname, index)
    except Exception as exc:  # report every failure, keep going
        return name, {"kernel": variant, "target": f"sm_{cc}", "dtype": dname, "config": index,
                      "error": f"{type(exc).__name__}: {exc}"[:2000]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for name, r in pool.map(_run, list(cases(args.cc))):
            bad = "error" in r or r["shared"] > r["shared_limit"]
            failed += bad
            if args.json:
                print(json.dumps(dict(r, name=name)), flush=True)
            elif "error" in r:
                print(f"{name:34s} {r['error'][:200]}  FAIL")
            else:
                print(f"{name:34s} shared {r['shared']:>7d}/{r['shared_limit']} B  regs {r['registers']}  "
                      f"spills {r['spill_bytes']}  {r['mma']}  atomics {r['atomics']}" + ("  FAIL" if bad else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

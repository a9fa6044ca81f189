"""The NCCL-native translation unit (csrc/nccl_collectives.cpp) and `python -m m2kernels.info`.

Where NCCL (nvidia-nccl-cu13 wheel or NCCL_HOME) and the CUDA headers + libcudart are present, setup.py
must have compiled and linked `m2kernels._C_nccl` (with -Wl,--no-undefined, so a successful link means
every symbol resolved); here it is loaded in a fresh process and must report the NCCL version of the
header it was compiled against. Elsewhere the test is skipped with the reason. The CUDA test runs the
native kernels against the c10d/Python path on a real NCCL group where a GPU exists.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tempfile
import types

import pytest
import torch
import torch.distributed as dist

from m2kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toolchain():
    """csrc/toolchain.py's functions, as setup.py sees them."""
    return types.SimpleNamespace(**runpy.run_path(os.path.join(ROOT, "csrc", "toolchain.py")))


def _off(name: str) -> bool:
    return os.environ.get(name, "auto").strip().lower() in ("0", "false", "no", "off")


def test_nccl_translation_unit_compiled_and_linked():
    if _off("M2_BUILD_EXT") or _off("M2_BUILD_NCCL"):
        pytest.skip("the NCCL extension build is turned off (M2_BUILD_EXT=0 or M2_BUILD_NCCL=0)")
    tc = _toolchain()
    nccl, cuda = tc.find_nccl(), tc.find_cuda()
    if nccl is None:
        pytest.skip("NCCL not found (no nvidia-nccl-cu13 wheel, NCCL_HOME or /usr/include/nccl.h)")
    if cuda is None or cuda[1] is None:
        pytest.skip("CUDA headers or libcudart not found (CUDA_HOME, /usr/local/cuda, nvidia-cuda-runtime)")
    path = _ext.find_library("_C_nccl")
    assert path is not None, (
        f"NCCL ({nccl[0]}) and CUDA ({cuda[0]}) are present but m2kernels/_C_nccl was not built; "
        "run `pip install --no-build-isolation -e .` and read its warnings"
    )
    assert _ext.library_torch_version(path) == torch.__version__
    code = (
        "import torch, json, sys\n"
        f"torch.ops.load_library({_ext.find_library('_C')!r})\n"
        f"torch.ops.load_library({path!r})\n"
        "print(json.dumps({'nccl': int(torch.ops.m2kernels.nccl_version())}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])["nccl"]
    assert got == tc.nccl_header_version(nccl[0]), (got, nccl)


def test_info_reports_versions_and_extensions():
    proc = subprocess.run([sys.executable, "-m", "m2kernels.info", "--json"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert set(info["loss_backends"]) == {"triton", "torch", "reference"}
    assert set(info["extensions"]) == {"_C", "_C_nccl"}
    built = _ext.find_library("_C") is not None
    assert info["extensions"]["_C"]["built"] is built
    if built and not _off("M2_BUILD_EXT"):
        assert info["extensions"]["_C"]["loaded"] and info["extensions"]["_C"]["matches_running_torch"]
        assert info["collectives_path"] == "extension"
    text = subprocess.run([sys.executable, "-m", "m2kernels.info"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "M2_DISABLE_EXT": "1"}).stdout
    assert "python (torch.distributed)" in text and f"torch         {torch.__version__}" in text


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(),
                    reason="needs a CUDA device and torch with NCCL")
def test_nccl_native_matches_c10d_on_gpu():
    """World size 1 NCCL group on one GPU: native kernels == Python path (shapes, dtypes, values)."""
    assert _ext.load() and _ext.load_nccl(), _ext.status()
    from m2kernels.distributed import collectives as co

    fd, path = tempfile.mkstemp(prefix="m2nccl_")
    os.close(fd)
    os.unlink(path)
    dist.init_process_group("nccl", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        dev = torch.device("cuda", torch.cuda.current_device())
        xs = [torch.randn(3, 5, device=dev), torch.randn(2, 4, device=dev, dtype=torch.bfloat16),
              torch.arange(4, device=dev)]
        for fn in (co.all_gather_coalesced, co.ring_exchange):
            a = fn(xs, use_extension=True)
            b = fn(xs, use_extension=False)
            for u, v in zip(a, b):
                assert u.dtype == v.dtype and torch.equal(u, v)
        a = co.reduce_scatter_coalesced(xs[:1], use_extension=True)
        torch.testing.assert_close(a[0], xs[0])
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()

"""Finds the NCCL and CUDA pieces the NCCL-native extension is built against.

Used by setup.py (loaded by file path, before the package is importable) and by the tests.
Only headers and shared libraries are needed: no nvcc, no CUDA build of torch.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig


def site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    out: list[str] = []
    for d in dirs:
        if d not in out and os.path.isdir(d):
            out.append(d)
    return out


def find_nccl() -> tuple[str, str, str] | None:
    """(include dir, lib dir, library file name) of NCCL, or None.

    Looks in $NCCL_HOME, the nvidia-nccl-cu* wheels (<site-packages>/nvidia/nccl) and /usr.
    """
    candidates = []
    if os.environ.get("NCCL_HOME"):
        home = os.environ["NCCL_HOME"]
        candidates.append((os.path.join(home, "include"), os.path.join(home, "lib")))
    for site in site_dirs():
        candidates.append((os.path.join(site, "nvidia", "nccl", "include"),
                           os.path.join(site, "nvidia", "nccl", "lib")))
    candidates.append(("/usr/include", "/usr/lib/x86_64-linux-gnu"))
    for inc, lib in candidates:
        if not os.path.isfile(os.path.join(inc, "nccl.h")):
            continue
        for name in ("libnccl.so.2", "libnccl.so"):
            if os.path.isfile(os.path.join(lib, name)):
                return inc, lib, name
    return None


def find_cuda() -> tuple[str, str | None, str | None] | None:
    """(include dir, libcudart dir or None, libcudart file name or None), or None without headers.

    Looks in $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and the nvidia-cuda-runtime wheels.
    """
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates = [(os.path.join(h, "include"), os.path.join(h, "lib64")) for h in homes if h]
    for site in site_dirs():
        subs = sorted(glob.glob(os.path.join(site, "nvidia", "cu*"))) + [
            os.path.join(site, "nvidia", "cuda_runtime")
        ]
        candidates += [(os.path.join(s, "include"), os.path.join(s, "lib")) for s in subs]
    for inc, lib in candidates:
        if not os.path.isfile(os.path.join(inc, "cuda_runtime_api.h")):
            continue
        libs = sorted(glob.glob(os.path.join(lib, "libcudart.so*")))
        if libs:
            return inc, lib, os.path.basename(libs[0])
        return inc, None, None
    return None


def nccl_header_version(include_dir: str) -> int | None:
    """NCCL_VERSION_CODE computed from nccl.h's NCCL_MAJOR/MINOR/PATCH (as ncclGetVersion reports)."""
    parts = {}
    with open(os.path.join(include_dir, "nccl.h")) as f:
        for line in f:
            tokens = line.split()
            if len(tokens) >= 3 and tokens[0] == "#define" and tokens[1] in ("NCCL_MAJOR", "NCCL_MINOR",
                                                                          "NCCL_PATCH"):
                parts[tokens[1]] = int(tokens[2])
    if len(parts) != 3:
        return None
    major, minor, patch = parts["NCCL_MAJOR"], parts["NCCL_MINOR"], parts["NCCL_PATCH"]
    if (major, minor) >= (2, 9):
        return major * 10000 + minor * 100 + patch
    return major * 1000 + minor * 100 + patch

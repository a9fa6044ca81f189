"""Loads the compiled csrc/ extensions; one warning and a pure-Python fallback when absent.

Two shared libraries may sit next to this file (built by ``pip install --no-build-isolation -e .``):

- ``_C``: ``torch.ops.m2kernels.*`` grouped collectives over any c10d backend.
- ``_C_nccl``: CUDA kernels for the same ops on the library's own NCCL communicators; loaded only
  where torch has CUDA (``M2_DISABLE_NCCL=1`` keeps CUDA tensors on the c10d kernels).

Each library carries the torch version it was compiled against as a plain string. It is read from the
file *before* loading, and a library built for another torch is refused with a warning (a stale
binary may not even link against the running torch). ``M2_DISABLE_EXT=1`` skips loading altogether.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import threading
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "ExtensionStatus", "disabled", "find_library", "library_torch_version", "load", "load_nccl", "status",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
_MARKER = re.compile(rb"M2KERNELS_BUILD_TORCH_VERSION=([^;\x00]{1,80});")
_lock = threading.RLock()


@dataclass
class ExtensionStatus:
    name: str
    path: str | None = None  # the shared library next to this file, if any
    built_for: str | None = None  # torch version stored in the library at build time
    loaded: bool = False
    reason: str = "not loaded yet"

    @property
    def matches_torch(self) -> bool | None:
        return None if self.built_for is None else self.built_for == torch.__version__


_status: dict[str, ExtensionStatus] = {}
_warned = False


def disabled() -> bool:
    """True when ``M2_DISABLE_EXT`` asks for the pure-Python path."""
    return os.environ.get("M2_DISABLE_EXT", "0").strip().lower() in ("1", "true", "yes", "on")


def find_library(name: str) -> str | None:
    """Path of the compiled ``m2kernels.<name>`` library, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, name + suffix)
        if os.path.isfile(path):
            return path
    return None


def library_torch_version(path: str) -> str | None:
    """The torch version a library was built against, read from the file without loading it."""
    with open(path, "rb") as f:
        match = _MARKER.search(f.read())
    return match.group(1).decode("ascii", "replace") if match else None


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_library(name: str) -> ExtensionStatus:
    st = _status.get(name)
    if st is not None:
        return st
    st = ExtensionStatus(name, path=find_library(name))
    _status[name] = st
    if st.path is None:
        st.reason = "not built (see docs/extensions.md)"
        return st
    st.built_for = library_torch_version(st.path)
    if st.built_for is None:
        st.reason = "no build marker in the library (corrupt or foreign file)"
        return st
    if st.built_for != torch.__version__:
        st.reason = (
            f"built for torch {st.built_for} but torch {torch.__version__} is running; rebuild with "
            "`pip install --no-build-isolation -e .`"
        )
        return st
    try:
        torch.ops.load_library(st.path)
    except Exception as e:  # noqa: BLE001 - any load failure means: use the Python path
        st.reason = f"failed to load: {type(e).__name__}: {e}"
        return st
    st.loaded, st.reason = True, "loaded"
    return st


def load() -> bool:
    """Loads ``_C`` (once). False means: use the Python path. The ops' autograd formulas are registered
    by ``m2kernels.distributed.collectives``, which decides at import which path it uses."""
    if disabled():
        return False
    done = _status.get("_C")
    if done is not None:  # lock-free after the first call (and traceable by torch.compile)
        return done.loaded
    with _lock:
        first = "_C" not in _status
        st = _load_library("_C")
        if first and st.loaded:
            load_nccl()
        if not st.loaded:
            _warn_once(f"m2kernels: C++ collectives extension unavailable ({st.reason}); using the "
                       "pure-Python torch.distributed path")
        return st.loaded


def load_nccl() -> bool:
    """Loads ``_C_nccl`` where torch has CUDA (and ``M2_DISABLE_NCCL`` is not set)."""
    with _lock:
        if "_C_nccl" in _status:
            return _status["_C_nccl"].loaded
        if os.environ.get("M2_DISABLE_NCCL", "0").strip().lower() in ("1", "true", "yes", "on"):
            _status["_C_nccl"] = ExtensionStatus("_C_nccl", find_library("_C_nccl"),
                                                 reason="M2_DISABLE_NCCL set")
            return False
        if not torch.cuda.is_available():
            path = find_library("_C_nccl")
            st = ExtensionStatus("_C_nccl", path, reason="torch has no CUDA device; not loaded")
            st.built_for = library_torch_version(path) if path else None
            if path is None:
                st.reason = "not built (needs CUDA headers and NCCL at build time)"
            _status["_C_nccl"] = st
            return False
        st = _load_library("_C_nccl")
        if not st.loaded and st.path is not None:
            warnings.warn(f"m2kernels: NCCL-native extension unavailable ({st.reason}); CUDA tensors use "
                          "the c10d kernels", RuntimeWarning, stacklevel=2)
        return st.loaded


def status() -> dict[str, ExtensionStatus]:
    """Status of every extension (without loading anything that is not loaded yet)."""
    out = {}
    for name in ("_C", "_C_nccl"):
        st = _status.get(name)
        if st is None:
            path = find_library(name)
            st = ExtensionStatus(name, path, library_torch_version(path) if path else None,
                                 reason="not loaded yet" if path else "not built")
        out[name] = st
    return out

"""setup.py's extension flags: skip, refuse nonsense, and require-or-fail."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_build_ext_0_skips_all_extensions():
    proc = _setup("--name", M2_BUILD_EXT="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "m2kernels"
    assert "M2_BUILD_EXT=0, not building the C++ extensions" in proc.stderr


def test_bad_flag_value_is_refused():
    proc = _setup("--name", M2_BUILD_EXT="perhaps")
    assert proc.returncode != 0
    assert "M2_BUILD_EXT='perhaps': expected auto, 0 or 1" in proc.stderr


def test_required_extension_without_compiler_fails_clearly():
    proc = _setup("--name", M2_BUILD_EXT="1", CXX="/nonexistent/c++")
    assert proc.returncode != 0
    assert "the _C extension was required (M2_BUILD_EXT=1) but cannot be built" in proc.stderr
    assert "no C++ compiler" in proc.stderr


def test_auto_without_compiler_warns_once_and_continues():
    proc = _setup("--name", CXX="/nonexistent/c++")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("not building the _C extension: no C++ compiler") == 1

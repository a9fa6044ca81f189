"""Every Triton kernel configuration compiles for Ampere (sm_80) and Hopper (sm_90) without a GPU,
through to a cubin, and its shared memory fits the chip."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from m2kernels.ops.compile_check import cases  # noqa: E402

CASES = [c[0] for c in cases()]


@pytest.fixture(scope="module")
def compiled():
    # The interpreter replaces compilation, so compile in a child process without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "m2kernels.ops.compile_check", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.stdout.strip(), f"compile_check printed nothing; stderr:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_kernel_compiles_and_fits(compiled, name):
    r = compiled[name]
    assert "error" not in r, r.get("error")
    assert r["cubin_bytes"] > 0
    assert 0 < r["shared"] <= r["limit"], f"{name}: {r['shared']} B of shared memory > limit {r['limit']} B"
    if name.startswith("sm90") and "fp32-" not in name and "-fp32-" not in name:
        assert r["wgmma"], f"{name}: 16-bit dots did not lower to wgmma on sm_90"

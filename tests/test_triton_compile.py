"""Every Triton kernel configuration compiles for Ampere (sm_80) and Hopper (sm_90) without a GPU, with
the specialisation a real launch gets, through to a cubin: shared memory fits both chips, no atomics,
and on sm_90 every 16-bit configuration with a matmul uses wgmma and spills no registers."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from m2kernels.ops.compile_check import cases, has_matmul  # noqa: E402

CASES = [c[0] for c in cases()]


@pytest.fixture(scope="module")
def compiled():
    # The interpreter replaces compilation, so compile in a child process without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "m2kernels.ops.compile_check", "--json"], env=env,
                         capture_output=True, text=True, timeout=1800,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, f"compile_check printed nothing; stderr:\n{out.stderr[-4000:]}"
    return {r["name"]: r for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_kernel_compiles_and_fits(compiled, name):
    r = compiled[name]
    assert "error" not in r, r.get("error")
    assert r["specialized"] is True and r["cubin_bytes"] > 0
    assert 0 < r["shared"] <= r["shared_limit"], f"{name}: {r['shared']} B of shared memory > limit"
    assert r["atomics"] == 0, f"{name}: {r['atomics']} atomic instructions"
    assert isinstance(r["registers"], int) and r["spill_bytes"] is not None
    if r["target"] == "sm_90" and r["dtype"] in ("bf16", "fp16"):
        assert r["spill_bytes"] == 0, f"{name}: {r['spill_bytes']} bytes of register spills"
        if has_matmul(r["kernel"]):
            assert r["mma"] == "wgmma", f"{name}: 16-bit dots did not lower to wgmma ({r['mma']})"

"""The loss benchmarks run end to end at a tiny size (each measurement in its own child process) and
fail loudly when a measurement crashes."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["bench.bench_clip_loss", "bench.bench_siglip_loss"])
def test_loss_benchmark_smoke(module, tmp_path):
    cmd = [sys.executable, "-m", module, "--device", "cpu", "--batch", "64", "--dim", "8", "--reps", "1",
           "--providers", "m2-torch", "open_clip", "--csv", str(tmp_path / "r.csv"), "--plot",
           str(tmp_path / "r.png")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"m2-torch", "open_clip"}
    for r in rows:
        assert not r.get("error"), r
        assert float(r["median_ms"]) > 0 and float(r["peak_bytes"]) >= 0
    assert (tmp_path / "r.png").exists()


def test_failed_measurements_are_failures():
    from bench.common import failed

    assert failed([{"error": "ImportError: no module"}])
    assert not failed([{"error": "skipped: the memory model predicts 3 GiB"},
                       {"error": "timed out after 5 s"}, {"error": "killed (out of memory?)"},
                       {"median_ms": 1.0}])

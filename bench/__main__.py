"""``python -m bench``: the CPU benchmark suite in one command (under 10 minutes on 2 cores).

Runs, in order: the loss benchmark (torch backend vs open_clip at B = 4096, 8192, 16384, D = 512,
fp32, forward + backward; one timed step after the memory-measuring one), the largest batch within a
2 GiB budget, the SigLIP loss benchmark (torch backend vs open_clip's SigLipLoss at B = 4096, 8192),
the collectives benchmark (gloo), the coalesced-extension benchmark and the
data-pipeline benchmark, where each exists.
Pass ``--quick`` for a smaller smoke run. Results go to bench/results/ (CSV and PNG).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time

QUICK = "--quick" in sys.argv


def run(module: str, *args: str) -> int:
    if importlib.util.find_spec(module) is None:
        print(f"\n== {module}: not present, skipped")
        return 0
    print(f"\n== python -m {module} {' '.join(args)}", flush=True)
    t0 = time.time()
    rc = subprocess.call([sys.executable, "-m", module, *args])
    print(f"== {module}: exit {rc}, {time.time() - t0:.0f} s", flush=True)
    return rc


def main() -> int:
    rc = 0
    if QUICK:
        rc |= run("bench.bench_clip_loss", "--batch", "1024", "2048", "--reps", "1")
        rc |= run("bench.bench_siglip_loss", "--batch", "1024", "2048", "--reps", "1")
    else:
        rc |= run("bench.bench_clip_loss", "--batch", "4096", "8192", "16384", "--reps", "1",
                  "--providers", "m2-torch", "open_clip")
        rc |= run("bench.bench_clip_loss", "--providers", "m2-torch", "open_clip", "--fit-budget", "2",
                  "--fit-start", "4096", "--fit-time-cap", "40")
        rc |= run("bench.bench_siglip_loss", "--batch", "4096", "8192", "--reps", "1")
    rc |= run("bench.bench_collectives", *(["--quick"] if QUICK else []))
    rc |= run("bench.bench_ext_collectives")
    rc |= run("bench.bench_data", *(["--quick"] if QUICK else []))
    return rc


if __name__ == "__main__":
    sys.exit(main())

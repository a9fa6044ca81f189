#!/usr/bin/env bash
# The one prepared GPU check (at most about 4 minutes on one H200): correctness of the kernels on CUDA
# (tests/test_gpu.py: fp32/bf16/fp16 against float64, both backward paths, determinism, autocast,
# the memory model at B = 65536), then one table of forward + backward at B = 16384, 65536, 262144,
# D = 1024, bf16: provider, B, time, effective TFLOP/s (4 passes over S), its ratio to a dense bf16
# matmul measured in the same run, the provider's own pass count and peak memory, for m2kernels'
# triton backend (recompute and stored-logits backward), its torch backend, open_clip and Inf-CL.
#
# Installs nothing from the network: it runs under the machine's python3 (or .venv where one exists);
# wheels carried in .whl/ (open-clip-torch and inf-cl, pure Python) are installed into /tmp/site first.
# Writes the logs, CSV and plot under $OUT if set (else bench/results). Without CUDA it says so, runs
# a CPU smoke test of the benchmark and exits 0.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
start=$(date +%s)

"$PY" -m m2kernels.info 2>&1 | tee "$out/info.txt" || true
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device_check: no CUDA GPU here: skipped the GPU correctness tests and the GPU benchmark."
  echo "device_check: CPU smoke run of the benchmark instead (B=1024, torch backend vs open_clip)."
  "$PY" -m bench.bench_clip_loss --device cpu --batch 1024 --dim 64 --reps 1 \
    --providers m2-torch m2-torch-store open_clip --csv "$out/device_check_cpu.csv" \
    --plot "$out/device_check_cpu.png" 2>&1 | tail -n 8
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== GPU correctness (tests/test_gpu.py) =="
timeout 90 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -n 12
tests_rc=${PIPESTATUS[0]}

echo "== loss benchmark: forward + backward, B in {16384, 65536, 262144}, D=1024, bf16 =="
left=$(( 235 - ($(date +%s) - start) ))
[ "$left" -lt 60 ] && left=60
timeout "$left" "$PY" -m bench.bench_clip_loss --device cuda --batch 16384 65536 262144 --dim 1024 --dtype bf16 \
  --reps 3 --warmup 1 --timeout 45 --providers m2-triton m2-triton-store m2-torch open_clip inf-cl \
  --csv "$out/device_clip_loss.csv" --plot "$out/device_clip_loss.png" 2>&1 | tee "$out/device_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "device_check: tests rc=$tests_rc, bench rc=$bench_rc, $(( $(date +%s) - start )) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

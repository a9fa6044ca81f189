#!/usr/bin/env bash
# One prepared GPU check: correctness of the Triton kernels on CUDA (fp32/bf16/fp16 against the float64
# reference), then the loss benchmark at B in {16384, 65536, 262144}, D = 1024, bf16 against the other
# providers. Installs nothing from the network. Prints a short table last; writes the full CSV, the plot
# and the logs under $OUT if set (else bench/results). On a machine without CUDA it says so, skips the
# GPU parts and exits 0.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
start=$(date +%s)

"$PY" -m m2kernels.info 2>&1 | tee "$out/info.txt" || true
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device_check: no CUDA GPU here: skipped the GPU correctness tests and the GPU benchmark."
  echo "device_check: CPU smoke run of the benchmark instead (B=1024, torch backend vs open_clip)."
  "$PY" -m bench.bench_clip_loss --device cpu --batch 1024 --dim 64 --reps 1 \
    --providers m2-torch open_clip --csv "$out/device_check_cpu.csv" --plot "$out/device_check_cpu.png" \
    2>&1 | tail -n 8
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== GPU correctness (tests/test_gpu.py) =="
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}

echo "== loss benchmark: B in {16384, 65536, 262144}, D=1024, bf16 =="
left=$(( 290 - ($(date +%s) - start) ))
[ "$left" -lt 60 ] && left=60
timeout "$left" "$PY" -m bench.bench_clip_loss --device cuda --batch 16384 65536 262144 --dim 1024 --dtype bf16 \
  --reps 5 --timeout 120 --providers m2-triton m2-torch dense open_clip inf-cl \
  --csv "$out/device_clip_loss.csv" --plot "$out/device_clip_loss.png" 2>&1 | tee "$out/device_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "device_check: tests rc=$tests_rc, bench rc=$bench_rc, $(( $(date +%s) - start )) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

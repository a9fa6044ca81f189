#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite on the CPU
# (Triton kernels run under the interpreter).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q "$@"

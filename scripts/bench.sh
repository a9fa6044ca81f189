#!/usr/bin/env bash
# Sets up the environment if needed, then runs the CPU benchmark suite (python -m bench).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
python -m bench "$@"

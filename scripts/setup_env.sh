#!/usr/bin/env bash
# Idempotent environment set-up for a fresh machine (CPU, like CI) or a CUDA one.
# Creates .venv in the repository root and installs the project with its test/train extras.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# The stamp covers the C++ sources too, so an edit of csrc/ rebuilds the extensions.
stamp=.venv/.m2-setup-$(cat setup.py constraints.txt scripts/setup_env.sh csrc/*.cpp csrc/*.h csrc/*.py | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS="${MAX_JOBS:-2}"
  pip install -q -c constraints.txt torch==2.13.0 triton==3.7.1
  # setup.py imports torch to compile csrc/ (m2kernels._C and, where NCCL and the CUDA headers are
  # found, m2kernels._C_nccl), hence --no-build-isolation and the build tools installed first.
  # nvidia-nccl-cu13 provides nccl.h and libnccl.so.2 for the NCCL-native extension (no GPU needed
  # to build it). M2_BUILD_EXT=0/1 and M2_BUILD_NCCL=0/1 skip or require the extensions.
  pip install -q -c constraints.txt "setuptools>=64" wheel ninja
  pip install -q -c constraints.txt --no-deps nvidia-nccl-cu13
  pip install -q -c constraints.txt --no-build-isolation -e ".[dev,train]"
  # Reference implementations we test and benchmark against. --no-deps: their declared
  # dependencies would pull torchvision (a CUDA build) or another torch.
  pip install -q --no-deps open-clip-torch==3.3.0 cn-clip==1.6.0 inf-cl==1.2.1
  # What open_clip and its trainer (open_clip_train) import, for m2kernels.integrations.open_clip_train
  # and its tests. torchvision's wheel is a CUDA build; beside the CPU torch it imports only with stub
  # operator schemas, which the integration registers.
  pip install -q -c constraints.txt --no-deps torchvision==0.28.0 ftfy==6.3.1 wcwidth==0.9.4 \
    regex==2026.11.19 pandas==3.1.1
  rm -f .venv/.m2-setup-*
  touch "$stamp"
fi

"""Test configuration: Triton kernels run under the CPU interpreter unless a CUDA GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined or launched.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))

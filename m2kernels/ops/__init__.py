"""One module per op: Triton kernels, their launchers, the torch fallback and the autograd glue."""

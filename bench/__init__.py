"""Benchmarks against the implementations users have today (open_clip, Inf-CL, dense PyTorch)."""

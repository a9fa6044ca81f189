"""Shared benchmark plumbing: timing with quantiles, peak memory, CSV rows, environment."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    reps: int,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
) -> dict:
    """Median and 20/80% quantiles in milliseconds of ``fn`` (``setup`` runs untimed before each call)."""
    for _ in range(warmup):
        state = setup() if setup else None
        fn() if state is None else fn(state)
        sync(device)
    times = []
    for _ in range(reps):
        state = setup() if setup else None
        sync(device)
        t0 = time.perf_counter()
        fn() if state is None else fn(state)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, max(0, round(p * (len(times) - 1))))]
    return {"median_ms": statistics.median(times), "q20_ms": q(0.2), "q80_ms": q(0.8), "reps": reps}


class PeakMemory:
    """Peak memory above the level at ``__enter__``, in bytes.

    CUDA: the caching allocator's peak statistics. CPU: the process's resident-set high-water mark
    (VmHWM), reset on entry through /proc/self/clear_refs; run each measurement in a fresh process so
    that memory freed earlier and kept by malloc does not hide new allocations.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = max(0, _proc_status("VmHWM") - self.base)
        return False


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def append_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(rows[0].keys())
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:  # schema changed: start a new file beside the old one
            path = path.replace(".csv", f"-{_dt.datetime.now():%Y%m%d%H%M%S}.csv")
            new = True
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def fmt_bytes(n) -> str:
    if n is None or n != n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def small_first_call(step, tensors, rows: int = 16) -> None:
    """Run ``step`` once on the first ``rows`` rows of ``tensors`` (fresh leaves): one-time costs are not
    a loss's memory (the first call of a torch.library custom op imports ~80 MiB of modules, e.g.
    sympy), so they happen before the peak-memory measurement, for every provider alike."""
    step([(t[:rows] if t.dim() else t).detach().clone().requires_grad_(t.is_floating_point())
          for t in tensors])


def failed(rows: list[dict]) -> bool:
    """Whether a measurement crashed: a skip by the memory model, a time-out or running out of memory is
    a result, not a failure."""
    def benign(e: str) -> bool:
        return e.startswith(("skipped", "not run", "timed out", "killed")) or "out of memory" in e.lower()

    return any("error" in r and not benign(r["error"]) for r in rows)

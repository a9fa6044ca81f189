"""Data-pipeline benchmark: images per second of the DALI path against the Pillow path, on the same
webdataset shards, through ``m2model.data.ImageTextLoader``.

    python -m bench.bench_data [--quick] [--images 768] [--size 224] [--workers 2] [--device cpu|cuda]

Writes JPEG files (photograph-like noise plus shapes, ``--source-size`` pixels) as webdataset shards,
indexes them once, then reads epochs of training batches (random resized crop to ``--size``, scale
0.8-1.0, horizontal flip, normalisation; ``--eval``: resize only) with each backend, alternating
backends epoch by epoch so that both see the same machine load. ``--workers`` is DALI's thread count and
the number of Pillow DataLoader worker processes. DALI decodes on the CPU here, and with ``mixed`` (nvJPEG,
the batches on the GPU) with ``--device cuda``. Reports the median images/s over ``--epochs`` epochs after
one warm-up epoch each, and the ratio of the medians, as CSV rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from bench.common import RESULTS_DIR, append_csv, environment


def write_shards(root: str, n: int, size: tuple[int, int], seed: int = 0) -> str:
    """``n`` JPEGs as shards of 256 samples; returns the shard pattern."""
    from PIL import Image, ImageDraw

    from m2model.data.make_shards import shards_from_jsonl

    rng = np.random.default_rng(seed)
    w, h = size
    os.makedirs(os.path.join(root, "img"))
    rows = []
    for i in range(n):
        base = rng.integers(0, 255, size=(h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            draw.ellipse([x0, y0, x0 + 40, y0 + 40], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        name = f"img/{i:05d}.jpg"
        img.save(os.path.join(root, name), quality=90)
        rows.append({"image": name, "caption": [f"picture number {i}", f"第{i}张图片"]})
    jsonl = os.path.join(root, "data.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    shards_from_jsonl(jsonl, os.path.join(root, "shards"), prefix="bench", samples_per_shard=256)
    return os.path.join(root, "shards", "bench-*.tar")


def _tokenizer(captions):
    n = len(captions)
    return torch.zeros(n, 8, dtype=torch.long), torch.ones(n, 8, dtype=torch.long)


def _cpu_seconds() -> float:
    """CPU time of this process (DALI's threads included) and of its finished children (DataLoader
    workers end with their epoch): a measure of the work per image that other jobs on the machine do not
    distort, unlike wall time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _epoch(loader, device) -> tuple[float, float]:
    """(images per second, CPU milliseconds per image) of one epoch (for CUDA batches, until they are on
    the device)."""
    n, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
    for batch in loader:
        images = batch.images
        if device.type == "cuda" and images.device.type != "cuda":
            images = images.to(device, non_blocking=True)
        n += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loader.close_stream()  # the workers end here, so that their CPU time is counted
    return n / (time.perf_counter() - t0), (_cpu_seconds() - c0) / n * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="DALI vs Pillow data-pipeline throughput on the same shards.")
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--source-size", type=int, nargs=2, default=[400, 300])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per backend (after one warm-up)")
    p.add_argument("--workers", type=int, default=2, help="DALI threads = Pillow worker processes")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--eval", action="store_true", help="evaluation transform instead of augmentation")
    p.add_argument("--quick", action="store_true", help="256 images, 2 timed epochs")
    p.add_argument("--csv", default=os.path.join(RESULTS_DIR, "data.csv"))
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.epochs = 256, 2
    from m2model.data import ImageTextLoader, build_index, dali_available

    device = torch.device(args.device)
    env = environment(device)  # before the next line, so that it names the machine's threads
    torch.set_num_threads(1)  # the decoders use their own threads and processes
    backends = ["pillow"] + (["dali"] if dali_available() else [])
    if "dali" not in backends:
        print("nvidia-dali is not installed: Pillow only")
    with tempfile.TemporaryDirectory() as root:
        index = build_index(shards=write_shards(root, args.images, tuple(args.source_size)))
        loaders = {b: ImageTextLoader(index, _tokenizer, args.size, args.batch, train=not args.eval,
                                      backend=b, device=args.device, workers=args.workers, seed=0)
                   for b in backends}
        rates: dict[str, list[float]] = {b: [] for b in backends}
        cpu_ms: dict[str, list[float]] = {b: [] for b in backends}
        for b in backends:
            _epoch(loaders[b], device)  # warm-up: worker start, pipeline build, page cache
        for _ in range(args.epochs):
            for b in backends:  # alternating: both backends see the same load
                rate, ms = _epoch(loaders[b], device)
                rates[b].append(rate)
                cpu_ms[b].append(ms)
        skipped = {b: loaders[b].counts().skipped for b in backends}
        for loader in loaders.values():
            loader.close()
    rows = []
    for b in backends:
        rows.append({
            "backend": b, "images_per_s": statistics.median(rates[b]), "min": min(rates[b]),
            "max": max(rates[b]), "cpu_ms_per_image": statistics.median(cpu_ms[b]), "epochs": len(rates[b]),
            "skipped": skipped[b], "workers": args.workers,
            "images": args.images, "size": args.size,
            "source": f"{args.source_size[0]}x{args.source_size[1]}",
            "transform": "eval" if args.eval else "train", "device_kind": args.device,
            "env_device": env["device"], "env_torch": env["torch"], "env_date": env["date"],
        })
    print(f"\n{env['device']} | {args.images} JPEGs {args.source_size[0]}x{args.source_size[1]} in shards "
          f"-> {args.size}, {'eval' if args.eval else 'train'} transform, batch {args.batch}, "
          f"{args.workers} DALI threads / Pillow workers, {args.device}")
    print(f"{'backend':>8} {'images/s (median)':>18} {'min-max':>16} {'CPU ms/image':>13} {'skipped':>8}")
    for r in rows:
        print(f"{r['backend']:>8} {r['images_per_s']:>18.0f} {r['min']:>7.0f}-{r['max']:<8.0f} "
              f"{r['cpu_ms_per_image']:>13.2f} {r['skipped']:>8}")
    if len(rows) == 2:
        print(f"DALI / Pillow: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x images/s, "
              f"{rows[0]['cpu_ms_per_image'] / rows[1]['cpu_ms_per_image']:.2f}x less CPU per image")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

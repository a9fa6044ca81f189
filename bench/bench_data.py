"""Data-pipeline benchmark: images per second of the DALI decoder against the Pillow path.

    python -m bench.bench_data [--quick] [--images 512] [--size 224] [--source-size 400 300]

Writes a set of real JPEG files (random photographs-like noise plus shapes, ``--source-size`` pixels)
with a jsonl file, then runs ``m2model.data.ImageTextLoader`` over them with ``backend="dali"`` and
``backend="pillow"`` and the same training augmentation (random resized crop to ``--size`` with scale
0.8-1.0, horizontal flip, normalisation) or the evaluation transform (``--eval``). DALI runs its CPU
pipeline here (``device="cpu"``) and the ``mixed`` GPU decoder with ``--device cuda``. Reports median
images/s over several epochs (the first epoch, which builds the pipeline, is a warm-up), as CSV rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from bench.common import RESULTS_DIR, append_csv, environment


def write_dataset(root: str, n: int, size: tuple[int, int], seed: int = 0) -> str:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    rows = []
    w, h = size
    for i in range(n):
        base = rng.integers(0, 255, size=(h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            draw.ellipse([x0, y0, x0 + 40, y0 + 40], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        name = f"img_{i:05d}.jpg"
        img.save(os.path.join(root, name), quality=90)
        rows.append({"image": name, "caption": [f"picture number {i}", f"第{i}张图片"]})
    path = os.path.join(root, "data.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def run_backend(records, backend: str, args) -> dict:
    from m2model.data import ImageTextLoader

    def tokenizer(captions):
        n = len(captions)
        return torch.zeros(n, 8, dtype=torch.long), torch.ones(n, 8, dtype=torch.long)

    loader = ImageTextLoader(
        records,
        tokenizer,
        image_size=args.size,
        batch_size=args.batch,
        train=not args.eval,
        backend=backend,
        device=args.device,
        num_threads=args.threads,
        seed=0,
    )
    rates = []
    for epoch in range(args.epochs + 1):
        n, t0 = 0, time.perf_counter()
        for batch in loader:  # one epoch
            n += batch.images.shape[0]
        dt = time.perf_counter() - t0
        if epoch > 0:  # epoch 0 builds the pipeline: warm-up
            rates.append(n / dt)
    return {
        "backend": backend,
        "images_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "epochs": len(rates),
        "skipped": sum(loader.stats.values()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="DALI vs Pillow decoding throughput.")
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--source-size", type=int, nargs=2, default=[400, 300])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="DALI worker threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--eval", action="store_true", help="evaluation transform instead of training augmentation"
    )
    p.add_argument("--quick", action="store_true", help="128 images, 2 epochs")
    p.add_argument("--csv", default=os.path.join(RESULTS_DIR, "data.csv"))
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.epochs = 128, 2
    torch.set_num_threads(2)
    from m2model.data import dali_available, load_jsonl

    env = environment(torch.device(args.device))
    backends = ["pillow"] + (["dali"] if dali_available() else [])
    if "dali" not in backends:
        print("nvidia-dali is not installed: Pillow only")
    with tempfile.TemporaryDirectory() as root:
        jsonl = write_dataset(root, args.images, tuple(args.source_size))
        records = load_jsonl(jsonl, root)
        rows = []
        for backend in backends:
            r = run_backend(records, backend, args)
            r.update(
                images=args.images,
                size=args.size,
                source=f"{args.source_size[0]}x{args.source_size[1]}",
                transform="eval" if args.eval else "train",
                device_kind=args.device,
                env_device=env["device"],
                env_torch=env["torch"],
                env_date=env["date"],
            )
            rows.append(r)
    print(
        f"\n{env['device']} | {args.images} JPEGs {args.source_size[0]}x{args.source_size[1]} "
        f"-> {args.size}, "
        f"{'eval' if args.eval else 'train'} transform, batch {args.batch}"
    )
    print(f"{'backend':>8} {'images/s (median)':>18} {'min-max':>16} {'skipped':>8}")
    for r in rows:
        print(
            f"{r['backend']:>8} {r['images_per_s']:>18.0f} {r['min']:>7.0f}-{r['max']:<8.0f} "
            f"{r['skipped']:>8}"
        )
    if len(rows) == 2:
        print(f"DALI / Pillow: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x")
    append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

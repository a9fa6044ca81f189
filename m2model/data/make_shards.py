"""Write webdataset tar shards from a jsonl file and an image folder.

    python -m m2model.data.make_shards --jsonl train.jsonl --image-root images/ --out shards/ \
        --prefix train --samples-per-shard 1000

Each sample becomes ``NNNNNNNNN.<ext>`` (the image bytes unchanged), ``NNNNNNNNN.txt`` (captions, one a
line) and ``NNNNNNNNN.json`` (``{"caption": [...], "image": original path}``). Missing images and
records without captions are skipped and counted. Shards are written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

from .records import DataStats, load_jsonl


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def write_shards(jsonl: str, out_dir: str, image_root: str | None = None, prefix: str = "shard",
                 samples_per_shard: int = 1000) -> tuple[list[str], DataStats]:
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    records = load_jsonl(jsonl, image_root)
    os.makedirs(out_dir, exist_ok=True)
    stats, paths = DataStats(), []
    tf, tmp, count, key = None, None, 0, 0

    def close():
        nonlocal tf
        if tf is not None:
            tf.close()
            os.replace(tmp, paths[-1])
            tf = None

    for rec in records:
        if not rec.captions:
            stats["empty_caption"] += 1
            continue
        try:
            data = rec.read_bytes()
        except OSError:
            stats["missing"] += 1
            continue
        if tf is None or count == samples_per_shard:
            close()
            paths.append(os.path.join(out_dir, f"{prefix}-{len(paths):06d}.tar"))
            tmp = paths[-1] + ".tmp"
            tf = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
            count = 0
        ext = os.path.splitext(rec.path)[1].lstrip(".").lower() or "jpg"
        name = f"{key:09d}"
        _add(tf, f"{name}.{ext}", data)
        _add(tf, f"{name}.txt", "\n".join(rec.captions).encode("utf-8"))
        _add(tf, f"{name}.json", json.dumps({"caption": list(rec.captions), "image": rec.key},
                                            ensure_ascii=False).encode("utf-8"))
        count += 1
        key += 1
    close()
    stats["written"] = key
    return paths, stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m m2model.data.make_shards",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--jsonl", required=True, help='jsonl with {"image": rel_path, "caption": [...]} lines')
    ap.add_argument("--image-root", default=None,
                    help="folder the image paths are relative to (default: the jsonl's)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--prefix", default="shard")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    args = ap.parse_args(argv)
    paths, stats = write_shards(args.jsonl, args.out, args.image_root, args.prefix, args.samples_per_shard)
    print(f"wrote {stats['written']} samples into {len(paths)} shards under {args.out} "
          f"(skipped: missing={stats['missing']}, empty_caption={stats['empty_caption']})")


if __name__ == "__main__":
    main()

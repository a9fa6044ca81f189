"""Write webdataset tar shards from a jsonl file and an image folder.

    python -m m2model.data.make_shards --jsonl train.jsonl --image-root images/ --out shards/ \
        --prefix train --samples-per-shard 1000

Each sample becomes ``NNNNNNNNN.<ext>`` (the image bytes unchanged), ``NNNNNNNNN.txt`` (captions, one a
line) and ``NNNNNNNNN.json`` (``{"caption": [...], "image": original path}``), written with
``webdataset.ShardWriter``. Missing images and records without captions are skipped and counted; a jsonl
line that cannot be read is an error naming it. Shards are written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import os

from .records import DataStats, read_jsonl
from .shards import write_shards


def shards_from_jsonl(jsonl: str, out_dir: str, image_root: str | None = None, prefix: str = "shard",
                      samples_per_shard: int = 1000) -> tuple[list[str], DataStats]:
    """(shard paths, counts: ``written``, ``missing``, ``empty_caption``)."""
    records = read_jsonl(jsonl, image_root, strict=True)
    os.makedirs(out_dir, exist_ok=True)
    stats = DataStats()
    pattern = os.path.join(out_dir, prefix.replace("%", "%%") + "-%06d.tar")
    paths = write_shards(records, pattern, samples_per_shard, stats)
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
    try:
        paths, stats = shards_from_jsonl(args.jsonl, args.out, args.image_root, args.prefix,
                                         args.samples_per_shard)
    except (OSError, ValueError) as e:
        raise SystemExit(f"make_shards: {e}") from None
    print(f"wrote {stats['written']} samples into {len(paths)} shards under {args.out} "
          f"(skipped: missing={stats['missing']}, empty_caption={stats['empty_caption']})")


if __name__ == "__main__":
    main()

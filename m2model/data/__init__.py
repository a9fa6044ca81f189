"""Image-text data: jsonl and webdataset records, DALI/Pillow decoding, the training loader, shard writer."""

from .dali import DaliDecoder, dali_available
from .loader import Batch, ImageTextLoader, load_eval_set, resolve_backend
from .records import DataStats, Record, expand_shard_pattern, load_jsonl, probe_header, scan_shards
from .transforms import pil_decode_transform, random_resized_crop_params

__all__ = [
    "Batch", "DaliDecoder", "DataStats", "ImageTextLoader", "Record", "dali_available",
    "expand_shard_pattern",
    "load_eval_set", "load_jsonl", "pil_decode_transform", "probe_header", "random_resized_crop_params",
    "resolve_backend", "scan_shards", "load_records",
]


def load_records(jsonl: str | None = None, shards=None, image_root: str | None = None):
    """Records from a jsonl file and/or webdataset shards; returns (records, index-time stats)."""
    records, stats = [], DataStats()
    if jsonl:
        records.extend(load_jsonl(jsonl, image_root))
    if shards:
        index = scan_shards(expand_shard_pattern(shards))
        records.extend(index.records)
        stats.update(index.stats)
    if not jsonl and not shards:
        raise ValueError("no data source: give a jsonl file or webdataset shards")
    return records, stats

"""Image-text data: one record index (jsonl files, image folders, webdataset shards) and one sample path
(decode, transform, tokenise) for training and evaluation, decoded by DALI's webdataset reader or by
Pillow in DataLoader workers.

Layers, lowest first: ``decode`` / ``transforms`` (pixels), ``records`` / ``shards`` (sources),
``index`` (checked records), ``stream`` (the per-epoch, per-rank plan), ``pillow_reader`` /
``dali_reader`` (decoding paths), ``loader`` (batches).
"""

from .dali_reader import dali_available
from .decode import BadSample, decode_transform, probe_image, to_rgb
from .index import DatasetIndex, build_index, check_records
from .loader import Batch, ImageTextLoader, eval_batches, resolve_backend
from .records import DataStats, Record, read_image_folder, read_jsonl
from .shards import expand_shard_pattern, scan_shards, write_shards
from .transforms import normalize_uint8, random_resized_crop_params, sample_params

__all__ = [
    "BadSample", "Batch", "DataStats", "DatasetIndex", "ImageTextLoader", "Record", "build_index",
    "check_records", "dali_available", "decode_transform", "eval_batches", "expand_shard_pattern",
    "normalize_uint8", "probe_image", "random_resized_crop_params", "read_image_folder", "read_jsonl",
    "resolve_backend", "sample_params", "scan_shards", "to_rgb", "write_shards",
]

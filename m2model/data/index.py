"""The record index of a dataset: records from jsonl files and/or webdataset shards, each checked once.

The check reads only an image's first and last bytes: the header (format, mode, size) and, for JPEG and
PNG, the end marker. Samples that fail it are skipped and counted here, before any decoder sees them,
so the DALI reader (which aborts on a bad file) and the Pillow path start from the same usable records
and report the same counts. What only a full decode finds (damaged pixel data) is counted when it happens,
as ``corrupt``, by the same rule on both paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from .decode import CONVERTED_MODES, BadSample, probe_image
from .records import DataStats, Problems, Record, read_jsonl
from .shards import ShardIndex, expand_shard_pattern, scan_shard

_HEAD = 1 << 16  # enough for the header of nearly every image; the whole file is read when it is not
_TAIL = 4096


@dataclass
class DatasetIndex:
    records: list[Record]  # usable records (checked, with header information)
    stats: DataStats = field(default_factory=DataStats)  # what indexing skipped or converted
    problems: Problems = field(default_factory=Problems)  # where (first few locations)


def _read_head_tail(rec: Record) -> tuple[bytes, bytes, bool]:
    """(head, tail, whole) of a record's image bytes."""
    with open(rec.path, "rb") as f:
        start = max(rec.offset, 0)
        size = rec.size if rec.in_shard else os.fstat(f.fileno()).st_size
        f.seek(start)
        if size <= _HEAD + _TAIL:
            data = f.read(size)
            if len(data) != size:
                raise EOFError(rec.where())
            return data, data, True
        head = f.read(_HEAD)
        f.seek(start + size - _TAIL)
        tail = f.read(_TAIL)
    if len(tail) != _TAIL:
        raise EOFError(rec.where())
    return head, tail, False


def check_record(rec: Record, need_text: bool = True) -> Record:
    """The record with its header information; raises :class:`BadSample` naming why it is unusable
    (``need_text``: a record without caption or label is, too)."""
    if need_text and not rec.captions and rec.label is None:
        raise BadSample("empty_caption", "no non-empty caption")
    try:
        head, tail, whole = _read_head_tail(rec)
    except FileNotFoundError:
        raise BadSample("missing", "no such file") from None
    except EOFError:
        raise BadSample("truncated", "shard member cut short") from None
    except OSError as e:
        raise BadSample("missing", f"cannot read ({e.strerror or e})") from None
    try:
        fmt, mode, w, h = probe_image(head, tail)
    except BadSample:
        if whole:
            raise
        fmt, mode, w, h = probe_image(rec.read_bytes())  # a header longer than the first bytes
    return replace(rec, format=fmt, mode=mode, width=w, height=h)


def check_records(records: Sequence[Record], stats: DataStats, problems: Problems, threads: int = 4,
                  strict: bool = False, positions: list[int] | None = None, need_text: bool = True
                  ) -> list[Record]:
    """The usable records, in order; the others counted in ``stats`` (or, ``strict``, a ValueError
    naming the first one). Conversions the decoders will apply are counted too (``grayscale``, ...).
    ``positions``, when given, receives the position in ``records`` of each usable one."""

    def one(rec):
        try:
            return check_record(rec, need_text)
        except BadSample as e:
            return e

    if threads > 1 and len(records) > 64:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(one, records, chunksize=64))
    else:
        results = [one(r) for r in records]
    good = []
    for i, (rec, res) in enumerate(zip(records, results)):
        if isinstance(res, BadSample):
            if strict:
                raise ValueError(f"{rec.where()}: {res}")
            stats[res.reason] += 1
            problems.add(f"{rec.where()}: {res}")
            continue
        if res.mode in CONVERTED_MODES:
            stats[CONVERTED_MODES[res.mode]] += 1
        good.append(res)
        if positions is not None:
            positions.append(i)
    return good


def build_index(jsonl: str | None = None, shards=None, image_root: str | None = None, *,
                threads: int = 4) -> DatasetIndex:
    """Records of a training set: a jsonl file and/or webdataset shards (a brace pattern, a glob, or a
    list of them). Unreadable jsonl lines and unusable samples are skipped and counted.

    A source that yields nothing is a ValueError that names it and says why (a pattern matching no file,
    shards that are all missing or cut, every sample skipped).
    """
    if not jsonl and not shards:
        raise ValueError("no data source: give a jsonl file or webdataset shards")
    stats, problems, raw = DataStats(), Problems(), []
    if jsonl:
        raw.extend(read_jsonl(jsonl, image_root, strict=False, stats=stats, problems=problems))
    if shards:
        paths = expand_shard_pattern(shards)
        if not paths:
            raise ValueError(f"train_shards {shards!r} matches no file")
        shard_index = ShardIndex(stats=stats, problems=problems)
        for path in paths:
            scan_shard(path, shard_index)
        if not shard_index.records:
            raise ValueError(f"train_shards {shards!r}: none of its {len(paths)} shard(s) holds a sample "
                             f"({stats.summary()}): {problems.summary()}")
        raw.extend(shard_index.records)
    records = check_records(raw, stats, problems, threads)
    if not records:
        named = (("train_jsonl", jsonl), ("train_shards", shards))
        source = " and ".join(f"{k} {v!r}" for k, v in named if v)
        raise ValueError(f"{source}: no usable sample among {len(raw)} ({stats.summary()}); first problems: "
                         f"{problems.summary()}")
    return DatasetIndex(records, stats, problems)

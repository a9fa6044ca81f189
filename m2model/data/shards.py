"""webdataset tar shards: patterns, indexing (byte ranges, no image decoded), writing, and the index
files DALI's ``fn.readers.webdataset`` reads.

A sample is the group of members sharing a key (the member path up to the first dot of its base name, the
webdataset convention): an image (``jpg``, ``png``, ...) and captions in ``json`` (``{"caption": str |
[str, ...]}``, also ``captions`` / ``text``) and/or ``txt`` (one caption a line).

A shard cut short keeps its complete samples: the cut is counted as ``truncated_shard`` and a sample
whose members are not all there as ``incomplete_sample``. The scan compares its position with the file
size, so a cut inside a member header (which Python's tarfile takes for the end of the archive) or
bytes after the last member that are not the end-of-archive blocks count as a cut too.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .records import IMAGE_EXTENSIONS, DataStats, Problems, Record, clean_captions

TEXT_EXTENSIONS = ("json", "txt")
_BLOCK = 512


def expand_shard_pattern(spec: str | Iterable[str]) -> list[str]:
    """``dir/train-{000000..000009}.tar`` (brace ranges, as webdataset), globs, or lists of them."""
    import braceexpand

    if not isinstance(spec, str):
        return [p for s in spec for p in expand_shard_pattern(s)]
    out = []
    for s in braceexpand.braceexpand(spec):
        if any(ch in s for ch in "*?["):
            out.extend(sorted(glob.glob(s)))
        else:
            out.append(s)
    return out


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the base name."""
    dirname, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(dirname, stem), ext.lower()


def _captions_from_text(ext: str, data: bytes) -> tuple[str, ...]:
    text = data.decode("utf-8", errors="replace")
    if ext == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return ()
        if isinstance(obj, dict):
            obj = obj.get("caption", obj.get("captions", obj.get("text")))
        try:
            return clean_captions(obj)
        except TypeError:
            return ()
    return clean_captions(text.splitlines())


@dataclass
class ShardIndex:
    records: list[Record] = field(default_factory=list)
    stats: DataStats = field(default_factory=DataStats)
    problems: Problems = field(default_factory=Problems)


def _tail_is_end_of_archive(f, start: int, file_size: int) -> bool:
    """Whether the bytes from ``start`` on are the end-of-archive zero blocks (and zero padding)."""
    if file_size - start < _BLOCK:
        return False
    f.seek(start)
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False


def scan_shard(path: str, index: ShardIndex) -> None:
    """Add the samples of one shard to ``index`` (see the module docstring for what is counted)."""
    if not os.path.exists(path):
        index.stats["missing_shard"] += 1
        index.problems.add(f"{path}: no such shard")
        return
    file_size = os.path.getsize(path)
    groups: dict[str, dict[str, tuple]] = {}
    cut = None
    try:
        tf = tarfile.open(path, "r:")
    except tarfile.ReadError as e:
        index.stats["unreadable_shard"] += 1
        index.problems.add(f"{path}: not an uncompressed tar archive ({e})")
        return
    with tf:
        while True:
            try:
                member = tf.next()
            except (tarfile.ReadError, EOFError, OSError) as e:
                cut = f"unreadable member header at byte {tf.offset} ({e})"
                break
            if member is None:
                break
            if member.offset_data + member.size > file_size:
                cut = f"member {member.name} cut at byte {file_size}"
                key, _ = split_key(member.name)
                groups.setdefault(key, {})["_incomplete"] = ()
                break
            if not member.isfile():
                continue
            key, ext = split_key(member.name)
            if not os.path.basename(key) or os.path.basename(member.name).startswith("."):
                continue  # hidden files are not samples (DALI's and webdataset's rule)
            parts = groups.setdefault(key, {})
            if ext in TEXT_EXTENSIONS:
                fobj = tf.extractfile(member)
                parts[ext] = (fobj.read() if fobj is not None else b"",)
            elif ext in IMAGE_EXTENSIONS:
                parts[ext] = (member.offset_data, member.size)
        if cut is None and not _tail_is_end_of_archive(tf.fileobj, tf.offset, file_size):
            cut = (f"{file_size - tf.offset} bytes after the last complete member at byte {tf.offset} are "
                   "not the end-of-archive blocks (cut inside a member header?)")
    if cut is not None:
        index.stats["truncated_shard"] += 1
        index.problems.add(f"{path}: {cut}")
    base = os.path.basename(path)
    for key, parts in groups.items():
        img_ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
        if "_incomplete" in parts or img_ext is None:
            index.stats["incomplete_sample"] += 1
            continue
        caps: tuple[str, ...] = ()
        for text_ext in TEXT_EXTENSIONS:
            if text_ext in parts:
                caps = _captions_from_text(text_ext, parts[text_ext][0])
                if caps:
                    break
        offset, size = parts[img_ext]
        index.records.append(Record(key=f"{base}/{key}", path=path, captions=caps, offset=offset, size=size))


def scan_shards(paths: Sequence[str] | str) -> ShardIndex:
    """Index webdataset tar shards without decoding images (tar headers and caption members only)."""
    if isinstance(paths, str):
        paths = [paths]
    index = ShardIndex()
    for path in paths:
        scan_shard(path, index)
    return index


# ------------------------------------------------------------------------------------------- writing
def write_shards(records: Sequence[Record], pattern: str, samples_per_shard: int = 1000,
                 stats: DataStats | None = None) -> list[str]:
    """Write records as webdataset shards with ``webdataset.ShardWriter``; ``pattern`` has one ``%d``
    style field (``out/train-%06d.tar``). Each sample: ``NNNNNNNNN.<ext>`` (the image bytes unchanged),
    ``.txt`` (captions, one a line) and ``.json`` (``{"caption": [...], "image": original key}``).

    Records without captions, or whose image cannot be read, are skipped and counted in ``stats``. Each
    shard is written under a temporary name and renamed when complete; member times are 0, so the same
    input gives the same bytes.
    """
    import webdataset as wds

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    stats = stats if stats is not None else DataStats()
    written: list[str] = []
    open_files: dict[str, io.BufferedWriter] = {}

    def opener(fname: str):
        open_files[fname] = open(fname + ".tmp", "wb")
        return open_files[fname]

    def finished(fname: str) -> None:
        f = open_files.pop(fname)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(fname + ".tmp", fname)
        written.append(fname)

    count = 0
    writer = None
    try:
        for rec in records:
            if not rec.captions:
                stats["empty_caption"] += 1
                continue
            try:
                data = rec.read_bytes()
            except OSError:
                stats["missing"] += 1
                continue
            if writer is None:  # ShardWriter opens its first shard at once: not before a sample exists
                writer = wds.ShardWriter(pattern, maxcount=samples_per_shard, maxsize=float("inf"),
                                         opener=opener, post=finished, verbose=0, encoder=False, mtime=0,
                                         mode=0o644, user="", group="")
            ext = os.path.splitext(rec.key)[1].lstrip(".").lower() or "jpg"
            meta = json.dumps({"caption": list(rec.captions), "image": rec.key}, ensure_ascii=False)
            writer.write({"__key__": f"{count:09d}", ext: data, "txt": "\n".join(rec.captions).encode(),
                          "json": meta.encode()})
            count += 1
    finally:
        if writer is not None:
            writer.close()
        for fname, f in open_files.items():  # an exception left a shard half-written: drop it
            f.close()
            os.remove(fname + ".tmp")
    stats["written"] = count
    return written


# ------------------------------------------------------------------------------- DALI's index files
def write_dali_index(path: str, members: Sequence[tuple[int, int]], ext: str = "img") -> None:
    """A ``fn.readers.webdataset`` index (format v1.1): one line per sample, its image member's data
    offset and size. DALI reads the samples in the order of the lines, which is how the loader makes it
    read exactly the samples (and the order) it planned."""
    lines = [f"v1.1 {len(members)}"] + [f"{ext} {offset} {size}" for offset, size in members]
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")

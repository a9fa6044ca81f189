"""Image-text records: the official jsonl format and webdataset tar shards, indexed for random access.

A record names where its image bytes live (a file, or a byte range inside a tar shard) and carries its
captions. Indexing is cheap (no image is decoded); every check that needs the bytes runs when a sample is
loaded, so the per-epoch counts in :class:`DataStats` say what each epoch skipped.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
TEXT_EXTENSIONS = ("json", "txt")

# Counter names. Skipped samples: missing, empty_caption, corrupt, truncated, unsupported.
# Informational (decoded after conversion): cmyk, grayscale, alpha, palette.
# Index-time: truncated_shard, incomplete_sample.
SKIP_REASONS = ("missing", "empty_caption", "corrupt", "truncated", "unsupported")


class DataStats(Counter):
    """Named counts of skipped or converted samples (a Counter with a readable summary)."""

    def summary(self) -> str:
        if not self:
            return "no bad samples"
        return ", ".join(f"{k}={v}" for k, v in sorted(self.items()))

    @property
    def skipped(self) -> int:
        return sum(self[k] for k in SKIP_REASONS)


@dataclass(frozen=True)
class Record:
    """One image-text pair. ``path`` is an image file, or a tar shard when ``offset`` is set."""

    key: str
    path: str
    captions: tuple[str, ...]
    offset: int = -1
    size: int = -1

    def read_bytes(self) -> bytes:
        """The encoded image; raises FileNotFoundError (missing) or EOFError (short read from a shard)."""
        if self.offset < 0:
            with open(self.path, "rb") as f:
                return f.read()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise EOFError(f"{self.path}: member {self.key} is cut short ({len(data)} of {self.size} bytes)")
        return data


def clean_captions(captions) -> tuple[str, ...]:
    """Accept a string or a list of strings; drop empty and whitespace-only entries."""
    if captions is None:
        return ()
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)):
        raise TypeError(f"caption must be a string or a list of strings, got {type(captions).__name__}")
    return tuple(c.strip() for c in captions if isinstance(c, str) and c.strip())


def load_jsonl(path: str, image_root: str | None = None) -> list[Record]:
    """Read the official evaluation format: one ``{"image": rel_path, "caption": [..]}`` object a line.

    ``image_root`` defaults to the jsonl's folder. Records keep empty caption lists (they are skipped and
    counted when loaded); a line that is not a JSON object with an ``image`` key is a ValueError naming it.
    """
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                raise ValueError(f'{path}:{lineno}: expected an object with an "image" path string')
            caps = obj.get("caption", obj.get("captions"))
            try:
                caps = clean_captions(caps)
            except TypeError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            records.append(Record(key=obj["image"], path=os.path.join(root, obj["image"]), captions=caps))
    return records


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the base name."""
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


def scan_shards(paths: Sequence[str] | str) -> ShardIndex:
    """Index webdataset tar shards (``KEY.jpg`` + ``KEY.txt``/``KEY.json``) without decoding images.

    A truncated shard keeps the samples whose members are complete; the cut is counted as
    ``truncated_shard`` and every partial sample as ``incomplete_sample``. A missing shard is counted as
    ``missing_shard``.
    """
    if isinstance(paths, str):
        paths = [paths]
    index = ShardIndex()
    for path in paths:
        if not os.path.exists(path):
            index.stats["missing_shard"] += 1
            continue
        file_size = os.path.getsize(path)
        groups: dict[str, dict[str, tuple]] = {}
        order: list[str] = []
        cut = False
        try:
            with tarfile.open(path, "r:") as tf:
                while True:
                    try:
                        member = tf.next()
                    except (tarfile.ReadError, EOFError, OSError):
                        cut = True
                        break
                    if member is None:
                        break
                    if not member.isfile():
                        continue
                    key, ext = _split_key(member.name)
                    if member.offset_data + member.size > file_size:
                        cut = True
                        groups.setdefault(key, {})["_incomplete"] = ()
                        if key not in order:
                            order.append(key)
                        break
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    if ext in TEXT_EXTENSIONS:
                        fobj = tf.extractfile(member)
                        groups[key][ext] = (fobj.read() if fobj is not None else b"",)
                    else:
                        groups[key][ext] = (member.offset_data, member.size)
        except tarfile.ReadError:
            cut = True  # not even a first header
        if cut:
            index.stats["truncated_shard"] += 1
        for key in order:
            parts = groups[key]
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
            index.records.append(Record(key=f"{os.path.basename(path)}/{key}", path=path, captions=caps,
                                        offset=offset, size=size))
    return index


def expand_shard_pattern(spec: str | Iterable[str]) -> list[str]:
    """Expand ``dir/train-{000000..000009}.tar`` (brace ranges, as webdataset), globs, or lists."""
    import glob

    if not isinstance(spec, str):
        return [p for s in spec for p in expand_shard_pattern(s)]
    try:
        import braceexpand

        specs = list(braceexpand.braceexpand(spec))
    except ImportError:
        specs = [spec]
    out = []
    for s in specs:
        if any(ch in s for ch in "*?["):
            out.extend(sorted(glob.glob(s)))
        else:
            out.append(s)
    return out


def probe_header(data: bytes) -> tuple[str | None, str, tuple[int, int]]:
    """Parse only the image header with Pillow: (format, mode, (width, height)).

    Returns (None, reason, (0, 0)) when the bytes are not a readable image, where reason is ``corrupt``
    or ``truncated``; JPEG and PNG files must end with their end marker (EOI / IEND), which catches
    truncation without decoding.
    """
    from PIL import Image

    if not data:
        return None, "truncated", (0, 0)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, size = im.format, im.mode, im.size
    except Exception:  # Pillow raises many types for bad headers
        return None, "corrupt", (0, 0)
    if fmt == "JPEG" and data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) < 0:
        return None, "truncated", (0, 0)
    if fmt == "PNG" and data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
        return None, "truncated", (0, 0)
    if size[0] < 1 or size[1] < 1:
        return None, "corrupt", (0, 0)
    return fmt, mode, size

"""Image-text records and the readers of their sources: jsonl files and image folders.

A record names where its image bytes live (a file, or a byte range inside a webdataset shard, see
``shards.py``) and carries its captions and/or label; once checked (``index.py``) it also carries the
image's format, mode and size from its header.

jsonl lines that cannot be read are either an error naming the file and line (``strict=True``, what
evaluation wants: a wrong benchmark file must not be scored) or skipped and counted as ``bad_line`` with
the first few locations kept for a message (``strict=False``, training).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

# Counter names. Skipped samples (the rest of the sample is unusable):
SKIP_REASONS = ("missing", "empty_caption", "corrupt", "truncated", "bad_line", "incomplete_sample")
# Whole shards found unusable while indexing (their complete samples, if any, are kept):
SHARD_REASONS = ("missing_shard", "truncated_shard", "unreadable_shard")
# Informational (decoded after conversion): cmyk, grayscale, high_bit_depth, alpha, palette.

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "jp2", "ppm", "pgm", "pbm")
_MAX_PROBLEMS = 10  # locations kept for messages; the counts are always complete


class DataStats(Counter):
    """Named counts of skipped or converted samples (a Counter with a readable summary)."""

    def summary(self) -> str:
        if not self:
            return "no bad samples"
        return ", ".join(f"{k}={v}" for k, v in sorted(self.items()))

    @property
    def skipped(self) -> int:
        return sum(self[k] for k in SKIP_REASONS)


class Problems(list):
    """The first few "file:line: reason" messages of skipped input (the counts are in DataStats)."""

    total = 0

    def add(self, message: str) -> None:
        self.total += 1
        if len(self) < _MAX_PROBLEMS:
            self.append(message)

    def summary(self) -> str:
        more = f" (and {self.total - len(self)} more)" if self.total > len(self) else ""
        return "; ".join(self) + more


@dataclass(frozen=True, slots=True)
class Record:
    """One sample. ``path`` is an image file, or a tar shard when ``offset`` >= 0."""

    key: str
    path: str
    captions: tuple[str, ...] = ()
    offset: int = -1
    size: int = -1
    label: int | str | None = None
    # from the image header, filled in by the index check
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0

    @property
    def in_shard(self) -> bool:
        return self.offset >= 0

    def read_bytes(self) -> bytes:
        """The encoded image; FileNotFoundError (missing) or EOFError (a shard member cut short)."""
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise EOFError(f"{self.path}: member {self.key} is cut short ({len(data)} of {self.size} bytes)")
        return data

    def where(self) -> str:
        return f"{self.path} ({self.key})" if self.in_shard else self.path


def text_lines(path: str, what: str):
    """(line number, text without its line end or None, why it is not UTF-8 or None) for each line of a
    text file (a byte-order mark dropped); FileNotFoundError naming the file as a ``what`` file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what} file") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as e:
                yield lineno, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"


def clean_captions(captions, strip: bool = True) -> tuple[str, ...]:
    """Accept a string or a list of strings; drop empty and whitespace-only entries, strip the rest
    (``strip=False``: keep every entry exactly as written)."""
    if captions is None:
        return ()
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)):
        raise TypeError(f"caption must be a string or a list of strings, got {type(captions).__name__}")
    if not all(isinstance(c, str) for c in captions):
        raise TypeError("caption must be a string or a list of strings")
    if not strip:
        return tuple(captions)
    return tuple(c.strip() for c in captions if c.strip())


def read_jsonl(path: str, image_root: str | None = None, *, strict: bool = True,
               require_caption: bool = False, require_label: bool = False, stats: DataStats | None = None,
               problems: Problems | None = None, strip_captions: bool = True,
               label_names: list[str] | None = None) -> list[Record]:
    """Records of a jsonl file, one ``{"image": rel_path, "caption": str | [str, ...]}`` object a line
    (``captions`` is accepted too, and an optional ``label``: int or class name).

    ``image_root`` defaults to the jsonl's folder. A line that is not UTF-8, not JSON, or not such an
    object is a ValueError naming ``path:line`` when ``strict``, else skipped and counted as ``bad_line``
    in ``stats`` (with the message in ``problems``). ``require_caption`` / ``require_label`` make a line
    without a non-empty caption / without a label bad as well; otherwise records keep empty caption lists,
    which the index check counts as ``empty_caption``. ``strip_captions=False`` keeps captions exactly as
    written (a benchmark scored by its own script's rules). With ``label_names``, a label must be one of
    those names (replaced by its index) or an index into them, checked line by line like the rest.
    """
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    stats = stats if stats is not None else DataStats()
    problems = problems if problems is not None else Problems()
    records = []
    name_index = {c: i for i, c in enumerate(label_names or [])}

    def bad(lineno: int, why: str) -> None:
        message = f"{path}:{lineno}: {why}"
        if strict:
            raise ValueError(message)
        stats["bad_line"] += 1
        problems.add(message)

    for lineno, text, problem in text_lines(path, "jsonl"):
        if problem:
            bad(lineno, problem)
            continue
        line = text.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad(lineno, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"]:
            bad(lineno, 'expected an object with an "image" path string')
            continue
        try:
            caps = clean_captions(obj.get("caption", obj.get("captions")), strip_captions)
        except TypeError as e:
            bad(lineno, str(e))
            continue
        if require_caption and not any(c.strip() for c in caps):
            bad(lineno, '"caption" must hold at least one non-empty string')
            continue
        label = obj.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
            bad(lineno, f'"label" must be an int or a class name, got {label!r}')
            continue
        if require_label and label is None:
            bad(lineno, 'expected a "label" (int or class name)')
            continue
        if label_names is not None and label is not None:
            if isinstance(label, str):
                if label not in name_index:
                    bad(lineno, f'"label" {label!r} is not one of the {len(label_names)} class names')
                    continue
                label = name_index[label]
            elif not 0 <= label < len(label_names):
                bad(lineno, f'"label" {label} is outside [0, {len(label_names)}) (the class names)')
                continue
        records.append(Record(key=obj["image"], path=os.path.join(root, obj["image"]), captions=caps,
                              label=label))
    return records


def read_image_folder(root: str) -> tuple[list[Record], list[str]]:
    """An image-classification folder: one sub-folder per class, sorted names = label order (the layout
    torchvision's ImageFolder reads). Returns (records with int labels, class folder names)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders")
    records = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for fname in sorted(os.listdir(folder)):
            ext = fname.rsplit(".", 1)[-1].lower() if "." in fname else ""
            if ext in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, fname)):
                records.append(Record(key=f"{name}/{fname}", path=os.path.join(folder, fname), label=label))
    return records, classes

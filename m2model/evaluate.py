"""Zero-shot evaluation of an M2-Encoder: image-text retrieval and image classification.

Python API::

    from m2model.evaluate import (load_retrieval_jsonl, evaluate_retrieval, zero_shot_classifier,
                                  zero_shot_accuracy, imagenet_classnames, imagenet_templates)

Command line::

    python -m m2model.evaluate retrieval --data test.jsonl --image-root DIR --checkpoint CKPT
        [--tokenizer sp.model] [--config 0.4B] [--protocol official|m2model] [--ties pessimistic]
        [--batch-size 64] [--device cuda] [--precision bf16]
    python -m m2model.evaluate classify --data VAL_DIR_OR_JSONL --classes imagenet-zh --checkpoint CKPT ...

Checkpoints: official ones (size read from the tensors), trainer checkpoints or run folders (the model
and tokenizer of their saved training config), or bare state dicts (``--config``). The tokenizer's
vocabulary must match the model's. Retrieval is scored by the official protocol unless ``--protocol
m2model`` (see ``m2model.metrics``); the result names the protocol.

Images and captions go through the record index and the sample path that training uses
(``m2model.data``): jsonl lines read by the same parser (a line that cannot be read is an error naming
the file and line), images decoded with Pillow in DataLoader workers, converted to RGB by the same rules,
resized to ``image_size`` x ``image_size`` (bicubic, no crop, as the official ``square_transform``) and
normalised with mean = std = 0.5.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, load_model, tokenizer_for
from .data import (
    DataStats,
    Record,
    decode_transform,
    eval_batches,
    probe_image,
    read_image_folder,
    read_jsonl,
)
from .data.decode import BadSample
from .data.records import text_lines
from .data.transforms import normalize_uint8
from .metrics import PROTOCOLS, TIE_MODES, official_retrieval_metrics, retrieval_metrics, topk_accuracy
from .progress import progress_bar
from .tokenizers import Tokenizer, require_vocab_match

__all__ = [
    "load_image",
    "preprocess_caption",
    "RetrievalData",
    "load_retrieval_jsonl",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "describe_protocol",
    "load_classification_data",
    "zero_shot_classifier",
    "zero_shot_accuracy",
    "imagenet_classnames",
    "imagenet_templates",
    "load_model",
    "load_checkpoint",
    "tokenizer_for",
    "main",
]


# --------------------------------------------------------------------------- images


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """[3, S, S] float tensor in [-1, 1] (the evaluation transform); ValueError naming the file when it
    cannot be decoded."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        _, _, w, h = probe_image(data)
        arr = decode_transform(data, image_size, (0, 0, w, h), False)
    except BadSample as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None
    return normalize_uint8(torch.from_numpy(arr)[None])[0]


def _as_records(images) -> list[Record]:
    return [r if isinstance(r, Record) else Record(key=str(r), path=str(r)) for r in images]


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device.type, dtype=dtype)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(
    model,
    images: Sequence[Record | str | os.PathLike],
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    skip_bad: bool = False,
    progress: bool = True,
):
    """(embeddings [N_ok, E] float32 on CPU, boolean [N] mask of the images that decoded). ``images``:
    records or file paths. An undecodable image is a ValueError naming it, or with ``skip_bad`` left out."""
    if len(images) == 0:
        raise ValueError("no images to encode")
    records = _as_records(images)
    device = _device_of(model)
    feats, ok = [], torch.zeros(len(records), dtype=torch.bool)
    bar = progress_bar(len(records), desc="images", unit="img", disable=not progress)
    batches = eval_batches(records, model.cfg.image_size, batch_size, workers=num_workers, skip_bad=skip_bad,
                           stats=DataStats())
    for x, idx in batches:
        with _autocast(device, precision):
            feats.append(model.encode_image(x.to(device)).float().cpu())
        ok[idx] = True
        bar.update(len(idx))
    bar.close()
    if not ok.any():
        raise ValueError("none of the images could be decoded")
    return torch.cat(feats), ok


@torch.no_grad()
def encode_texts(
    model,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 256,
    precision: str = "fp32",
    progress: bool = True,
) -> torch.Tensor:
    """[N, E] float32 embeddings on CPU."""
    if len(texts) == 0:
        raise ValueError("no texts to encode")
    require_vocab_match(tokenizer, model.cfg.vocab_size)
    device = _device_of(model)
    out = []
    bar = progress_bar(len(texts), desc="texts", unit="text", disable=not progress)
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenizer(list(texts[start : start + batch_size]), context_length=model.cfg.max_text_len)
        with _autocast(device, precision):
            out.append(model.encode_text(ids.to(device), mask.to(device)).float().cpu())
        bar.update(len(ids))
    bar.close()
    return torch.cat(out)


# --------------------------------------------------------------------------- retrieval


def preprocess_caption(text: str) -> str:
    """The official evaluation's caption normalisation: lower case, curly double quotes -> '"'."""
    return text.lower().replace("\u201c", '"').replace("\u201d", '"')


@dataclass
class RetrievalData:
    records: list[Record]  # one per jsonl line (path resolved against the image root), with its captions
    texts: list[str]  # all captions, in file order
    text_image: list[int]  # index of the record each caption belongs to
    protocol: str = "official"  # how the file was read and is scored (m2model.metrics.PROTOCOLS)

    @property
    def images(self) -> list[str]:
        return [r.path for r in self.records]

    def relevance(self) -> torch.Tensor:
        """[I, T] bool: caption j describes image i, or has the same text as a caption of image i (the
        ``m2model`` protocol: every copy of a repeated caption is a right answer)."""
        rel = torch.zeros(len(self.records), len(self.texts), dtype=torch.bool)
        by_text: dict[str, list[int]] = {}
        for t, i in zip(self.texts, self.text_image):
            by_text.setdefault(t, []).append(i)
        for j, t in enumerate(self.texts):
            rel[by_text[t], j] = True
        return rel

    def official_relevance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([I, T] image->text, [T, I] text->image) relevance as the official ``get_data`` builds it:
        captions and images are keyed by their strings, and a key's index is its last occurrence. So for
        image->text only the last copy of a repeated caption is credited, and a line that repeats an
        image path has the captions of all its lines, while for text->image only its last line counts."""
        keys = [r.key for r in self.records]
        last_text = {t: j for j, t in enumerate(self.texts)}
        last_image = {k: i for i, k in enumerate(keys)}
        captions_of: dict[str, list[str]] = {}
        images_of: dict[str, list[str]] = {}
        for t, i in zip(self.texts, self.text_image):
            captions_of.setdefault(keys[i], []).append(t)
            images_of.setdefault(t, []).append(keys[i])
        i2t = torch.zeros(len(keys), len(self.texts), dtype=torch.bool)
        t2i = torch.zeros(len(self.texts), len(keys), dtype=torch.bool)
        for i, k in enumerate(keys):
            i2t[i, [last_text[t] for t in captions_of.get(k, [])]] = True
        for j, t in enumerate(self.texts):
            t2i[j, [last_image[k] for k in images_of[t]]] = True
        return i2t, t2i

    def subset(self, keep: torch.Tensor) -> RetrievalData:
        """The images where ``keep`` [I] is True, with their captions (as if the others were not in the
        file)."""
        new_index = torch.cumsum(keep.long(), 0) - 1
        pairs = [(t, int(new_index[i])) for t, i in zip(self.texts, self.text_image) if keep[i]]
        return RetrievalData([r for r, k in zip(self.records, keep.tolist()) if k], [t for t, _ in pairs],
                             [i for _, i in pairs], self.protocol)


def load_retrieval_jsonl(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, preprocess: bool = True,
    protocol: str = "official",
) -> RetrievalData:
    """Read the official format: one JSON object per line, ``{"image": "rel/path.jpg", "caption": [...]}``,
    with the parser training uses (strict: a line that is not UTF-8, not JSON, or without an image and a
    non-empty caption is a ValueError naming ``file:line``). ``protocol="official"`` keeps every caption as
    written (the official script neither strips nor drops any, and a trailing space is a token of the GLM
    tokenizer); ``"m2model"`` strips them and drops blank ones, as training does. ``preprocess``: the
    official lower-casing and quote normalisation (:func:`preprocess_caption`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    records = read_jsonl(str(path), None if image_root is None else str(image_root), strict=True,
                         require_caption=True, strip_captions=protocol != "official")
    if not records:
        raise ValueError(f"{path} holds no samples")
    texts, text_image = [], []
    for i, rec in enumerate(records):
        for c in rec.captions:
            texts.append(preprocess_caption(c) if preprocess else c)
            text_image.append(i)
    return RetrievalData(records, texts, text_image, protocol)


def describe_protocol(protocol: str, ties: str = "pessimistic") -> dict[str, str]:
    """The entries that name how a retrieval result was scored (printed with every result)."""
    if protocol == "official":
        return {"protocol": "official", "duplicate_captions": "image->text credits the last copy only",
                "ties": "numpy argsort order"}
    return {"protocol": "m2model", "duplicate_captions": "every copy credited", "ties": ties}


def evaluate_retrieval(
    model,
    tokenizer: Tokenizer,
    data: RetrievalData,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    ties: str | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
    protocol: str | None = None,
) -> dict:
    """R@1/5/10 both ways and MR (percent), scored by ``protocol`` (default: the one ``data`` was read
    for; see :mod:`m2model.metrics`), named in the result's ``protocol`` entry. ``ties`` applies to the
    ``m2model`` protocol only (default ``pessimistic``). With ``skip_bad_images`` undecodable images are
    dropped together with their captions and counted in ``skipped_images``; otherwise they raise
    ValueError."""
    protocol = protocol or data.protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "official" and ties is not None:
        raise ValueError("ties applies to the m2model protocol; the official one ranks by numpy's argsort")
    ties = ties or "pessimistic"
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
    model.eval()
    img, ok = encode_images(model, data.records, batch_size, num_workers, precision, skip_bad_images,
                            progress)
    kept = data if ok.all() else data.subset(ok)
    # each distinct caption encoded once: copies of a caption get exactly the same embedding (and score)
    unique = list(dict.fromkeys(kept.texts))
    where = {t: j for j, t in enumerate(unique)}
    txt = encode_texts(model, tokenizer, unique, batch_size, precision, progress)
    txt = txt[torch.tensor([where[t] for t in kept.texts])]
    if protocol == "official":
        out = official_retrieval_metrics(img, txt, *kept.official_relevance())
    else:
        out = retrieval_metrics(img, txt, kept.relevance(), ties=ties)
    out["skipped_images"] = int((~ok).sum())
    out.update(describe_protocol(protocol, ties))
    return out


# --------------------------------------------------------------------------- zero-shot classification


def _load_module_from_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _open_clip_metadata():
    spec = importlib.util.find_spec(
        "open_clip"
    )  # the package __init__ needs torchvision: load the file alone
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "English ImageNet class names come from open-clip-torch: pip install --no-deps open-clip-torch"
        )
    return _load_module_from_file(
        "_open_clip_zero_shot_metadata",
        Path(list(spec.submodule_search_locations)[0]) / "zero_shot_metadata.py",
    )


def _cn_clip_metadata():
    try:
        return importlib.import_module("cn_clip.eval.imagenet_zeroshot_templates")
    except ImportError as e:
        raise ImportError(
            "Chinese ImageNet class names come from cn-clip: pip install --no-deps cn-clip"
        ) from e


def imagenet_classnames(lang: str = "en") -> list[str]:
    """The 1000 ImageNet class names in English (open_clip) or Chinese (Chinese-CLIP), in label order."""
    if lang == "en":
        return list(_open_clip_metadata().IMAGENET_CLASSNAMES)
    if lang in ("zh", "cn"):
        return list(_cn_clip_metadata().imagenet_classnames)
    raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")


def imagenet_templates(lang: str = "en", simple: bool = False) -> list[Callable[[str], str]]:
    """CLIP's 80 ImageNet prompt templates (``simple``: open_clip's 7) in English, or the Chinese ones."""
    if lang == "en":
        meta = _open_clip_metadata()
        return list(meta.SIMPLE_IMAGENET_TEMPLATES if simple else meta.OPENAI_IMAGENET_TEMPLATES)
    if lang in ("zh", "cn"):
        return list(_cn_clip_metadata().openai_imagenet_template)
    raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")


def _as_template(t) -> Callable[[str], str]:
    if callable(t):
        return t
    if isinstance(t, str) and "{}" in t:
        return lambda c, t=t: t.replace("{}", c)
    if isinstance(t, str) and "{c}" in t:
        return lambda c, t=t: t.replace("{c}", c)
    raise ValueError(f"template {t!r} is neither a callable nor a string containing '{{}}' or '{{c}}'")


@torch.no_grad()
def zero_shot_classifier(
    model,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence,
    batch_size: int = 256,
    precision: str = "fp32",
    progress: bool = True,
) -> torch.Tensor:
    """[embed_dim, num_classes] weights (open_clip convention): per class, the normalised mean of the
    normalised embeddings of all its prompts. Templates: callables, or strings with ``{}`` / ``{c}``.

    The prompts of all classes are encoded together, ``batch_size`` at a time (a batch spans classes),
    and summed per class as they come, so memory holds one batch and the class sums, not every prompt's
    embedding (1000 classes x 80 templates = 80,000 prompts for ImageNet)."""
    if len(classnames) == 0 or len(templates) == 0:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    require_vocab_match(tokenizer, model.cfg.vocab_size)
    fns = [_as_template(t) for t in templates]
    n_prompts = len(classnames) * len(fns)
    sums = torch.zeros(len(classnames), model.cfg.embed_dim)
    bar = progress_bar(n_prompts, desc="class prompts", unit="text", disable=not progress)
    for start in range(0, n_prompts, batch_size):
        idx = range(start, min(start + batch_size, n_prompts))
        prompts = [fns[i % len(fns)](classnames[i // len(fns)]) for i in idx]
        emb = encode_texts(model, tokenizer, prompts, batch_size, precision, progress=False)
        sums.index_add_(0, torch.tensor([i // len(fns) for i in idx]), emb)
        bar.update(len(prompts))
    bar.close()
    return F.normalize(sums / len(fns), dim=-1).T.contiguous()


@torch.no_grad()
def zero_shot_accuracy(
    model,
    classifier: torch.Tensor,
    batches: Iterable,
    ks=(1, 5),
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, float]:
    """Top-k accuracy (percent) over ``batches`` of (images [N, 3, S, S], labels [N])."""
    device = _device_of(model)
    logits, labels = [], []
    bar = progress_bar(None, desc="classify", unit="batch", disable=not progress)
    for images, y in batches:
        bar.update(1)
        with _autocast(device, precision):
            feats = model.encode_image(images.to(device)).float()
        logits.append((feats @ classifier.to(device).float()).cpu())
        labels.append(torch.as_tensor(y).long().cpu())
    bar.close()
    if not logits:
        raise ValueError("no images to classify")
    ks = tuple(k for k in ks if k <= classifier.shape[1])
    out = topk_accuracy(torch.cat(logits), torch.cat(labels), ks)
    out["num_images"] = sum(len(y) for y in labels)
    return out


def load_classification_data(data: str | os.PathLike, classnames: Sequence[str] | None = None):
    """(records, labels): a folder with one sub-folder per class (sorted order = label order, as
    torchvision's ImageFolder), or a jsonl of ``{"image": path, "label": int or class name}`` (strict:
    a bad line is a ValueError naming ``file:line``)."""
    data = str(data)
    if os.path.isdir(data):
        records, classes = read_image_folder(data)
        if classnames is not None and len(classes) != len(classnames):
            raise ValueError(
                f"{data} has {len(classes)} class folders but {len(classnames)} class names were given"
            )
    else:
        # labels checked against the class names line by line, so an error names the line
        records = read_jsonl(data, strict=True, require_label=True,
                             label_names=None if classnames is None else list(classnames))
        named = [r for r in records if isinstance(r.label, str)]
        if named:  # only without class names
            raise ValueError(f"{data}: image {named[0].key}: the class name {named[0].label!r} needs the "
                             f"list of class names")
    if not records:
        raise ValueError(f"no images found in {data}")
    return records, torch.tensor([r.label for r in records])


# --------------------------------------------------------------------------- model loading and CLI


def _read_lines(path: str, what: str) -> list[str]:
    """The non-blank lines of a class-name or template file; ValueError naming ``file:line`` for a line
    that is not UTF-8, and the file when it holds none."""
    out = []
    for lineno, line, problem in text_lines(path, what):
        if problem:
            raise ValueError(f"{path}:{lineno}: {problem}")
        if line.strip():
            out.append((lineno, line))
    if not out:
        raise ValueError(f"{path}: no {what} in the file")
    return out


def _class_names(spec: str) -> tuple[list[str], str | None, str]:
    """(class names, language of the built-in list or None, description for the result)."""
    if spec in ("imagenet-en", "imagenet-zh"):
        lang = spec.split("-")[1]
        source = "open_clip IMAGENET_CLASSNAMES" if lang == "en" else "cn_clip imagenet_classnames"
        return imagenet_classnames(lang), lang, f"{spec} ({source})"
    lines = _read_lines(spec, "class-name")
    names = [line.strip() for _, line in lines]
    seen: dict[str, int] = {}
    for (lineno, _), name in zip(lines, names):
        if name in seen:
            raise ValueError(f"{spec}:{lineno}: class name {name!r} repeats line {seen[name]}")
        seen[name] = lineno
    return names, None, spec


def _templates(spec: str):
    """(templates, description for the result)."""
    if spec in ("imagenet-en", "imagenet-zh", "simple-en"):
        lang, simple = spec.split("-")[1], spec == "simple-en"
        templates = imagenet_templates(lang, simple=simple)
        if lang == "zh":
            source = "cn_clip openai_imagenet_template"
        else:
            source = "open_clip " + ("SIMPLE_IMAGENET_TEMPLATES" if simple else "OPENAI_IMAGENET_TEMPLATES")
        return templates, f"{spec} ({source}, {len(templates)} templates)"
    templates = []
    for lineno, line in _read_lines(spec, "template"):
        if "{}" not in line and "{c}" not in line:
            raise ValueError(f"{spec}:{lineno}: template {line!r} has no '{{}}' or '{{c}}' for the class "
                             f"name")
        templates.append(line)
    return templates, f"{spec} ({len(templates)} templates)"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m m2model.evaluate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    for name in ("retrieval", "classify"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True)
        s.add_argument("--checkpoint", required=True,
                       help="an official checkpoint, a trainer checkpoint or run folder, or a state dict")
        s.add_argument("--config", default=None,
                       help="size name (tiny, 0.4B, 1B, 10B, ...); needed for bare state dicts only")
        s.add_argument(
            "--tokenizer",
            default=None,
            help="'bert-base-chinese', a vocab.txt, or the official sp.model (default: a trainer "
            "checkpoint's own, else bert-base-chinese; official checkpoints need sp.model)",
        )
        s.add_argument("--batch-size", type=int, default=64)
        s.add_argument("--num-workers", type=int, default=0)
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
        s.add_argument("--output", default=None, help="write the metrics as JSON here")
        s.add_argument("--no-progress", action="store_true")
    r = sub.choices["retrieval"]
    r.add_argument("--image-root", default=None, help="directory the jsonl image paths are relative to")
    r.add_argument("--protocol", default="official", choices=PROTOCOLS,
                   help="official (default): as the official eval_retrieval.py, image->text credits only the "
                   "last copy of a repeated caption; m2model: every copy credited, ties by --ties")
    r.add_argument("--ties", default=None, choices=TIE_MODES,
                   help="--protocol m2model only (default pessimistic)")
    r.add_argument("--skip-bad-images", action="store_true")
    r.add_argument("--no-preprocess", action="store_true", help="keep captions as written (no lower-casing)")
    c = sub.choices["classify"]
    c.add_argument(
        "--classes", default="imagenet-en", help="imagenet-en, imagenet-zh, or a file (one per line)"
    )
    c.add_argument(
        "--templates",
        default=None,
        help="imagenet-en, imagenet-zh, simple-en, or a file of templates with {} (default: by --classes)",
    )
    args = p.parse_args(argv)

    if args.task == "retrieval" and args.protocol == "official" and args.ties is not None:
        p.error("--ties applies to --protocol m2model; the official protocol ranks by numpy's argsort")
    loaded = load_checkpoint(args.checkpoint, args.config, args.device)
    model, tokenizer = loaded.model, tokenizer_for(loaded, args.tokenizer)
    progress = not args.no_progress
    if args.task == "retrieval":
        data = load_retrieval_jsonl(args.data, args.image_root, preprocess=not args.no_preprocess,
                                    protocol=args.protocol)
        out = evaluate_retrieval(model, tokenizer, data, args.batch_size, args.num_workers, args.precision,
                                 args.ties, args.skip_bad_images, progress)
    else:
        classnames, lang, classes_used = _class_names(args.classes)
        templates, templates_used = _templates(args.templates or f"imagenet-{lang or 'en'}")
        # the data are read (and their labels checked) before the long text encoding
        records, labels = load_classification_data(args.data, classnames)
        classifier = zero_shot_classifier(
            model, tokenizer, classnames, templates, args.batch_size * 4, args.precision, progress
        )
        images = eval_batches(records, model.cfg.image_size, args.batch_size, workers=args.num_workers)
        batches = ((x, labels[idx]) for x, idx in images)
        out = zero_shot_accuracy(model, classifier, batches, precision=args.precision, progress=progress)
        out["classes"], out["templates"] = classes_used, templates_used
    print(json.dumps(out, indent=2, ensure_ascii=False))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()

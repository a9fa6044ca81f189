"""Zero-shot evaluation of an M2-Encoder: image-text retrieval and image classification.

Python API::

    from m2model.evaluate import (load_retrieval_jsonl, evaluate_retrieval, zero_shot_classifier,
                                  zero_shot_accuracy, imagenet_classnames, imagenet_templates)

Command line::

    python -m m2model.evaluate retrieval --data test.jsonl --image-root DIR --checkpoint CKPT [--config 0.4B]
        [--tokenizer sp.model] [--batch-size 64] [--device cuda] [--precision bf16] [--ties pessimistic]
    python -m m2model.evaluate classify --data VAL_DIR_OR_JSONL --classes imagenet-zh --checkpoint CKPT ...

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

from .checkpoint import load_model
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
from .data.transforms import normalize_uint8
from .metrics import TIE_MODES, retrieval_metrics, topk_accuracy
from .progress import progress_bar
from .tokenizers import Tokenizer, get_tokenizer

__all__ = [
    "load_image",
    "preprocess_caption",
    "RetrievalData",
    "load_retrieval_jsonl",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "zero_shot_classifier",
    "zero_shot_accuracy",
    "imagenet_classnames",
    "imagenet_templates",
    "load_model",
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
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model only {model.cfg.vocab_size}: "
            f"wrong tokenizer for this checkpoint?"
        )
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
    records: list[Record]  # one per image (path resolved against the image root), with its captions
    texts: list[str]  # all captions, in file order
    text_image: list[int]  # index of the image each caption belongs to

    @property
    def images(self) -> list[str]:
        return [r.path for r in self.records]

    def relevance(self) -> torch.Tensor:
        """[I, T] bool: caption j describes image i, or has the same text as a caption of image i."""
        rel = torch.zeros(len(self.records), len(self.texts), dtype=torch.bool)
        by_text: dict[str, list[int]] = {}
        for t, i in zip(self.texts, self.text_image):
            by_text.setdefault(t, []).append(i)
        for j, t in enumerate(self.texts):
            rel[by_text[t], j] = True
        return rel


def load_retrieval_jsonl(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, preprocess: bool = True
) -> RetrievalData:
    """Read the official format: one JSON object per line, ``{"image": "rel/path.jpg", "caption": [...]}``,
    with the parser training uses (strict: a line that is not UTF-8, not JSON, or without an image and a
    non-empty caption is a ValueError naming ``file:line``)."""
    records = read_jsonl(str(path), None if image_root is None else str(image_root), strict=True,
                         require_caption=True)
    if not records:
        raise ValueError(f"{path} holds no samples")
    texts, text_image = [], []
    for i, rec in enumerate(records):
        for c in rec.captions:
            texts.append(preprocess_caption(c) if preprocess else c)
            text_image.append(i)
    return RetrievalData(records, texts, text_image)


def evaluate_retrieval(
    model,
    tokenizer: Tokenizer,
    data: RetrievalData,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    ties: str = "pessimistic",
    skip_bad_images: bool = False,
    progress: bool = True,
) -> dict:
    """R@1/5/10 both ways and MR (percent). With ``skip_bad_images`` undecodable images are dropped together
    with their captions and counted in ``skipped_images``; otherwise they raise ValueError."""
    model.eval()
    img, ok = encode_images(model, data.records, batch_size, num_workers, precision, skip_bad_images,
                            progress)
    keep_text = ok[torch.tensor(data.text_image)]
    texts = [t for t, k in zip(data.texts, keep_text.tolist()) if k]
    txt = encode_texts(model, tokenizer, texts, batch_size, precision, progress)
    rel = data.relevance()[ok][:, keep_text]
    out = retrieval_metrics(img, txt, rel, ties=ties)
    out["skipped_images"] = int((~ok).sum())
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
    normalised embeddings of all its prompts. Templates: callables, or strings with ``{}`` / ``{c}``."""
    if len(classnames) == 0 or len(templates) == 0:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    fns = [_as_template(t) for t in templates]
    prompts = [fn(c) for c in classnames for fn in fns]
    emb = encode_texts(model, tokenizer, prompts, batch_size, precision, progress)
    emb = F.normalize(emb.view(len(classnames), len(fns), -1).mean(1), dim=-1)
    return emb.T.contiguous()


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
        index = {c: i for i, c in enumerate(classnames or [])}
        records = read_jsonl(data, strict=True, require_label=True)
        labelled = []
        for rec in records:
            label = rec.label
            if isinstance(label, str):
                if label not in index:
                    raise ValueError(f"{data}: image {rec.key}: unknown class name {label!r}")
                label = index[label]
            if classnames is not None and not 0 <= label < len(classnames):
                raise ValueError(f"{data}: image {rec.key}: label {label} outside [0, {len(classnames)})")
            labelled.append(Record(key=rec.key, path=rec.path, label=label))
        records = labelled
    if not records:
        raise ValueError(f"no images found in {data}")
    return records, torch.tensor([r.label for r in records])


# --------------------------------------------------------------------------- model loading and CLI


def _read_lines(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m m2model.evaluate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    for name in ("retrieval", "classify"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True)
        s.add_argument("--checkpoint", required=True)
        s.add_argument("--config", default=None, help="size name (tiny, 0.4B, 1B, 10B, ...)")
        s.add_argument(
            "--tokenizer",
            default="bert-base-chinese",
            help="'bert-base-chinese', a vocab.txt, or the official sp.model",
        )
        s.add_argument("--batch-size", type=int, default=64)
        s.add_argument("--num-workers", type=int, default=0)
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
        s.add_argument("--output", default=None, help="write the metrics as JSON here")
        s.add_argument("--no-progress", action="store_true")
    r = sub.choices["retrieval"]
    r.add_argument("--image-root", default=None, help="directory the jsonl image paths are relative to")
    r.add_argument("--ties", default="pessimistic", choices=TIE_MODES)
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

    model = load_model(args.checkpoint, args.config, args.device)
    tokenizer = get_tokenizer(args.tokenizer, context_length=model.cfg.max_text_len)
    progress = not args.no_progress
    if args.task == "retrieval":
        data = load_retrieval_jsonl(args.data, args.image_root, preprocess=not args.no_preprocess)
        out = evaluate_retrieval(
            model,
            tokenizer,
            data,
            args.batch_size,
            args.num_workers,
            args.precision,
            args.ties,
            args.skip_bad_images,
            progress,
        )
    else:
        if args.classes in ("imagenet-en", "imagenet-zh"):
            lang = args.classes.split("-")[1]
            classnames = imagenet_classnames(lang)
        else:
            classnames, lang = _read_lines(args.classes), None
        tpl = args.templates or (f"imagenet-{lang}" if lang else "imagenet-en")
        if tpl in ("imagenet-en", "imagenet-zh", "simple-en"):
            templates = imagenet_templates(tpl.split("-")[1], simple=tpl == "simple-en")
        else:
            templates = _read_lines(tpl)
        classifier = zero_shot_classifier(
            model, tokenizer, classnames, templates, args.batch_size * 4, args.precision, progress
        )
        records, labels = load_classification_data(args.data, classnames)
        images = eval_batches(records, model.cfg.image_size, args.batch_size, workers=args.num_workers)
        batches = ((x, labels[idx]) for x, idx in images)
        out = zero_shot_accuracy(model, classifier, batches, precision=args.precision, progress=progress)
    print(json.dumps(out, indent=2, ensure_ascii=False))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()

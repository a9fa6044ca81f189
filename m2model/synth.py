"""A seeded, bilingual (English + Chinese) image-text dataset of rendered shapes.

    python -m m2model.synth --out DIR [--train 4000 --val 400 --size 64 --seed 0]

Each image is one coloured shape (circle, ring, bar, cross) of one of five colours, small or
large, near the centre, on a light background of one of five named colours with a gradient and noise,
written as a real JPEG file. Captions describe it in both languages ("a large red circle on a pink
background" / "粉色背景上的一个大的红色圆形"). The output folder holds:

* ``images/{train,val}/NNNNNN.jpg``
* ``train.jsonl``, ``val.jsonl``: ``{"image", "caption": [en, zh, short en, short zh], "label",
  "caption_en", "caption_zh"}`` (the official format plus extra keys; the short captions leave out the
  size and/or the background), ``val_en.jsonl`` / ``val_zh.jsonl`` (the full caption in one language);
* ``shards/train-NNNNNN.tar``, ``shards/val-NNNNNN.tar``: the same samples as webdataset shards;
* ``classes.json``: colour x shape class names and prompt templates in both languages, for zero-shot
  classification.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

COLOURS = [  # (English, Chinese, RGB)
    ("red", "红色", (215, 35, 35)),
    ("green", "绿色", (35, 160, 50)),
    ("blue", "蓝色", (35, 70, 215)),
    ("yellow", "黄色", (235, 200, 20)),
    ("purple", "紫色", (135, 45, 175)),
]
# Shapes that differ in which parts of the image they cover (filled or hollow, wide or crossed), so a
# tiny ViT with 8 x 8 patches separates them in a few hundred CPU steps; squares, triangles and stars
# of the same size need many more (measured: 31-52% top-1 after 600-800 steps).
SHAPES = [("circle", "圆形"), ("ring", "圆环"), ("bar", "横条"), ("cross", "十字")]
SIZES = [("small", "小的"), ("large", "大的")]
# light backgrounds, named in the captions (English, Chinese, RGB); no name shares a word with a shape colour
BACKGROUNDS = [("white", "白色", (242, 242, 238)), ("gray", "灰色", (190, 190, 190)),
               ("pink", "粉色", (245, 196, 214)), ("beige", "米色", (232, 218, 186)),
               ("cyan", "青色", (190, 238, 238))]

TEMPLATES_EN = ["a photo of a {}.", "a {}.", "a picture of a {}.", "an image showing a {}."]
TEMPLATES_ZH = ["一张{}的照片。", "一个{}。", "{}的图片。", "一幅画着{}的图像。"]

CAPTION_EN = ["a {size} {colour} {shape} on a {bg} background",
              "on a {bg} background there is a {size} {colour} {shape}",
              "a {colour} {shape}, {size}, {bg} background"]
CAPTION_ZH = ["{bg}背景上的一个{size}{colour}{shape}", "{bg}背景上有一个{size}{colour}{shape}",
              "一个{size}{colour}{shape}，{bg}背景"]


def class_names() -> tuple[list[str], list[str]]:
    en = [f"{c[0]} {s[0]}" for c in COLOURS for s in SHAPES]
    zh = [f"{c[1]}{s[1]}" for c in COLOURS for s in SHAPES]
    return en, zh


def _rect(cx: float, cy: float, half_w: float, half_h: float, rot: float):
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c)
            for x, y in ((-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h))]


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, rot: float, rgb) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=rgb, width=max(2, int(round(r * 0.32))))
    elif shape == "bar":
        draw.polygon(_rect(cx, cy, r * 1.15, r * 0.32, rot), fill=rgb)
    elif shape == "cross":
        draw.polygon(_rect(cx, cy, r, r * 0.28, rot), fill=rgb)
        draw.polygon(_rect(cx, cy, r * 0.28, r, rot), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(rng: np.random.Generator, size: int = 64):
    """One image and its description: (PIL image, label, en caption, zh caption, short en, short zh)."""
    from PIL import Image, ImageDraw

    ci, si = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
    zi, bi = int(rng.integers(2)), int(rng.integers(len(BACKGROUNDS)))
    # light background of the named colour: a gradient plus noise
    c0 = np.array(BACKGROUNDS[bi][2], dtype=np.float64) + rng.integers(-8, 9, 3)
    c1 = c0 + rng.integers(-25, 26)
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    bg = (c0 * (1 - t) + c1 * t)[:, None, :, :].repeat(size, axis=1).reshape(size, size, 3)
    if rng.random() < 0.5:
        bg = bg.transpose(1, 0, 2)
    bg = np.clip(bg + rng.normal(0, 5, bg.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(im)
    r = size * (rng.uniform(0.17, 0.21) if zi == 0 else rng.uniform(0.29, 0.34))
    cx = size * (0.5 + rng.uniform(-0.1, 0.1))
    cy = size * (0.5 + rng.uniform(-0.1, 0.1))
    rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[ci][2]) + rng.integers(-20, 21, 3), 0, 255))
    shape = SHAPES[si][0]
    _draw_shape(draw, shape, cx, cy, r, rng.uniform(-0.15, 0.15), rgb)
    b_en, b_zh = BACKGROUNDS[bi][0], BACKGROUNDS[bi][1]
    en = CAPTION_EN[int(rng.integers(len(CAPTION_EN)))].format(
        size=SIZES[zi][0], colour=COLOURS[ci][0], shape=shape, bg=b_en)
    zh = CAPTION_ZH[int(rng.integers(len(CAPTION_ZH)))].format(
        size=SIZES[zi][1], colour=COLOURS[ci][1], shape=SHAPES[si][1], bg=b_zh)
    # a shorter description that leaves out the size, the background, or both
    drop = int(rng.integers(3))
    s_en, s_zh = ("" if drop in (0, 2) else SIZES[zi][0] + " "), ("" if drop in (0, 2) else SIZES[zi][1])
    p_en = "" if drop in (1, 2) else f" on a {b_en} background"
    p_zh = "" if drop in (1, 2) else f"{b_zh}背景上的"
    short_en = f"a {s_en}{COLOURS[ci][0]} {shape}{p_en}"
    short_zh = f"{p_zh}一个{s_zh}{COLOURS[ci][1]}{SHAPES[si][1]}"
    return im, ci * len(SHAPES) + si, en, zh, short_en, short_zh


def generate(out: str, num_train: int = 4000, num_val: int = 400, size: int = 64, seed: int = 0,
             samples_per_shard: int = 1000, quality: int = 90) -> dict:
    """Write the dataset under ``out``; returns a summary dict. Same seed, same files."""
    from .data.make_shards import shards_from_jsonl

    if num_train < 1 or num_val < 1:
        raise ValueError("num_train and num_val must be >= 1")
    os.makedirs(out, exist_ok=True)
    for split, n, split_seed in (("train", num_train, 0), ("val", num_val, 1)):
        img_dir = os.path.join(out, "images", split)
        os.makedirs(img_dir, exist_ok=True)
        rng = np.random.default_rng([seed, split_seed])
        rows = []
        for i in range(n):
            im, label, en, zh, short_en, short_zh = render(rng, size)
            rel = f"images/{split}/{i:06d}.jpg"
            im.save(os.path.join(out, rel), "JPEG", quality=quality)
            rows.append({"image": rel, "caption": [en, zh, short_en, short_zh], "label": label,
                         "caption_en": en, "caption_zh": zh})
        _write_jsonl(os.path.join(out, f"{split}.jsonl"), rows)
        if split == "val":
            for lang in ("en", "zh"):
                _write_jsonl(os.path.join(out, f"val_{lang}.jsonl"),
                             [{"image": r["image"], "caption": [r[f"caption_{lang}"]], "label": r["label"]}
                              for r in rows])
        shards_from_jsonl(os.path.join(out, f"{split}.jsonl"), os.path.join(out, "shards"), prefix=split,
                          samples_per_shard=samples_per_shard)
    en, zh = class_names()
    classes = {"en": {"classnames": en, "templates": TEMPLATES_EN},
               "zh": {"classnames": zh, "templates": TEMPLATES_ZH}}
    with open(os.path.join(out, "classes.json"), "w", encoding="utf-8") as f:
        json.dump(classes, f, ensure_ascii=False, indent=1)
    return {"out": out, "train": num_train, "val": num_val, "classes": len(en), "image_size": size}


def _write_jsonl(path: str, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m m2model.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--val", type=int, default=400)
    ap.add_argument("--size", type=int, default=64, help="rendered image size in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    args = ap.parse_args(argv)
    info = generate(args.out, args.train, args.val, args.size, args.seed, args.samples_per_shard)
    print(json.dumps(info))


if __name__ == "__main__":
    main()

"""Image transforms shared by the DALI and the Pillow paths.

Random parameters (crop window, flip) are drawn in Python from a generator seeded by
(seed, epoch, sample index), so both backends apply the same augmentation to the same sample and a
resumed run sees exactly the samples and crops it would have seen.
"""

from __future__ import annotations

import io
import math

import numpy as np

MEAN = 0.5
STD = 0.5
DECODABLE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "MPO")

# Modes the decoders convert to RGB; counted so a dataset's oddities are visible.
CONVERTED_MODES = {"CMYK": "cmyk", "L": "grayscale", "LA": "grayscale", "I;16": "grayscale",
                   "I": "grayscale", "1": "grayscale", "RGBA": "alpha", "P": "palette", "PA": "palette"}


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


def random_resized_crop_params(width: int, height: int, rng: np.random.Generator,
                               scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop window: (x, y, w, h) in pixels."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, w, h
    # Fallback: central crop at the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def sample_params(width: int, height: int, train: bool, rng: np.random.Generator | None,
                  scale=(0.8, 1.0), flip_prob: float = 0.5) -> tuple[tuple[int, int, int, int], bool]:
    """Crop window and flip for one sample; evaluation uses the whole image and no flip."""
    if not train:
        return (0, 0, width, height), False
    crop = random_resized_crop_params(width, height, rng, scale=scale)
    return crop, bool(rng.random() < flip_prob)


def pil_decode_transform(data: bytes, image_size: int, crop, flip: bool) -> np.ndarray:
    """Pillow path: decode, convert to RGB, crop, resize (antialiased bicubic, as the official evaluation
    transform), flip, normalise.

    Returns float32 [3, S, S]. Raises on undecodable data (the caller counts and skips).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        # Alpha is dropped, not composited (as DALI's RGB output does).
        rgb = im.convert("RGB")
    x, y, w, h = crop
    if (x, y, w, h) != (0, 0, rgb.width, rgb.height):
        rgb = rgb.crop((x, y, x + w, y + h))
    rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    if flip:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    arr = (arr - MEAN) / STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))

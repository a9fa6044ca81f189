"""Augmentation parameters shared by the DALI and the Pillow paths, and the normalisation.

Random parameters (crop window, flip, which caption) are drawn in Python from a generator seeded by
(seed, epoch, sample index), so both backends apply the same augmentation to the same sample and a
resumed run sees exactly the samples and crops it would have seen.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MEAN = 0.5
STD = 0.5


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


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float32 [N, 3, S, S] with mean = std = 0.5 (as the official transform)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(MEAN).div_(STD).contiguous()

"""What each rank reads in an epoch, in which order, with which augmentation: the plan both decoding
paths follow.

* Epoch order: the shards (and, for jsonl records, the one group of files) in a permutation seeded by
  (seed, epoch), and the samples of each shard in another; the sequential reads webdataset and DALI are
  made for, with a different mix of batches in every epoch.
* Rank split: the epoch's list is cut into ``num_shards`` equal contiguous blocks, rank r reading block
  r; exactly the ``shard_id`` / ``num_shards`` split of DALI's readers, which reads the same list.
* A rank's stream is its block, position p holding ``block[p % len(block)]``: batches take the next
  usable samples; one that fails to decode is replaced by the next one, wrapping around within the
  epoch, so every rank yields the same number of full batches.
* Per sample, (seed, epoch, record index) seeds the crop window, the flip and the caption choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .records import Record
from .transforms import sample_params, sample_rng


def epoch_order(records: Sequence[Record], seed: int, epoch: int, shuffle: bool,
                groups: np.ndarray | None = None) -> np.ndarray:
    """Record indices of one epoch: groups (shards) permuted, samples permuted inside each group."""
    n = len(records)
    if not shuffle:
        return np.arange(n)
    if groups is None:
        groups = record_groups(records)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch])
    group_rank = rng.permutation(int(groups.max()) + 1 if n else 0)
    within = rng.random(n)
    return np.lexsort((within, group_rank[groups]))


def record_groups(records: Sequence[Record]) -> np.ndarray:
    """A group id per record: its shard, or one group for all file records."""
    ids: dict[str, int] = {}
    return np.fromiter((ids.setdefault(r.path if r.in_shard else "", len(ids)) for r in records),
                       dtype=np.int64, count=len(records))


def rank_block(order: np.ndarray, shard_id: int, num_shards: int, drop_last: bool = True) -> np.ndarray:
    """Rank ``shard_id``'s contiguous block of the epoch list (equal blocks; the remainder is unused)."""
    if drop_last:
        per = len(order) // num_shards
        return order[shard_id * per: (shard_id + 1) * per]
    bounds = [len(order) * s // num_shards for s in range(num_shards + 1)]
    return order[bounds[shard_id]: bounds[shard_id + 1]]


@dataclass(frozen=True)
class SamplePlan:
    """What to make of one stream position."""

    position: int  # in the rank's stream (may exceed the block length when refills wrap around)
    index: int  # record index
    crop: tuple[int, int, int, int]  # (x, y, w, h) in pixels of the upright image
    flip: bool
    caption: str


class EpochPlan:
    """The stream of one rank in one epoch; ``plan(p)`` is deterministic, so any position can be
    (re)computed anywhere: in a DataLoader worker, in DALI's crop source, after a resume."""

    def __init__(self, records: Sequence[Record], block: np.ndarray, epoch: int, seed: int, train: bool,
                 crop_scale=(0.8, 1.0), flip_prob: float = 0.5):
        self.records, self.block, self.epoch, self.seed = records, block, epoch, seed
        self.train, self.crop_scale, self.flip_prob = train, tuple(crop_scale), flip_prob
        self._recent: dict[int, SamplePlan] = {}  # a position is planned twice: crop, then caption

    def __len__(self) -> int:
        return len(self.block)

    def index(self, position: int) -> int:
        return int(self.block[position % len(self.block)])

    def plan(self, position: int) -> SamplePlan:
        cached = self._recent.get(position)
        if cached is not None:
            return cached
        if len(self._recent) >= 8192:
            self._recent.clear()
        self._recent[position] = p = self._plan(position)
        return p

    def _plan(self, position: int) -> SamplePlan:
        idx = self.index(position)
        rec = self.records[idx]
        rng = sample_rng(self.seed, self.epoch, idx) if self.train else None
        crop, flip = sample_params(rec.width, rec.height, self.train, rng, scale=self.crop_scale,
                                   flip_prob=self.flip_prob)
        if not rec.captions:
            caption = ""
        elif self.train:
            caption = rec.captions[int(rng.integers(len(rec.captions)))]
        else:
            caption = rec.captions[0]
        return SamplePlan(position, idx, crop, flip, caption)


@dataclass
class DecodedChunk:
    """Consecutive stream positions as a decoding path hands them over: ``images`` holds, in order, the
    images of the positions not in ``failed`` (float32 [k, 3, S, S], normalised); ``failed`` maps the
    others to their counter name."""

    positions: list[int]
    images: torch.Tensor | None  # noqa: F821 (torch is imported where chunks are made)
    failed: dict[int, str]

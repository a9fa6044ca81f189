"""The image-text loader of training (epochs, ranks, full batches, counted skips, an exact resume
position) and the image batches of evaluation; both read records through the same sample path
(``stream.EpochPlan`` -> the DALI or Pillow decoding path -> normalised images; captions tokenised).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .dali_reader import DaliReader, dali_available
from .index import DatasetIndex, check_records
from .pillow_reader import PillowReader
from .records import DataStats, Problems, Record
from .stream import EpochPlan, epoch_order, rank_block, record_groups

BACKENDS = ("auto", "dali", "pillow")


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] float32, normalised (mean = std = 0.5)
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L]
    indices: torch.Tensor  # [B] record indices
    captions: list[str]
    epoch: int
    step: int  # step inside the epoch (0-based)
    cursor: int  # position in this rank's stream after this batch


def resolve_backend(backend: str, records: Sequence[Record] = ()) -> str:
    """``auto``: DALI where it imports and every record is in a webdataset shard, else Pillow."""
    if backend not in BACKENDS:
        raise ValueError(f"data backend must be one of {BACKENDS}, got {backend!r}")
    in_shards = all(r.in_shard for r in records)
    if backend == "auto":
        return "dali" if dali_available() and in_shards else "pillow"
    if backend == "dali":
        if not dali_available():
            raise ValueError("data backend 'dali' requested but nvidia.dali cannot be imported")
        if not in_shards:
            raise ValueError("data backend 'dali' reads webdataset shards only; the data has jsonl records "
                             "(write shards with `python -m m2model.data.make_shards`, or use 'pillow')")
    return backend


def _as_index(records) -> DatasetIndex:
    """A DatasetIndex as given, or one checked from plain records."""
    if isinstance(records, DatasetIndex):
        return records
    stats, problems = DataStats(), Problems()
    return DatasetIndex(check_records(list(records), stats, problems), stats, problems)


class ImageTextLoader:
    """Training batches of (images, token ids, attention mask) for one rank (see ``stream.py`` for the
    order, the split and the refills). ``state_dict()`` is the position after the last batch handed out;
    ``load_state_dict`` resumes there exactly.

    ``records``: a :class:`DatasetIndex` (``index.build_index``) or records to check here. Counts:
    ``index_stats`` (found when indexing, once), ``stats`` (this epoch's decode failures, each sample
    once per epoch), ``run_stats`` (decode failures over the whole run, resumes included);
    :meth:`counts` is the sum of the first and the last.
    """

    def __init__(self, records, tokenizer: Callable, image_size: int, batch_size: int, *,
                 train: bool = True, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                 backend: str = "auto", device: str = "cpu", workers: int = 1, prefetch: int = 2,
                 crop_scale=(0.8, 1.0), flip_prob: float = 0.5, shuffle: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} out of range for num_shards {num_shards}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        index = _as_index(records)
        if not index.records:
            raise ValueError(f"the dataset has no usable records ({index.stats.summary()})")
        self.records = index.records
        self.index_stats, self.problems = index.stats, index.problems
        self.tokenizer = tokenizer
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.seed, self.shard_id, self.num_shards = int(seed), shard_id, num_shards
        self.crop_scale, self.flip_prob = tuple(crop_scale), float(flip_prob)
        self.backend = resolve_backend(backend, self.records)
        self.steps_per_epoch = (len(self.records) // num_shards) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.records)} usable records are fewer than one batch of {batch_size} "
                             f"on each of {num_shards} ranks")
        if self.backend == "dali":
            self.reader = DaliReader(self.records, image_size, batch_size, device=device, threads=workers,
                                     prefetch=prefetch, shard_id=shard_id, num_shards=num_shards, seed=seed)
            self.image_device = torch.device("cuda", self.reader.device_id) if device == "cuda" else None
        else:
            self.reader = PillowReader(image_size, batch_size, workers=workers, prefetch=prefetch)
            self.image_device = None
        self._groups = record_groups(self.records)
        self.epoch = self.step = self.cursor = 0
        self.stats = DataStats()
        self.run_stats = DataStats()
        self._counted: set[tuple[int, str]] = set()  # (record, reason) counted this epoch
        self._open = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def counts(self) -> DataStats:
        return DataStats(self.index_stats + self.run_stats)

    # -- position ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "cursor": self.cursor, "seed": self.seed,
                "num_records": len(self.records), "num_shards": self.num_shards, "stats": dict(self.stats),
                "run_stats": dict(self.run_stats), "counted": sorted(self._counted),
                "reader": self.reader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_records") != len(self.records) or state.get("num_shards") != self.num_shards:
            raise ValueError(f"loader state is for {state.get('num_records')} records on "
                             f"{state.get('num_shards')} ranks, this loader has {len(self.records)} on "
                             f"{self.num_shards}")
        self.epoch, self.step, self.cursor = int(state["epoch"]), int(state["step"]), int(state["cursor"])
        self.seed = int(state.get("seed", self.seed))
        self.stats = DataStats(state.get("stats", {}))
        self.run_stats = DataStats(state.get("run_stats", {}))
        self._counted = {(int(i), str(r)) for i, r in state.get("counted", ())}
        self.reader.load_state_dict(state.get("reader", {}))

    # -- iteration --------------------------------------------------------------------------------------
    def _plan(self, epoch: int) -> tuple[EpochPlan, np.ndarray]:
        order = epoch_order(self.records, self.seed, epoch, self.shuffle, self._groups)
        block = rank_block(order, self.shard_id, self.num_shards)
        return EpochPlan(self.records, block, epoch, self.seed, self.train, self.crop_scale,
                         self.flip_prob), order

    def _count(self, idx: int, reason: str) -> None:
        if (idx, reason) not in self._counted:
            self._counted.add((idx, reason))
            self.stats[reason] += 1
            self.run_stats[reason] += 1

    def _batch(self, plan: EpochPlan, step: int, positions: list[int], images: torch.Tensor) -> Batch:
        plans = [plan.plan(p) for p in positions]
        captions = [q.caption for q in plans]
        ids, mask = self.tokenizer(captions)
        return Batch(images=images, input_ids=ids, attention_mask=mask,
                     indices=torch.tensor([q.index for q in plans], dtype=torch.long), captions=captions,
                     epoch=plan.epoch, step=step, cursor=positions[-1] + 1)

    def _assemble(self, chunks, plan: EpochPlan, step: int) -> Iterator[Batch]:
        """Full batches of the next usable samples of the stream."""
        want, n = self.batch_size, len(plan)
        pending_pos: list[int] = []
        pending_img: list[torch.Tensor] = []
        misses = 0  # consecutive undecodable positions
        for chunk in chunks:
            for p, reason in chunk.failed.items():
                self._count(plan.index(p), reason)
            good = [p for p in chunk.positions if p not in chunk.failed]
            if good:
                misses = sum(1 for p in chunk.positions if p > good[-1])
            else:
                misses += len(chunk.positions)
            if misses >= n:
                raise ValueError(f"rank {self.shard_id}: no decodable sample left in a full pass over its "
                                 f"{n} records ({self.counts().summary()})")
            if not good:
                continue
            images = chunk.images if self.image_device is None else chunk.images.to(self.image_device)
            if not pending_pos and len(good) == want:  # the usual case: a chunk is a batch
                yield self._batch(plan, step, good, images)
                step += 1
                continue
            pending_pos.extend(good)
            pending_img.append(images)
            while len(pending_pos) >= want:
                stacked = torch.cat(pending_img) if len(pending_img) > 1 else pending_img[0]
                yield self._batch(plan, step, pending_pos[:want], stacked[:want])
                step += 1
                pending_pos = pending_pos[want:]
                pending_img = [stacked[want:]] if pending_pos else []

    def __iter__(self):
        """Iterate over the rest of the current epoch, then advance to the next one."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step, self.cursor = self.epoch + 1, 0, 0
        if self.step == 0 and self.cursor == 0:
            self.stats = DataStats()
            self._counted = set()
        plan, order = self._plan(self.epoch)
        self.close_stream()
        self._open = chunks = self.reader.stream(plan, self.cursor, order)
        try:
            for batch in self._assemble(chunks, plan, self.step):
                self.step, self.cursor = batch.step + 1, batch.cursor
                yield batch
                if self.step >= self.steps_per_epoch:
                    return
        finally:
            self.close_stream()

    def close_stream(self) -> None:
        """Stop the decoding of the current stream (workers, pipeline)."""
        if self._open is not None:
            self._open.close()
            self._open = None

    def close(self) -> None:
        self.close_stream()
        self.reader.close()


def eval_batches(records: Sequence[Record], image_size: int, batch_size: int = 64, *, workers: int = 0,
                 skip_bad: bool = False, stats: DataStats | None = None
                 ) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Evaluation images (resize to ``image_size``, no crop, no flip) in record order, in batches:
    (images [k, 3, S, S], indices of their records). An unusable image is a ValueError naming it, or,
    with ``skip_bad``, left out and counted in ``stats``."""
    records = list(records)
    stats = stats if stats is not None else DataStats()
    order: list[int] = []
    checked = check_records(records, stats, Problems(), strict=not skip_bad, positions=order,
                            need_text=False)
    if not checked:
        return
    plan = EpochPlan(checked, np.arange(len(checked)), 0, 0, train=False)
    reader = PillowReader(image_size, batch_size, workers=workers)
    for chunk in reader.stream(plan, 0, stop=len(checked)):
        for p, reason in chunk.failed.items():
            if not skip_bad:
                raise ValueError(f"{checked[p].where()}: cannot decode the image ({reason})")
            stats[reason] += 1
        good = [p for p in chunk.positions if p not in chunk.failed]
        if good:
            yield chunk.images, [order[p] for p in good]


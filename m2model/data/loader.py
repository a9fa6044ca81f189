"""The image-text loader: deterministic per-epoch shuffling, per-rank sharding, validation with counted
skips, DALI (or Pillow) decoding, tokenisation, and a resumable position."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .dali import DaliDecoder, dali_available
from .records import DataStats, Record, probe_header
from .transforms import CONVERTED_MODES, DECODABLE_FORMATS, pil_decode_transform, sample_params


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


def resolve_backend(backend: str) -> str:
    if backend not in ("auto", "dali", "pillow"):
        raise ValueError(f"data backend must be 'auto', 'dali' or 'pillow', got {backend!r}")
    if backend == "auto":
        return "dali" if dali_available() else "pillow"
    if backend == "dali" and not dali_available():
        raise ValueError("data backend 'dali' requested but nvidia.dali cannot be imported")
    return backend


class ImageTextLoader:
    """Batches of (images, token ids, attention mask) for one rank.

    Each epoch is a permutation of all records seeded by (seed, epoch) (or the identity when
    ``shuffle=False``); rank r takes positions r, r + W, ... (the ``shard_id``/``num_shards`` split of
    DALI's readers). Every rank yields the same number of full batches per epoch,
    ``len(records) // (num_shards * batch_size)``; skipped samples are replaced by the next ones in the
    rank's stream (wrapping around within the epoch), so ranks stay in step.

    ``state_dict()`` is the position after the last batch handed out; ``load_state_dict`` resumes there.
    """

    def __init__(self, records: Sequence[Record], tokenizer: Callable, image_size: int, batch_size: int, *,
                 train: bool = True, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                 backend: str = "auto", device: str = "cpu", num_threads: int = 1, crop_scale=(0.8, 1.0),
                 flip_prob: float = 0.5, shuffle: bool | None = None, drop_last: bool = True,
                 prefetch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} out of range for num_shards {num_shards}")
        if len(records) == 0:
            raise ValueError("the dataset has no records")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.seed = int(seed)
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.crop_scale = tuple(crop_scale)
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_prob = float(flip_prob)
        self.drop_last = drop_last
        self.prefetch = int(prefetch)
        self.backend = resolve_backend(backend)
        self.device = device
        self._decoder = None
        if self.backend == "dali":
            self._decoder = DaliDecoder(image_size, batch_size, device=device, num_threads=num_threads,
                                        seed=seed)
        per_shard = len(self.records) // num_shards
        if drop_last:
            self.steps_per_epoch = per_shard // self.batch_size
        else:
            self.steps_per_epoch = -(-len(self._shard_positions(0)) // self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.records)} records are fewer than one batch of {batch_size} on each "
                             f"of {num_shards} shards")
        self.epoch = 0
        self.step = 0
        self.cursor = 0
        self.stats = DataStats()  # counts of the current epoch
        # (record, reason) pairs counted this epoch: refills may revisit a record
        self._counted: set[tuple[int, str]] = set()

    # -- position -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "cursor": self.cursor, "seed": self.seed,
                "num_records": len(self.records), "num_shards": self.num_shards, "stats": dict(self.stats),
                "counted": sorted(self._counted)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_records") != len(self.records) or state.get("num_shards") != self.num_shards:
            raise ValueError(f"loader state is for {state.get('num_records')} records on "
                             f"{state.get('num_shards')} shards, this loader has {len(self.records)} on "
                             f"{self.num_shards}")
        self.epoch, self.step, self.cursor = int(state["epoch"]), int(state["step"]), int(state["cursor"])
        self.seed = int(state.get("seed", self.seed))
        self.stats = DataStats(state.get("stats", {}))
        self._counted = {(int(i), str(r)) for i, r in state.get("counted", ())}

    def _shard_positions(self, epoch: int) -> np.ndarray:
        n = len(self.records)
        order = (np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        if self.drop_last:
            order = order[: (n // self.num_shards) * self.num_shards]
        return order[self.shard_id:: self.num_shards]

    # -- loading --------------------------------------------------------------------------------------
    def _count(self, idx: int, reason: str) -> None:
        """Count a skipped or converted record once per epoch."""
        key = (idx, reason)
        if key not in self._counted:
            self._counted.add(key)
            self.stats[reason] += 1

    def _prepare(self, idx: int, epoch: int):
        """Read and pre-check one record. Returns (bytes, crop, flip, caption) or None (counted)."""
        rec = self.records[idx]
        if not rec.captions:
            self._count(idx, "empty_caption")
            return None
        try:
            data = rec.read_bytes()
        except FileNotFoundError:
            self._count(idx, "missing")
            return None
        except EOFError:
            self._count(idx, "truncated")
            return None
        except OSError:
            self._count(idx, "missing")
            return None
        fmt, mode, (w, h) = probe_header(data)
        if fmt is None:
            self._count(idx, mode)  # mode holds the reason here
            return None
        if fmt not in DECODABLE_FORMATS:
            self._count(idx, "unsupported")
            return None
        if mode in CONVERTED_MODES:
            self._count(idx, CONVERTED_MODES[mode])
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, int(idx)])
        crop, flip = sample_params(w, h, self.train, rng, scale=self.crop_scale, flip_prob=self.flip_prob)
        caption = rec.captions[int(rng.integers(len(rec.captions)))] if self.train else rec.captions[0]
        return data, crop, flip, caption

    def _decode(self, items, idxs):
        """Decode prepared items; returns (images, list of kept positions)."""
        datas = [it[0] for it in items]
        crops = [it[1] for it in items]
        flips = [it[2] for it in items]
        if self._decoder is not None:
            images, bad = self._decoder(datas, crops, flips)
            kept = [i for i in range(len(items)) if i not in set(bad)]
            for i in bad:
                self._count(idxs[i], "corrupt")
            return images, kept
        arrays, kept = [], []
        for i, (d, c, f) in enumerate(zip(datas, crops, flips)):
            try:
                arrays.append(pil_decode_transform(d, self.image_size, c, f))
                kept.append(i)
            except Exception:  # Pillow raises OSError, SyntaxError, ValueError... on bad data
                self._count(idxs[i], "corrupt")
        images = torch.from_numpy(np.stack(arrays)) if arrays else None
        return images, kept

    def _make_batch(self, epoch: int, step: int, positions: np.ndarray, cursor: int):
        want = self.batch_size
        images, indices, captions = [], [], []
        tried = 0
        while len(indices) < want:
            need = want - len(indices)
            items, idxs = [], []
            while len(items) < need:
                if tried >= len(positions):
                    raise ValueError(f"shard {self.shard_id}: no decodable sample left in a full pass over "
                                     f"its {len(positions)} records ({self.stats.summary()})")
                idx = int(positions[cursor % len(positions)])
                cursor += 1
                tried += 1
                prepared = self._prepare(idx, epoch)
                if prepared is not None:
                    items.append(prepared)
                    idxs.append(idx)
            imgs, kept = self._decode(items, idxs)
            if imgs is not None:
                images.append(imgs)
                indices.extend(idxs[k] for k in kept)
                captions.extend(items[k][3] for k in kept)
        ids, mask = self.tokenizer(captions)
        return Batch(images=torch.cat(images), input_ids=ids, attention_mask=mask,
                     indices=torch.tensor(indices, dtype=torch.long), captions=captions, epoch=epoch,
                     step=step, cursor=cursor)

    def _make_chunk(self, epoch: int, step: int, positions: np.ndarray):
        chunk = positions[step * self.batch_size: (step + 1) * self.batch_size]
        items, idxs = [], []
        for idx in chunk.tolist():
            prepared = self._prepare(idx, epoch)
            if prepared is not None:
                items.append(prepared)
                idxs.append(idx)
        imgs, kept = self._decode(items, idxs) if items else (None, [])
        cursor = (step + 1) * self.batch_size
        if imgs is None:
            return None, cursor
        captions = [items[k][3] for k in kept]
        ids, mask = self.tokenizer(captions)
        return Batch(images=imgs, input_ids=ids, attention_mask=mask,
                     indices=torch.tensor([idxs[k] for k in kept], dtype=torch.long), captions=captions,
                     epoch=epoch, step=step, cursor=cursor), cursor

    def _produce(self, epoch: int, start_step: int, cursor: int):
        positions = self._shard_positions(epoch)
        for step in range(start_step, self.steps_per_epoch):
            if self.drop_last:
                batch = self._make_batch(epoch, step, positions, cursor)
                cursor = batch.cursor
            else:
                batch, cursor = self._make_chunk(epoch, step, positions)
                if batch is None:  # nothing usable in this chunk
                    continue
            yield batch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        """Iterate over the rest of the current epoch, then advance to the next one."""
        epoch, step, cursor = self.epoch, self.step, self.cursor
        if step >= self.steps_per_epoch:
            epoch, step, cursor = epoch + 1, 0, 0
            self.epoch, self.step, self.cursor = epoch, 0, 0
        if step == 0 and cursor == 0:
            self.stats = DataStats()
            self._counted = set()
        gen = self._produce(epoch, step, cursor)
        if self.prefetch > 0:
            gen = _prefetched(gen, self.prefetch)
        for batch in gen:
            self.step, self.cursor = batch.step + 1, batch.cursor
            yield batch


def _prefetched(gen, depth: int):
    """Run a generator in a background thread (decoders release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in gen:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def _no_tokenizer(captions):
    n = len(captions)
    return torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long)


def load_eval_set(records: Sequence[Record], image_size: int, *, backend: str = "auto", device: str = "cpu",
                  batch_size: int = 64):
    """Decode every usable record with the evaluation transform (resize, no crop, no flip).

    Returns (images [N, 3, S, S], captions (all of them), caption_to_image [T] long, stats). Records that
    cannot be used are skipped and counted in ``stats``.
    """
    loader = ImageTextLoader(records, _no_tokenizer, image_size, min(batch_size, len(records)), train=False,
                             backend=backend, device=device, shuffle=False, drop_last=False)
    images, captions, owner = [], [], []
    for batch in loader:
        for row, idx in enumerate(batch.indices.tolist()):
            images.append(batch.images[row])
            for cap in records[idx].captions:
                captions.append(cap)
                owner.append(len(images) - 1)
    if not images:
        raise ValueError(f"no usable evaluation sample ({loader.stats.summary()})")
    return torch.stack(images), captions, torch.tensor(owner, dtype=torch.long), loader.stats

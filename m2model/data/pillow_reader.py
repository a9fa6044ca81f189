"""The Pillow path: a rank's stream decoded in torch DataLoader worker processes.

Workers receive stream positions (in order, from the position to resume at), compute each sample's plan
(``EpochPlan.plan``: the same crop and flip as on the DALI path), read its bytes, decode them with
Pillow and return uint8 pixels; the main process normalises them. The DataLoader keeps the order, so the
stream is the same with any number of workers, and resuming only needs the position.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from .decode import BadSample, decode_transform
from .stream import DecodedChunk, EpochPlan
from .transforms import normalize_uint8


def decode_sample(plan: EpochPlan, position: int, image_size: int):
    """(position, uint8 [S, S, 3] or None, counter name of the failure or None)."""
    p = plan.plan(position)
    rec = plan.records[p.index]
    try:
        data = rec.read_bytes()
    except FileNotFoundError:
        return position, None, "missing"
    except EOFError:
        return position, None, "truncated"
    except OSError:
        return position, None, "missing"
    try:
        return position, decode_transform(data, image_size, p.crop, p.flip), None
    except BadSample as e:
        return position, None, e.reason


class _PlanDataset(torch.utils.data.Dataset):
    def __init__(self, plan: EpochPlan, image_size: int):
        self.plan, self.image_size = plan, image_size

    def __getitem__(self, position: int):
        return decode_sample(self.plan, position, self.image_size)


class _Positions(torch.utils.data.Sampler):
    """Stream positions from ``start`` on: up to ``stop``, or without end (refills may wrap around)."""

    def __init__(self, start: int, stop: int | None):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop)) if self.stop is not None else itertools.count(self.start)


def _as_list(items):
    return items


def to_chunk(items) -> DecodedChunk:
    arrays = [a for _, a, _ in items if a is not None]
    images = normalize_uint8(torch.from_numpy(np.stack(arrays))) if arrays else None
    return DecodedChunk([p for p, _, _ in items], images, {p: r for p, _, r in items if r is not None})


class PillowReader:
    """Decodes stream positions with Pillow in ``workers`` processes (0: in this process)."""

    backend = "pillow"

    def __init__(self, image_size: int, chunk_size: int, workers: int = 1, prefetch: int = 2):
        self.image_size, self.chunk_size = int(image_size), int(chunk_size)
        self.workers, self.prefetch = int(workers), int(prefetch)

    def stream(self, plan: EpochPlan, start: int, epoch_order=None, stop: int | None = None
               ) -> Iterator[DecodedChunk]:
        """Chunks of consecutive positions from ``start`` (to ``stop``, or on without end);
        ``epoch_order`` is not needed here (the plan has the rank's block)."""
        loader = torch.utils.data.DataLoader(
            _PlanDataset(plan, self.image_size), sampler=_Positions(start, stop), batch_size=self.chunk_size,
            collate_fn=_as_list, num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers else None,
            # its own generator: the workers' base seed must not be drawn from torch's global RNG, which
            # drives dropout and is restored exactly on resume (decoding itself draws no random numbers)
            generator=torch.Generator().manual_seed(0))
        it = iter(loader)
        try:
            for items in it:
                yield to_chunk(items)
        finally:
            del it  # shuts the workers down when the consumer stops early (end of epoch)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass

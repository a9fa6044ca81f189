"""NVIDIA DALI decoding: external_source (validated bytes + crop/flip parameters) -> image decoder with
region of interest -> resize -> mirror + normalise, on the CPU (``device_id=None``) or with the
``mixed`` (GPU) decoder on CUDA.

DALI aborts a whole pipeline on one bad file and the pipeline object is unusable afterwards; samples are
therefore pre-checked (header, end marker) before they reach DALI, and a batch that still fails is
retried sample by sample on a fresh pipeline so the culprit is found, skipped and counted.
"""

from __future__ import annotations

import numpy as np
import torch

from .transforms import MEAN, STD


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


class DaliDecoder:
    """Decode and transform a list of encoded images into a float32 tensor [N, 3, S, S]."""

    def __init__(self, image_size: int, max_batch_size: int, device: str = "cpu",
                 device_id: int | None = None, num_threads: int = 1, seed: int = 0):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"DALI device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and device_id is None:
            device_id = torch.cuda.current_device()
        self.image_size = int(image_size)
        self.max_batch_size = int(max_batch_size)
        self.device = device
        self.device_id = device_id if device == "cuda" else None
        self.num_threads = max(1, int(num_threads))
        self.seed = seed
        self._pipe = None

    def _build(self, batch_size: int):
        from nvidia.dali import fn, pipeline_def, types

        decoder_device = "mixed" if self.device == "cuda" else "cpu"
        size = self.image_size

        @pipeline_def(batch_size=batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      seed=self.seed, prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
            shape = fn.external_source(name="shape", dtype=types.FLOAT)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            img = fn.decoders.image_slice(enc, anchor, shape, device=decoder_device, output_type=types.RGB,
                                          axis_names="WH", normalized_anchor=False, normalized_shape=False)
            img = fn.resize(img, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(img, mirror=mirror, mean=[MEAN * 255.0] * 3,
                                            std=[STD * 255.0] * 3, output_layout="CHW", dtype=types.FLOAT)

        p = pipe()
        p.build()
        return p

    def _run(self, pipe, datas, crops, flips):
        pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        pipe.feed_input("anchor", [np.array(c[:2], dtype=np.float32) for c in crops])
        pipe.feed_input("shape", [np.array(c[2:], dtype=np.float32) for c in crops])
        pipe.feed_input("mirror", [np.array(int(f), dtype=np.int32) for f in flips])
        (out,) = pipe.run()
        if self.device == "cuda":
            return torch.from_dlpack(out.as_tensor()).clone()
        return torch.from_numpy(np.array(out.as_tensor()))

    def __call__(self, datas, crops, flips) -> tuple[torch.Tensor | None, list[int]]:
        """Returns (images of the decodable samples, indices of the samples that failed to decode)."""
        if not datas:
            return None, []
        if len(datas) > self.max_batch_size:
            raise ValueError(f"batch of {len(datas)} exceeds the pipeline's max_batch_size "
                             f"{self.max_batch_size}")
        if self._pipe is None:
            self._pipe = self._build(self.max_batch_size)
        try:
            return self._run(self._pipe, datas, crops, flips), []
        except RuntimeError:
            self._pipe = None  # a failed DALI pipeline cannot run again
        # Find the culprit(s) one sample at a time on a single-sample pipeline.
        probe = self._build(1)
        good, bad = [], []
        for i, (d, c, f) in enumerate(zip(datas, crops, flips)):
            try:
                good.append(self._run(probe, [d], [c], [f]))
            except RuntimeError:
                bad.append(i)
                probe = self._build(1)
        return (torch.cat(good) if good else None), bad

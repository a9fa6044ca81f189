"""Helpers for tests/test_open_clip_train.py: open_clip_train runs on a tiny learnable image-text set.

* :func:`make_dataset` writes a few hundred 32 x 32 PNGs of a coloured shape on the left or the right,
  captioned with their colour, shape and side ("a red circle on the left"), and open_clip_train's CSV
  (tab-separated) index of them;
* :func:`write_model_config` writes a tiny CLIP config (ViT and text tower of width 64, 2 layers) as a
  ``local-dir:`` model for ``--model``;
* :func:`train` runs a list of configurations (:class:`Run`) in ``world_size`` spawned processes, each
  one a whole ``open_clip_train.main.main`` (``impl="stock"``) or
  ``m2kernels.integrations.open_clip_train.main`` (``impl="m2"``) with a fresh gloo process group, and
  returns, per rank and run, the loss of every step together with a float64 evaluation of the loss of
  the same features (:func:`reference_loss`).

Test-only adaptations inside the spawned processes: torchvision's stub schemas (the CPU torch beside
torchvision's wheel), and DistributedDataParallel without ``device_ids`` for CPU modules
(open_clip_train passes ``device_ids=[cpu]``, which torch refuses). The loss is observed by wrapping
the loss object that ``open_clip_train.main`` hands to ``train_one_epoch``; it is not changed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (40, 40, 230), "yellow": (230, 230, 30),
           "white": (240, 240, 240), "purple": (150, 30, 200)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
STEPS = 20        # steps of one epoch: NUM_SAMPLES / global batch
GLOBAL_BATCH = 16
NUM_SAMPLES = STEPS * GLOBAL_BATCH


def make_dataset(root: str, n: int = NUM_SAMPLES, seed: int = 0) -> str:
    """Writes ``n`` captioned images under ``root``; returns the path of the tab-separated index."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i in range(n):
        colour, shape, side = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIDES)
        image = Image.new("RGB", (32, 32), tuple([rng.randint(0, 60)] * 3))
        draw = ImageDraw.Draw(image)
        x0, y0 = (2 if side == "left" else 17), 8
        box = [x0, y0, x0 + 13, y0 + 13]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x0, y0 + 13), (x0 + 13, y0 + 13), (x0 + 6, y0)], fill=COLOURS[colour])
        path = os.path.join(root, f"{i:04d}.png")
        image.save(path)
        lines.append(f"{path}\ta {colour} {shape} on the {side}")
    index = os.path.join(root, "train.tsv")
    with open(index, "w") as f:
        f.write("\n".join(lines) + "\n")
    return index


def write_model_config(root: str) -> str:
    """A tiny CLIP (embed 32; ViT 32 px, patch 8, width 64, 2 layers; text context 16, width 64, 2 layers)."""
    os.makedirs(root, exist_ok=True)
    config = {"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }}
    with open(os.path.join(root, "open_clip_config.json"), "w") as f:
        json.dump(config, f)
    return f"local-dir:{root}"


@dataclass
class Run:
    """One open_clip_train run. ``flags``: extra trainer arguments (``--local-loss``, ``--m2-mode x``,
    ...; ``--m2-*`` only with ``impl="m2"``). ``references``: the float64 evaluations to record, each a
    quantity a rank's loss can be: ``"full"`` (the loss of the global batch), ``"share"`` (this rank's
    share: its rows and columns against the global batch, open_clip's ``--local-loss``) or
    ``"grouped:N"`` (the share within sub-groups of N consecutive ranks); the first is what this run's
    loss should be."""

    name: str
    impl: str
    flags: list = field(default_factory=list)
    precision: str = "fp32"
    references: tuple = ("full",)


def reference_loss(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, rank: int, world_size: int,
                   kind: str) -> float:
    """Float64 CLIP loss of the gathered features ``x``, ``y`` (global batch, rank-major) as rank
    ``rank`` of ``world_size`` reports it under ``kind`` (see :class:`Run`)."""
    x, y, s = x.double(), y.double(), scale.double()
    b = x.shape[0] // world_size
    if kind.startswith("grouped:"):
        n = int(kind.split(":")[1])
        first = (rank // n) * n
        x, y = x[first * b:(first + n) * b], y[first * b:(first + n) * b]
        rank, kind = rank - first, "share"
    logits = s * x @ y.T
    labels = torch.arange(x.shape[0])
    if kind == "full":
        return float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    if kind != "share":
        raise ValueError(f"unknown reference kind {kind!r}")
    rows = slice(rank * b, (rank + 1) * b)
    return float((F.cross_entropy(logits[rows], labels[rows]) + F.cross_entropy(logits.T[rows], labels[rows]))
                 / 2)


class LossRecorder(torch.nn.Module):
    """Calls the trainer's loss unchanged; records each step's total loss and the float64 reference."""

    def __init__(self, inner, kinds, rank: int, world_size: int):
        super().__init__()
        self.inner, self.kinds, self.rank, self.world_size = inner, tuple(kinds), rank, world_size
        self.losses: list[float] = []
        self.references: dict[str, list[float]] = {kind: [] for kind in self.kinds}

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        total = sum(out.values()) if isinstance(out, dict) else out
        self.losses.append(float(total.detach().double()))
        if self.kinds:
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                x = kwargs["image_features"].detach().double()  # exact: the features as the loss got them
                y = kwargs["text_features"].detach().double()
                s = kwargs["logit_scale"].detach().double()
                if self.world_size > 1:
                    xs = [torch.empty_like(x) for _ in range(self.world_size)]
                    ys = [torch.empty_like(y) for _ in range(self.world_size)]
                    dist.all_gather(xs, x.contiguous())
                    dist.all_gather(ys, y.contiguous())
                    x, y = torch.cat(xs), torch.cat(ys)
                for kind in self.kinds:
                    self.references[kind].append(reference_loss(x, y, s, self.rank, self.world_size, kind))
        return out


def _allow_cpu_device_ids() -> None:
    """DistributedDataParallel that drops ``device_ids`` when they are all CPU devices (test-only)."""
    base = torch.nn.parallel.DistributedDataParallel
    if getattr(base, "_m2_cpu_device_ids", False):
        return

    class CpuDeviceIdsDDP(base):
        _m2_cpu_device_ids = True

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDeviceIdsDDP


def _worker(rank: int, world_size: int, tmp: str, data: str, model: str, runs: list, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    from m2kernels.integrations import open_clip_train as integration

    integration.import_torchvision()  # stub schemas where torchvision's wheel does not fit this torch
    _allow_cpu_device_ids()
    import open_clip_train.main as trainer

    train_one_epoch = trainer.train_one_epoch
    results = []
    for k, spec in enumerate(runs):
        run = Run(**spec)
        recorders = []

        def recording(model_, data_, loss, *args, _run=run, _recorders=recorders, **kwargs):
            recorder = LossRecorder(loss, _run.references, rank, world_size)
            _recorders.append(recorder)
            return train_one_epoch(model_, data_, recorder, *args, **kwargs)

        trainer.train_one_epoch = recording
        argv = ["--model", model, "--train-data", data, "--dataset-type", "csv", "--csv-separator", "\t",
                "--batch-size", str(GLOBAL_BATCH // world_size), "--epochs", "1", "--lr", "1e-3",
                "--warmup", "2", "--wd", "0.1", "--workers", "0", "--seed", "0", "--device", "cpu",
                "--precision", run.precision, "--logs", os.path.join(tmp, "logs"),
                "--name", f"{k}-{run.name}", "--log-every-n-steps", "100", "--report-to", "", *run.flags]
        if world_size > 1:
            argv += ["--dist-url", f"file://{tmp}/init-{k}?rank={rank}&world_size={world_size}"]
        try:
            rc = (trainer.main(argv) if run.impl == "stock" else integration.main(argv))
        finally:
            trainer.train_one_epoch = train_one_epoch
            if dist.is_initialized():
                dist.destroy_process_group()
            for handler in list(logging.root.handlers):  # open_clip_train adds its handlers each run
                logging.root.removeHandler(handler)
                handler.close()
        if rc not in (None, 0):
            raise RuntimeError(f"open_clip_train returned {rc} for run {run.name}")
        (recorder,) = recorders
        inner = recorder.inner
        results.append({**asdict(run), "losses": recorder.losses, "references": recorder.references,
                        "loss_type": f"{type(inner).__module__}.{type(inner).__qualname__}"})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def train(world_size: int, runs: list[Run], data: str, model: str) -> list[dict[str, dict]]:
    """Runs ``runs`` in order in ``world_size`` spawned gloo processes; returns, per rank, a dict of
    run name -> ``{"losses", "references" (kind -> values), "loss_type", ...}``."""
    names = [run.name for run in runs]
    assert len(set(names)) == len(names), names
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world_size, tmp, data, model, [asdict(r) for r in runs], tmp),
                 nprocs=world_size, join=True)
        out = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                out.append({r["name"]: r for r in json.load(f)})
    return out

"""Contrastive (ITC) training of the M2-Encoder, on one process or under torchrun.

    python -m m2model.train --config CONFIG.yaml [--key value ...]
    torchrun --standalone --nproc_per_node N -m m2model.train --config CONFIG.yaml

Every key of :class:`TrainConfig` can be set in the config file (JSON or YAML) and overridden on the
command line (``--lr 1e-3``, ``--model_overrides '{width: 128}'``, ``--grad_clip null``; values are
parsed as YAML). The pieces live in ``m2model.training`` (config, env, builders, loop) and
``m2model.checkpoint``; this module is the command line and re-exports the Python API.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch.distributed as dist

from m2model.training.builders import build_model, build_optimizer, cosine_schedule  # noqa: F401
from m2model.training.config import LOSS_MODES, TrainConfig, load_config  # noqa: F401
from m2model.training.config import parse_args as _parse_args
from m2model.training.loop import train  # noqa: F401


def parse_args(argv=None) -> TrainConfig:
    return _parse_args(argv, prog="python -m m2model.train", description=__doc__.split("\n")[0])


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"m2model.train: {e}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage.*")
        out = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        state = "interrupted" if out["interrupted"] else "finished"
        print(f"{state} at step {out['step']}; loss {out['loss']:.4f}; checkpoint {out['checkpoint']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Contrastive training of the M2-Encoder: ``config`` (the schema), ``env`` (processes and devices),
``builders`` (model, optimizer, schedule, loss), ``progress`` (the bar), ``loop`` (the training loop).
Checkpoint I/O lives in ``m2model.checkpoint``, shared with evaluation."""

from .config import LOSS_MODES, TrainConfig, load_config, parse_args
from .loop import train

__all__ = ["LOSS_MODES", "TrainConfig", "load_config", "parse_args", "train"]

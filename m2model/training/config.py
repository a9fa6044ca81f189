"""The training configuration: a dataclass schema (type and range of every key), read from JSON/YAML
and command-line overrides, validated as a whole before anything is loaded.

Every error names the key and says what was expected; ``null`` (YAML / ``--key null``) is accepted exactly
where the schema allows it (``grad_clip: null`` turns clipping off).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

LOSS_MODES = ("grouped", "global", "ring", "hierarchical", "local")


def _key(default, kind: str, doc: str, **rule):
    """A config key: ``kind`` is int, float, bool, str, path, choice, pair, mapping or sources;
    ``rule`` holds ``optional`` (null allowed), ``lo`` / ``hi`` (inclusive bounds), ``gt`` (exclusive
    lower bound), ``choices``."""
    meta = {"kind": kind, "doc": doc, **rule}
    if isinstance(default, (dict, list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # model
    model: str = _key("tiny", "str", "m2model.config size name")
    model_overrides: dict = _key({}, "mapping", "M2Config fields, e.g. {image_size: 32}")
    tokenizer: str = _key("bert-base-chinese", "path", "tokenizer name or file")
    context_length: Optional[int] = _key(None, "int", "tokens per text (default: the model's max_text_len)",
                                         optional=True, lo=2)
    # data
    train_jsonl: Optional[str] = _key(None, "path", "a jsonl of {image, caption}", optional=True)
    train_shards: Any = _key(None, "sources", "webdataset shards: brace pattern, glob, or a list",
                             optional=True)
    image_root: Optional[str] = _key(None, "path", "folder of the jsonl's image paths", optional=True)
    data_backend: str = _key("auto", "choice", "decoding path", choices=("auto", "dali", "pillow"))
    data_threads: int = _key(2, "int", "DALI threads, or Pillow DataLoader worker processes (0: in-process)",
                             lo=0)
    prefetch: int = _key(2, "int", "batches read ahead (DALI queue depth, DataLoader prefetch factor)", lo=1)
    crop_scale: tuple = _key((0.8, 1.0), "pair", "area range of the random resized crop")
    flip_prob: float = _key(0.5, "float", "probability of a horizontal flip", lo=0.0, hi=1.0)
    # optimisation
    batch_size: int = _key(32, "int", "per rank and micro-step", lo=1)
    accum_steps: int = _key(1, "int", "micro-steps per optimizer step (GBA batch accumulation)", lo=1)
    max_steps: Optional[int] = _key(None, "int", "optimizer steps (default: from epochs)", optional=True,
                                    lo=0)
    epochs: int = _key(1, "int", "epochs when max_steps is not set", lo=1)
    lr: float = _key(5e-4, "float", "peak learning rate", gt=0.0)
    min_lr_ratio: float = _key(0.0, "float", "final lr / lr of the cosine schedule", lo=0.0, hi=1.0)
    warmup_steps: int = _key(0, "int", "linear warm-up steps", lo=0)
    weight_decay: float = _key(0.2, "float", "AdamW weight decay", lo=0.0)
    betas: tuple = _key((0.9, 0.98), "pair", "AdamW betas, each in [0, 1)")
    eps: float = _key(1e-6, "float", "AdamW epsilon", gt=0.0)
    grad_clip: Optional[float] = _key(1.0, "float", "max global gradient norm; null: off", optional=True,
                                      gt=0.0)
    optimizer: str = _key("adamw", "choice", "adamw | lamb (lamb needs apex)", choices=("adamw", "lamb"))
    use_apex: str = _key("auto", "choice", "apex optimizers", choices=("auto", "true", "false"))
    fused: str = _key("auto", "choice", "fused AdamW (auto: on CUDA)", choices=("auto", "true", "false"))
    precision: str = _key("fp32", "choice", "autocast precision", choices=("fp32", "bf16", "fp16"))
    grad_checkpointing: bool = _key(False, "bool", "recompute each block in the backward")
    # loss
    loss_mode: str = _key("grouped", "choice", "distributed loss mode", choices=LOSS_MODES)
    group_size: Optional[int] = _key(None, "int", "ranks per group (default: ranks per node)", optional=True,
                                     lo=1)
    loss_backend: str = _key("auto", "str", "m2kernels ClipLoss backend")
    # run
    seed: int = _key(0, "int", "random seed", lo=0)
    device: str = _key("auto", "choice", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    dist_backend: str = _key("auto", "choice", "process-group backend", choices=("auto", "gloo", "nccl"))
    num_threads: Optional[int] = _key(None, "int", "torch threads per process (default 1 when distributed)",
                                      optional=True, lo=1)
    output_dir: str = _key("runs/train", "path", "checkpoints and metrics")
    save_every: int = _key(0, "int", "steps between checkpoints; 0: at the end and on a signal", lo=0)
    keep_checkpoints: int = _key(2, "int", "newest checkpoints kept", lo=1)
    log_every: int = _key(10, "int", "steps between metrics records", lo=1)
    resume: Optional[str] = _key(None, "path", "a checkpoint, or auto (the newest intact in output_dir)",
                                 optional=True)
    progress: bool = _key(True, "bool", "progress bar (a line every 30 s when stderr is not a terminal)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Coerce every key to its type and check its range and the keys that depend on each other;
        ValueError naming the key. Builds no model and reads no data."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.metadata))
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"config key 'crop_scale': expected [min, max] with 0 < min <= max <= 1, got "
                             f"{list(self.crop_scale)}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"config key 'betas': expected two values in [0, 1), got {list(self.betas)}")
        if not self.train_jsonl and not self.train_shards:
            raise ValueError("config: set train_jsonl and/or train_shards (the training data)")
        from m2model.config import get_config

        try:
            mcfg = get_config(self.model, **self.model_overrides)
        except (TypeError, ValueError) as e:
            key = "model" if "M2-Encoder size" in str(e) else "model_overrides"
            raise ValueError(f"config key {key!r}: {e}") from None
        if self.context_length is not None and self.context_length > mcfg.max_text_len:
            raise ValueError(f"config key 'context_length': {self.context_length} exceeds the model's "
                             f"max_text_len {mcfg.max_text_len}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop_scale"], d["betas"] = list(self.crop_scale), list(self.betas)
        return d


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _coerce(key: str, value, meta):
    """A value from YAML, JSON, the command line or Python, as the key's type; ValueError otherwise."""
    kind = meta["kind"]

    def fail(expected: str):
        raise ValueError(f"config key {key!r}: expected {expected}, got {value!r}")

    if value is None:
        if meta.get("optional"):
            return None
        fail(f"{_describe(meta)} (null is not allowed here)")
    if kind == "int":
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                fail("an integer")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            fail("an integer")
        out = value
    elif kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 as a string
            try:
                value = float(value)
            except ValueError:
                fail("a number")
        if not _is_number(value) or not math.isfinite(value):
            fail("a finite number")
        out = float(value)
    elif kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        if not isinstance(value, bool):
            fail("true or false")
        return value
    elif kind == "choice":
        if isinstance(value, bool) and "true" in meta["choices"]:
            value = "true" if value else "false"
        if not isinstance(value, str) or value.lower() not in meta["choices"]:
            fail(f"one of {list(meta['choices'])}")
        return value.lower()
    elif kind in ("str", "path"):
        if kind == "path" and _is_number(value):
            value = str(value)  # a file or folder named 2024
        if not isinstance(value, str) or not value.strip():
            fail("a non-empty string")
        return value
    elif kind == "pair":
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
            fail("a list of two numbers, e.g. [0.8, 1.0]")
        return tuple(float(v) for v in value)
    elif kind == "mapping":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            fail("a mapping of names to values, e.g. {width: 128}")
        return dict(value)
    elif kind == "sources":
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
            return list(value)
        fail("a shard pattern or a non-empty list of them")
    else:  # pragma: no cover - a schema error
        raise AssertionError(kind)
    if "lo" in meta and out < meta["lo"]:
        fail(f"{_describe(meta)}")
    if "hi" in meta and out > meta["hi"]:
        fail(f"{_describe(meta)}")
    if "gt" in meta and not out > meta["gt"]:
        fail(f"{_describe(meta)}")
    return out


def _describe(meta) -> str:
    kind = meta["kind"]
    what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "path": "a string", "pair": "two numbers", "mapping": "a mapping", "sources": "a shard pattern",
            "choice": f"one of {list(meta.get('choices', ()))}"}[kind]
    bounds = []
    if "gt" in meta:
        bounds.append(f"> {meta['gt']:g}")
    if "lo" in meta:
        bounds.append(f">= {meta['lo']:g}")
    if "hi" in meta:
        bounds.append(f"<= {meta['hi']:g}")
    return what + (" " + " and ".join(bounds) if bounds else "")


def _read_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"config file {path}: {e.strerror or e}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ValueError(f"config file {path}: cannot parse it ({e})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of TrainConfig keys")
    return data


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """A validated TrainConfig from a JSON/YAML file plus overrides; unknown keys are a ValueError."""
    data = _read_file(path) if path else {}
    data.update(overrides or {})
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
    return TrainConfig(**data)


def parse_value(text: str):
    """A command-line value read as YAML (numbers, booleans, null, lists, mappings), else as a string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_args(argv=None, prog: str = "python -m m2model.train", description: str = "") -> TrainConfig:
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="JSON or YAML file of TrainConfig keys")
    for f in dataclasses.fields(TrainConfig):
        extra = {"nargs": "?", "const": "auto"} if f.name == "resume" else {}  # --resume alone: auto
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # SUPPRESS: only the keys given appear, so "--key null" reaches the schema as None
        ap.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, type=parse_value,
                        metavar="VALUE", help=f"{f.metadata['doc']} (default: {default})", **extra)
    args = vars(ap.parse_args(argv))
    path = args.pop("config")
    if args.get("resume") is True:
        args["resume"] = "auto"
    return load_config(path, args)

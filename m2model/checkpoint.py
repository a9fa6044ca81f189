"""Checkpoints: atomic writing, verification, choosing one to resume from, random-number state, and
loading a model from any checkpoint this library reads (the trainer's, a plain state dict, or an
official M2-Encoder release), which is what evaluation uses.

A trainer checkpoint is a ``torch.save`` dict with ``version``, ``step``, ``world_size``, ``config``
(the training config as a dict), ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``loader`` and
``rng`` (one entry per rank). It is written to ``NAME.tmp.<pid>`` in the same folder, flushed, fsynced
and renamed, so a crash never leaves a torn ``checkpoint-*.pt``; the temporary files of killed runs are
removed when the next run starts.
"""

from __future__ import annotations

import glob
import os
import random
import re
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

CHECKPOINT_VERSION = 1
TRAINER_KEYS = ("version", "step", "world_size", "config", "model", "optimizer", "scheduler", "scaler",
                "loader", "rng")
_TEMP = re.compile(r"^(checkpoint-\d+\.pt)\.tmp\.(\d+)$")


# ------------------------------------------------------------------------------------------- writing
def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace (never a torn file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_checkpoints(folder: str) -> list[str]:
    """``checkpoint-*.pt`` in ``folder``, oldest first (the names hold the zero-padded step)."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), "checkpoint-*.pt")))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder: str) -> list[str]:
    """Remove ``checkpoint-*.pt.tmp.<pid>`` left by runs that were killed while saving (no process
    with that id runs here any more); returns what was removed."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        m = _TEMP.match(name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


# --------------------------------------------------------------------------------------- verification
def verify_checkpoint(path: str) -> str | None:
    """Why ``path`` cannot be a torch checkpoint (None when it looks intact), without loading it:
    torch.save writes a zip archive whose directory is at its end, so a cut file has none, and every
    member must lie inside the file."""
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except FileNotFoundError:
        return "no such file"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a complete torch checkpoint (zip archive unreadable: {e})"
    if not any(i.filename.endswith("data.pkl") for i in infos):
        return "not a torch checkpoint (no data.pkl in the archive)"
    for i in infos:
        if i.header_offset + i.compress_size > size:
            return f"cut short (member {i.filename} ends past the end of the file)"
    return None


def load_trainer_checkpoint(path: str) -> dict:
    """A checkpoint written by the trainer; ValueError naming the file when it is not one."""
    reason = verify_checkpoint(path)
    if reason:
        raise ValueError(f"{path}: {reason}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # UnpicklingError, RuntimeError from the zip reader, ...
        raise ValueError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
    missing = [k for k in TRAINER_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a checkpoint written by m2model.train (missing {missing})")
    return ckpt


def resume_candidates(resume: str | None, output_dir: str) -> list[str]:
    """The checkpoints to try for ``resume``, best first: the path given, or for ``auto`` those in
    ``output_dir``, newest first."""
    if not resume:
        return []
    if resume != "auto":
        if not os.path.isfile(resume):
            raise ValueError(f"resume checkpoint {resume!r} does not exist")
        return [resume]
    return list_checkpoints(output_dir)[::-1]


def load_resume_checkpoint(resume: str | None, output_dir: str) -> tuple[str | None, dict | None, list]:
    """(path, checkpoint, skipped) to resume from. ``auto`` takes the newest intact trainer checkpoint
    in ``output_dir`` and lists in ``skipped`` the newer ones it could not use, with the reason; with
    checkpoints but none intact it is a ValueError naming them. An explicit path must be intact."""
    skipped = []
    candidates = resume_candidates(resume, output_dir)
    for path in candidates:
        try:
            return path, load_trainer_checkpoint(path), skipped
        except ValueError as e:
            if resume != "auto":
                raise
            skipped.append((path, str(e).split(": ", 1)[-1]))
    if skipped:
        raise ValueError(f"--resume auto: no intact checkpoint in {output_dir}; skipped: "
                         + "; ".join(f"{os.path.basename(p)} ({r})" for p, r in skipped))
    return None, None, skipped


# ------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ model loading
def model_config_from_train_config(config: dict):
    """The M2Config a trainer checkpoint's saved training config describes."""
    from .config import get_config

    return get_config(config.get("model", "tiny"), **(config.get("model_overrides") or {}))


def read_checkpoint(path: str):
    """``torch.load`` of a checkpoint file on the CPU; ValueError naming the file and saying what it is
    instead (a text file, a cut archive, ...) when torch cannot load it. The file is unpickled: load only
    checkpoints you trust."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; a checkpoint file was expected here")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # UnpicklingError, RuntimeError from the zip reader, EOFError, ...
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"PK"):  # torch.save's zip archive: say what is wrong with it
            why = verify_checkpoint(path) or f"cannot be loaded ({type(e).__name__}: {e})"
        elif head.startswith(b"\x80"):  # a pickle stream (torch's legacy format)
            why = f"cannot be loaded ({type(e).__name__}: {e})"
        else:
            why = f"not a torch checkpoint (it starts with {head!r}; torch.save writes a zip archive)"
        raise ValueError(f"{path}: {why}") from None


def is_trainer_checkpoint(ckpt) -> bool:
    return isinstance(ckpt, dict) and all(k in ckpt for k in TRAINER_KEYS)


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read: the model (in eval mode), the kind of checkpoint (``trainer``,
    ``state_dict`` or ``official``), the file, and for trainer checkpoints the saved training config."""

    model: torch.nn.Module
    kind: str
    path: str
    train_config: dict | None = None


def _config_arg(config):
    from .config import M2Config, get_config

    if config is None or isinstance(config, M2Config):
        return config
    if isinstance(config, str):
        return get_config(config)
    raise TypeError(f"config must be a size name or an M2Config, got {type(config).__name__}")


def load_checkpoint(checkpoint: str, config=None, device="cpu", dtype=None) -> LoadedCheckpoint:
    """Load any checkpoint this library reads:

    * a trainer checkpoint, or a run folder (its newest intact checkpoint): the model its saved training
      config describes (``model`` and ``model_overrides``); ``config``, when given, must describe the same
      model (ValueError naming the fields that differ);
    * an official M2-Encoder checkpoint (recognised by its ``backbone.`` keys), converted strictly; its
      size from ``config`` or, when None, from the checkpoint (:func:`m2model.convert.infer_config`);
    * a state dict of this library (optionally under ``model`` / ``state_dict``): ``config`` required.

    ``dtype``: of the parameters; None keeps the model's (float32; a 16-bit official file is converted,
    as the official loader does), ``"checkpoint"`` keeps an official file's stored dtype.
    """
    path, ckpt = _read_any(str(checkpoint))
    return _build(ckpt, path, _config_arg(config), device, dtype)


def _read_any(path: str):
    """(file, loaded object) of a checkpoint file or a run folder (its newest intact checkpoint)."""
    if not os.path.isdir(path):
        return path, read_checkpoint(path)
    found, ckpt, skipped = load_resume_checkpoint("auto", path)
    if found is None:
        raise ValueError(f"no checkpoint-*.pt in {path}")
    for p, reason in skipped:
        print(f"skipped {p}: {reason}", file=sys.stderr)
    return found, ckpt


def _build(ckpt, path: str, cfg, device, dtype) -> LoadedCheckpoint:
    from .convert import load_official_checkpoint, unwrap_checkpoint
    from .modeling import M2Encoder

    train_config = None
    if is_trainer_checkpoint(ckpt):
        kind, train_config = "trainer", ckpt["config"]
        saved = model_config_from_train_config(train_config)
        if cfg is not None and cfg != saved:
            diff = [f"{f}: {getattr(saved, f)!r} saved, {getattr(cfg, f)!r} given"
                    for f in saved.__dataclass_fields__ if getattr(saved, f) != getattr(cfg, f)]
            raise ValueError(f"{path} holds its training config (model {train_config.get('model')!r}, "
                             f"model_overrides {train_config.get('model_overrides') or {}}); the config "
                             f"given describes another model ({'; '.join(diff)}): leave it out")
        model = M2Encoder(saved)
        _load_exact(model, ckpt["model"], path)
    else:
        try:
            sd = unwrap_checkpoint(ckpt)
        except TypeError as e:
            raise ValueError(f"{path}: {e}") from None
        if any(k.startswith("backbone.") for k in sd):
            kind = "official"
            model, report = load_official_checkpoint(ckpt, cfg, strict=True, dtype=dtype)
            print(f"converted official checkpoint; dropped {len(report.dropped)} unused tensors",
                  file=sys.stderr)
        else:
            kind = "state_dict"
            if cfg is None:
                raise ValueError(f"{path} is a bare state dict, which does not say which model it is: "
                                 f"pass its size (--config)")
            model = M2Encoder(cfg)
            _load_exact(model, sd, path)
    if dtype not in (None, "checkpoint"):
        model.to(dtype)
    return LoadedCheckpoint(model.to(device).eval(), kind, path, train_config)


def _load_exact(model, sd: dict, path: str) -> None:
    """load_state_dict (copying into the model's own dtype) with a ValueError naming the file."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match M2Encoder({model.cfg}): missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")


def tokenizer_for(loaded: LoadedCheckpoint, name: str | None = None):
    """The tokenizer to evaluate ``loaded`` with: ``name`` when given, else a trainer checkpoint's own
    (its saved ``tokenizer`` and ``context_length``), else bert-base-chinese for this library's state
    dicts. Official checkpoints need their GLM SentencePiece model named (it is not bundled). The
    tokenizer's vocabulary must match the model's (ValueError otherwise), so that a wrong tokenizer fails
    here instead of scoring garbage."""
    from .tokenizers import get_tokenizer, require_vocab_match

    model = loaded.model
    context = model.cfg.max_text_len
    if name is None:
        if loaded.kind == "official":
            raise ValueError(
                f"{loaded.path} is an official M2-Encoder checkpoint ({model.cfg.vocab_size:,}-entry "
                f"vocabulary): name its tokenizer, the GLM SentencePiece model sp.model shipped with the "
                f"official code (--tokenizer path/to/sp.model)")
        if loaded.kind == "trainer":
            name = loaded.train_config.get("tokenizer", "bert-base-chinese")
            context = loaded.train_config.get("context_length") or context
        else:
            name = "bert-base-chinese"
    tokenizer = get_tokenizer(name, context_length=context)
    require_vocab_match(tokenizer, model.cfg.vocab_size, f"the model of {loaded.path}")
    return tokenizer


def load_trained(checkpoint: str, device: str = "cpu"):
    """(model, tokenizer, training config dict) from a trainer checkpoint or its run folder (the
    newest intact checkpoint there)."""
    path, ckpt = _read_any(str(checkpoint))
    if not is_trainer_checkpoint(ckpt):
        missing = [k for k in TRAINER_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise ValueError(f"{path}: not a checkpoint written by m2model.train (missing {missing})")
    loaded = _build(ckpt, path, None, device, None)
    return loaded.model, tokenizer_for(loaded), loaded.train_config


def load_model(checkpoint: str, config=None, device="cpu", dtype=None):
    """The :class:`M2Encoder` of any checkpoint :func:`load_checkpoint` reads."""
    return load_checkpoint(checkpoint, config, device, dtype).model

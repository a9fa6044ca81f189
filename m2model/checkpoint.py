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


def load_trained(checkpoint: str, device: str = "cpu"):
    """(model, tokenizer, training config dict) from a trainer checkpoint or its run folder (the
    newest intact checkpoint there)."""
    from .modeling import M2Encoder
    from .tokenizers import get_tokenizer

    if os.path.isdir(checkpoint):
        path, ckpt, skipped = load_resume_checkpoint("auto", checkpoint)
        if path is None:
            raise ValueError(f"no checkpoint-*.pt in {checkpoint}")
        for p, reason in skipped:
            print(f"skipped {p}: {reason}", file=sys.stderr)
    else:
        ckpt = load_trainer_checkpoint(checkpoint)
    config = ckpt["config"]
    model = M2Encoder(model_config_from_train_config(config))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    tokenizer = get_tokenizer(config.get("tokenizer", "bert-base-chinese"),
                              context_length=config.get("context_length") or model.cfg.max_text_len)
    return model, tokenizer, config


def load_model(checkpoint: str, config=None, device="cpu"):
    """An :class:`M2Encoder` from a state dict of this library (optionally under ``model`` /
    ``state_dict``; ``config`` required) or from an official checkpoint (recognised by its
    ``backbone.`` keys and converted strictly)."""
    from .config import get_config
    from .convert import load_official_checkpoint, unwrap_checkpoint
    from .modeling import M2Encoder

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    sd = unwrap_checkpoint(ckpt)
    if any(k.startswith("backbone.") for k in sd):
        cfg = get_config(config) if isinstance(config, str) else config
        model, report = load_official_checkpoint(sd, cfg, strict=True)
        print(f"converted official checkpoint; dropped {len(report.dropped)} unused tensors", file=sys.stderr)
    else:
        if config is None:
            raise ValueError("--config is required for checkpoints in this library's format")
        cfg = get_config(config) if isinstance(config, str) else config
        model = M2Encoder(cfg)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match config {config!r}: missing {missing[:10]}, "
                f"unexpected {unexpected[:10]}"
            )
    return model.to(device).eval()

"""open_clip's trainer (``open_clip_train.main``) with the m2kernels loss.

    python -m m2kernels.integrations.open_clip_train <open_clip_train arguments> [--m2-mode MODE]
        [--m2-group-size N]
    torchrun --nproc-per-node 8 -m m2kernels.integrations.open_clip_train <the same arguments>

The trainer is open_clip_train itself, unchanged: this module removes its own ``--m2-*`` options
from the command line, replaces the loss factory that ``open_clip_train.main`` calls
(``create_loss(args)``) by :func:`create_loss` for the duration of the run, and calls
``open_clip_train.main.main`` with the remaining arguments. The loss is ``m2kernels.ClipLoss``
built from open_clip's arguments (``--local-loss``, ``--gather-with-grad``, the rank and world size),
or ``m2kernels.SigLipLoss`` with ``--siglip``:

* no ``--m2-mode``: open_clip's ``local_loss`` / ``gather_with_grad`` semantics, exactly;
* ``--m2-mode global|ring|hierarchical``: the exact loss of the global batch over the process group,
  each rank returning its share (``--local-loss`` / ``--gather-with-grad`` are then ignored);
* ``--m2-mode grouped --m2-group-size N``: InfoNCE within sub-groups of N consecutive ranks, a
  different (cheaper) objective unless N is the world size.

See docs/integrations.md (and docs/distributed.md for the modes).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from m2kernels.distributed import MODES

PROG = "python -m m2kernels.integrations.open_clip_train"
_SUBGROUP_MODES = ("hierarchical", "grouped")

_HELP = f"""\
m2kernels options (removed before the arguments reach open_clip_train):
  --m2-mode {{{','.join(MODES)}}}
                        build the loss with m2kernels' distributed mode: global, ring and
                        hierarchical compute the exact loss of the global batch (each rank returns its
                        share; --local-loss/--gather-with-grad are ignored); grouped is InfoNCE within
                        sub-groups of --m2-group-size consecutive ranks (a different objective unless
                        the sub-group is the whole world). Without it: open_clip's --local-loss /
                        --gather-with-grad semantics, exactly.
  --m2-group-size N     ranks per sub-group for --m2-mode hierarchical or grouped (default: the ranks
                        of one node, LOCAL_WORLD_SIZE, which torchrun sets)
"""


class UsageError(ValueError):
    """A bad ``--m2-*`` option, or an open_clip_train option this integration cannot serve."""


class IntegrationError(RuntimeError):
    """open_clip_train (or a part of m2kernels it needs) is missing or not laid out as expected."""


@dataclass(frozen=True)
class M2Options:
    """The ``--m2-*`` options: ``mode`` (None: open_clip's semantics) and ``group_size``."""

    mode: Optional[str] = None
    group_size: Optional[int] = None

    def __post_init__(self):
        if self.mode is not None and self.mode not in MODES:
            raise UsageError(f"--m2-mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.group_size is not None:
            size = self.group_size
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise UsageError(f"--m2-group-size must be a positive integer; got {self.group_size!r}")
            if self.mode not in _SUBGROUP_MODES:
                raise UsageError(f"--m2-group-size applies to --m2-mode hierarchical or grouped; got "
                                 f"--m2-mode {self.mode}" if self.mode else
                                 "--m2-group-size applies to --m2-mode hierarchical or grouped; "
                                 "no --m2-mode was given")


_FLAGS = {"--m2-mode": "mode", "--m2-group-size": "group_size"}


def split_args(argv: Sequence[str]) -> tuple[M2Options, list[str]]:
    """Separates the ``--m2-*`` options (``--m2-mode X`` or ``--m2-mode=X``) from open_clip_train's.

    Returns the options and the remaining arguments, in their order. An unknown ``--m2-*`` option, a
    missing or bad value, or a repeated option raises :class:`UsageError`.
    """
    values: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        if not (isinstance(token, str) and token.startswith("--m2-")):
            rest.append(token)
            i += 1
            continue
        flag, eq, value = token.partition("=")
        if flag not in _FLAGS:
            raise UsageError(f"unknown option {flag}; the m2kernels options are {', '.join(_FLAGS)}")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UsageError(f"{flag} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if flag in values:
            raise UsageError(f"{flag} was given twice ({values[flag]!r} and {value!r})")
        values[flag] = value
    mode = values.get("--m2-mode")
    group_size = values.get("--m2-group-size")
    if group_size is not None:
        try:
            group_size = int(group_size)
        except ValueError:
            raise UsageError(f"--m2-group-size must be a positive integer; got {group_size!r}") from None
    return M2Options(mode=mode, group_size=group_size), rest


# ---------------------------------------------------------------------------------------------------
# torchvision beside a torch it was not built for

_STUB_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_stub_library = None  # the torch.library.Library of the stubs: its registrations live as long as it


def _torchvision_op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def register_torchvision_stub_ops() -> list[str]:
    """Defines the schemas ``torchvision::nms`` and ``torchvision::qnms`` where they do not exist.

    torchvision registers fake (meta) kernels for these two operators at import time, which fails when
    its compiled operators could not be loaded (a torchvision wheel built for another torch, such as
    the CUDA build beside a CPU torch). With the schemas defined it imports; the two operators then
    raise ``NotImplementedError`` when called (open_clip's training does not call them). Returns the
    names defined now (empty when both exist already).
    """
    global _stub_library
    missing = [name for name in _STUB_SCHEMAS if not _torchvision_op_exists(name)]
    if not missing:
        return []
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_STUB_SCHEMAS[name])

        def stub(*args, _name=name, **kwargs):
            raise NotImplementedError(
                f"torchvision::{_name} is a stub: torchvision's compiled operators do not load beside "
                f"torch {torch.__version__}; install the torchvision build made for this torch")

        lib.impl(name, stub, "CompositeExplicitAutograd")
    _stub_library = (_stub_library or ()) + (lib,)
    return missing


def import_torchvision():
    """``import torchvision``; where it fails only for want of its compiled ``nms``/``qnms``
    operators, registers stub schemas for them (:func:`register_torchvision_stub_ops`), warns and
    imports again. Other failures propagate."""
    try:
        import torchvision

        return torchvision
    except RuntimeError as e:
        if not any(f"torchvision::{name}" in str(e) for name in _STUB_SCHEMAS):
            raise
        reason = str(e)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-initialised package of the failed import
    defined = register_torchvision_stub_ops()
    import torchvision

    warnings.warn(f"torchvision {torchvision.__version__} could not load its compiled operators beside "
                  f"torch {torch.__version__} ({reason}); registered stub schemas for "
                  f"{', '.join('torchvision::' + n for n in defined) or 'nothing'} so that it imports. "
                  "Calling those operators raises.", RuntimeWarning, stacklevel=2)
    return torchvision


# ---------------------------------------------------------------------------------------------------
# the loss factory

def check_args(args) -> None:
    """Rejects open_clip_train arguments whose loss m2kernels does not provide: :class:`UsageError`
    for Horovod, distillation and CoCa, :class:`IntegrationError` for ``--siglip`` without
    ``m2kernels.SigLipLoss``.

    ``args`` is open_clip_train's parsed namespace (``open_clip_train.params.parse_args``)."""
    if getattr(args, "horovod", False):
        raise UsageError("--horovod is not supported by m2kernels' losses (they use torch.distributed "
                         "process groups); launch with torchrun instead")
    if getattr(args, "distill", False) or (getattr(args, "distill_model", None) is not None
                                           and getattr(args, "distill_pretrained", None) is not None):
        raise UsageError("--distill-model: m2kernels has no distillation loss; run open_clip_train "
                         "itself (python -m open_clip_train.main) for distillation")
    if "coca" in str(getattr(args, "model", "")).lower():
        raise UsageError(f"--model {args.model}: CoCa's captioning loss is not in m2kernels; run "
                         "open_clip_train itself (python -m open_clip_train.main) for CoCa")
    if getattr(args, "siglip", False):
        _siglip_class()


def _siglip_class():
    import m2kernels

    cls = getattr(m2kernels, "SigLipLoss", None)
    if cls is None:
        raise IntegrationError(f"--siglip needs m2kernels.SigLipLoss, which this m2kernels "
                               f"({getattr(m2kernels, '__version__', 'unknown version')}) does not have; "
                               "upgrade m2kernels, or run open_clip_train itself "
                               "(python -m open_clip_train.main) for SigLIP")
    return cls


def loss_keywords(options: M2Options, world_size: int) -> dict:
    """The keyword options of the m2kernels loss for ``options`` in a world of ``world_size`` ranks.

    With a mode and a single, non-distributed process the loss is the single-process one (every mode
    is then the exact loss of the one batch), since the modes need an initialised process group."""
    import torch.distributed as dist

    if options.mode is None:
        return {}
    if world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        if options.group_size not in (None, 1):
            raise UsageError(f"--m2-group-size {options.group_size} does not divide the world size 1")
        return {}
    kwargs = {"mode": options.mode}
    if options.group_size is not None:
        kwargs["group_size"] = options.group_size
    return kwargs


def create_loss(args, options: M2Options = M2Options()):
    """The m2kernels loss for open_clip_train's parsed ``args``: what ``open_clip.create_loss(args)``
    builds, with ``m2kernels.ClipLoss`` (or ``m2kernels.SigLipLoss`` for ``--siglip``) and the
    ``--m2-*`` options. ``args.rank`` / ``args.world_size`` are those open_clip_train set up."""
    import m2kernels

    check_args(args)
    kwargs = loss_keywords(options, args.world_size)
    if args.siglip:
        cls = _siglip_class()
        loss = cls(rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl, **kwargs)
        desc = (f"m2kernels.SigLipLoss(rank={args.rank}, world_size={args.world_size}, "
                f"dist_impl={args.loss_dist_impl!r}")
    else:
        loss = m2kernels.ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                                  cache_labels=True, rank=args.rank, world_size=args.world_size,
                                  use_horovod=args.horovod, **kwargs)
        desc = (f"m2kernels.ClipLoss(local_loss={args.local_loss}, gather_with_grad={args.gather_with_grad}, "
                f"rank={args.rank}, world_size={args.world_size}")
    desc += "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")"
    if options.mode is not None and not kwargs:
        desc += f" (single process: --m2-mode {options.mode} is the loss of the one batch)"
    if args.rank == 0:
        logging.info(f"Loss: {desc}")
        if options.mode is not None and (args.local_loss or args.gather_with_grad):
            logging.warning(f"--m2-mode {options.mode}: --local-loss and --gather-with-grad are ignored (the "
                            "mode defines how the loss is distributed)")
    return loss


# ---------------------------------------------------------------------------------------------------
# open_clip_train

def load_trainer():
    """``open_clip_train.main``, checked to build its loss through a module-level ``create_loss(args)``."""
    try:
        import_torchvision()
    except ImportError as e:
        raise IntegrationError(f"torchvision is not importable ({e}); open_clip_train needs it: install "
                               "open_clip_torch[training] (or the torchvision built for your torch)") from e
    try:
        import open_clip_train.main as trainer
    except ImportError as e:
        raise IntegrationError(f"open_clip_train is not importable ({e}); it is installed with open_clip: "
                               "pip install 'open_clip_torch[training]'") from e
    main = getattr(trainer, "main", None)
    factory = getattr(trainer, "create_loss", None)
    code = getattr(main, "__code__", None)
    if not callable(main) or not callable(factory) or code is None or "create_loss" not in code.co_names:
        try:
            version = importlib.metadata.version("open_clip_torch")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
        raise IntegrationError(
            f"open_clip_train.main (open_clip_torch {version}) no longer builds its loss with a module-level "
            "create_loss(args) called from main(); this integration replaces that factory and needs "
            "updating for this open_clip version (it was written for open_clip_torch 3.x)")
    return trainer


@contextlib.contextmanager
def m2kernels_loss(options: M2Options = M2Options(), trainer=None) -> Iterator[None]:
    """Within the block, ``open_clip_train.main`` builds its loss with :func:`create_loss`."""
    trainer = load_trainer() if trainer is None else trainer
    original = trainer.create_loss

    def factory(args):
        return create_loss(args, options)

    trainer.create_loss = factory
    try:
        yield
    finally:
        trainer.create_loss = original


def main(argv: Optional[Sequence[str]] = None):
    """Runs ``open_clip_train.main.main`` on ``argv`` (default ``sys.argv[1:]``) without its ``--m2-*``
    options, with the m2kernels loss. Returns what open_clip_train's ``main`` returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options, rest = split_args(argv)
    trainer = load_trainer()
    if "-h" in rest or "--help" in rest:
        print(f"usage: {PROG} <open_clip_train arguments> [--m2-mode MODE] [--m2-group-size N]\n\n{_HELP}\n"
              "open_clip_train's arguments:")
        sys.stdout.flush()
    from open_clip_train.params import parse_args

    check_args(parse_args(rest))  # fail before the model and the data are built
    with m2kernels_loss(options, trainer):
        return trainer.main(rest)


def cli(argv: Optional[Sequence[str]] = None) -> None:
    try:
        rc = main(argv)
    except (UsageError, IntegrationError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(1 if isinstance(rc, int) and rc != 0 else 0)


if __name__ == "__main__":
    cli()

"""open_clip's own trainer with the m2kernels loss (``m2kernels.integrations.open_clip_train``).

The end-to-end tests run ``open_clip_train.main`` itself for one epoch of 20 steps on a tiny learnable
image-text set (tests/open_clip_train_utils.py), once with open_clip's loss and once through the
integration, in 1 and 2 gloo processes, and compare the loss of every step: in fp32 the two curves
agree to 1e-5 relative for all four ``--local-loss`` / ``--gather-with-grad`` combinations and the
exact ``--m2-mode``s; under ``--precision amp_bf16`` the m2kernels loss must be at least as close to
a float64 evaluation of the same features as open_clip's.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import m2kernels
from m2kernels.integrations import open_clip_train as integration
from m2kernels.integrations.open_clip_train import IntegrationError, M2Options, UsageError
from tests.open_clip_train_utils import GLOBAL_BATCH, STEPS, Run, make_dataset, train, write_model_config

RTOL = 1e-5  # fp32: per step, between the two curves and against the float64 loss of the features
COMBOS = list(itertools.product([False, True], [False, True]))  # (local_loss, gather_with_grad)
HAS_SIGLIP = hasattr(m2kernels, "SigLipLoss")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(local_loss, gather_with_grad):
    return (["--local-loss"] if local_loss else []) + (["--gather-with-grad"] if gather_with_grad else [])


def _tag(local_loss, gather_with_grad):
    return f"ll{int(local_loss)}-gg{int(gather_with_grad)}"


def _max_rel(a, b):
    assert len(a) == len(b) == STEPS, (len(a), len(b))
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _errors(run):
    """Per-step relative distance of a run's loss to the float64 loss of its own features."""
    (kind, *_) = run["references"]
    return [abs(x - r) / r for x, r in zip(run["losses"], run["references"][kind])]


# ---------------------------------------------------------------------------------------------------
# runs of open_clip_train (module-scoped: each spawn runs several trainings in a row)

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip_train")
    return make_dataset(str(root / "data")), write_model_config(str(root / "model"))


@pytest.fixture(scope="module")
def one_rank(assets):
    runs = [Run("stock", "stock"), Run("m2", "m2"),
            Run("stock-amp", "stock", precision="amp_bf16"), Run("m2-amp", "m2", precision="amp_bf16")]
    return train(1, runs, *assets)


@pytest.fixture(scope="module")
def two_ranks(assets):
    runs = []
    for ll, gg in COMBOS:
        refs = ("share",) if ll else ("full",)
        runs += [Run(f"stock-{_tag(ll, gg)}", "stock", _flags(ll, gg), references=refs),
                 Run(f"m2-{_tag(ll, gg)}", "m2", _flags(ll, gg), references=refs)]
    runs += [Run(f"m2-{mode}", "m2", ["--m2-mode", mode], references=("share",))
             for mode in ("global", "ring")]
    runs += [Run("stock-amp", "stock", precision="amp_bf16"), Run("m2-amp", "m2", precision="amp_bf16")]
    # Last: it creates a sub-group, which m2kernels caches for the process group it was made in.
    runs += [Run("m2-grouped1", "m2", ["--m2-mode", "grouped", "--m2-group-size", "1"],
                 references=("grouped:1", "share"))]
    return train(2, runs, *assets)


def _check_types(result, stock, m2):
    assert result[stock]["loss_type"] == "open_clip.loss.ClipLoss"
    assert result[m2]["loss_type"] == "m2kernels.modules.ClipLoss"


def test_dataset_is_learnt(one_rank):
    """The curves compared below move: 20 steps on the synthetic pairs lower the loss clearly, and
    below chance (log of the batch size), so the model matches images to captions."""
    losses = one_rank[0]["stock"]["losses"]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first and last < 0.7 * math.log(GLOBAL_BATCH), losses


def test_fp32_one_process(one_rank):
    result = one_rank[0]
    _check_types(result, "stock", "m2")
    assert _max_rel(result["m2"]["losses"], result["stock"]["losses"]) <= RTOL
    for name in ("stock", "m2"):
        assert max(_errors(result[name])) <= RTOL, name


@pytest.mark.parametrize("local_loss,gather_with_grad", COMBOS)
def test_fp32_two_ranks(two_ranks, local_loss, gather_with_grad):
    """open_clip's semantics without --m2-mode: the value every rank reports, step by step."""
    tag = _tag(local_loss, gather_with_grad)
    for rank, result in enumerate(two_ranks):
        _check_types(result, f"stock-{tag}", f"m2-{tag}")
        stock, m2 = result[f"stock-{tag}"], result[f"m2-{tag}"]
        assert _max_rel(m2["losses"], stock["losses"]) <= RTOL, rank
        # What each rank reports (the full loss, or its share with --local-loss), for both.
        assert max(_errors(stock)) <= RTOL and max(_errors(m2)) <= RTOL, rank
    if local_loss:  # the shares differ between ranks; their mean is the global loss
        assert two_ranks[0][f"m2-{tag}"]["losses"] != two_ranks[1][f"m2-{tag}"]["losses"]


@pytest.mark.parametrize("mode", ["global", "ring"])
def test_exact_modes_match_local_loss_gather_with_grad(two_ranks, mode):
    """--m2-mode global/ring: each rank's share of the exact loss, trained with its exact gradient,
    which is what open_clip computes with --local-loss --gather-with-grad."""
    for rank, result in enumerate(two_ranks):
        _check_types(result, "stock-ll1-gg1", f"m2-{mode}")
        assert _max_rel(result[f"m2-{mode}"]["losses"], result["stock-ll1-gg1"]["losses"]) <= RTOL, rank
        assert max(_errors(result[f"m2-{mode}"])) <= RTOL, rank


def test_grouped_mode_is_its_own_objective(two_ranks):
    """--m2-mode grouped --m2-group-size 1 on 2 ranks: each rank's InfoNCE over its own batch, below
    the global share of the same features (fewer negatives)."""
    for rank, result in enumerate(two_ranks):
        run = result["m2-grouped1"]
        assert run["loss_type"] == "m2kernels.modules.ClipLoss"
        assert max(_errors(run)) <= RTOL, rank
        own, share = run["references"]["grouped:1"], run["references"]["share"]
        assert all(g < s for g, s in zip(own, share)), (own, share)
        assert max((s - g) / s for g, s in zip(own, share)) > 1e-2


def _m2_loss_follows_autocast() -> bool:
    """Whether m2kernels.ClipLoss computes at autocast's bfloat16 rather than in float32 (its value
    for the same bfloat16 features changes when autocast is on)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=-1).bfloat16()
    y = torch.nn.functional.normalize(x.float() + 0.5 * torch.randn(64, 32, generator=g), dim=-1).bfloat16()
    scale = torch.tensor(14.0)
    plain = float(m2kernels.ClipLoss()(x, y, scale))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = float(m2kernels.ClipLoss()(x, y, scale))
    return abs(autocast - plain) > 1e-5 * abs(plain)


AMP_XFAIL = pytest.mark.xfail(
    _m2_loss_follows_autocast(), strict=True, raises=AssertionError,
    reason="m2kernels.ClipLoss computes in bfloat16 under autocast (not yet in float32), so its loss is "
           "further from the float64 loss than open_clip's")


@AMP_XFAIL
@pytest.mark.parametrize("world_size", [1, 2])
def test_amp_bf16_at_least_as_close_to_float64(request, world_size):
    """--precision amp_bf16: each implementation's loss against the float64 loss of the features it
    was given, at each step; m2kernels' must be at least as close as open_clip's (mean and worst)."""
    results = request.getfixturevalue("one_rank" if world_size == 1 else "two_ranks")
    for rank, result in enumerate(results):
        _check_types(result, "stock-amp", "m2-amp")
        stock, m2 = _errors(result["stock-amp"]), _errors(result["m2-amp"])
        assert len(stock) == len(m2) == STEPS
        assert sum(m2) <= sum(stock) and max(m2) <= max(stock), (rank, max(m2), max(stock))


@pytest.mark.skipif(not HAS_SIGLIP, reason="m2kernels.SigLipLoss does not exist in this m2kernels")
@pytest.mark.parametrize("world_size", [1, 2])
def test_siglip_fp32(assets, world_size):
    runs = [Run("stock", "stock", ["--siglip"], references=()), Run("m2", "m2", ["--siglip"], references=())]
    for rank, result in enumerate(train(world_size, runs, *assets)):
        assert result["stock"]["loss_type"] == "open_clip.loss.SigLipLoss"
        m2_type = result["m2"]["loss_type"]
        assert m2_type.startswith("m2kernels.") and m2_type.endswith("SigLipLoss"), m2_type
        assert _max_rel(result["m2"]["losses"], result["stock"]["losses"]) <= RTOL, rank


# ---------------------------------------------------------------------------------------------------
# the options, the loss factory and the errors (no training)

def _parse(argv, rank=0, world_size=1):
    from open_clip_train.params import parse_args

    args = parse_args(argv)
    args.rank, args.world_size = rank, world_size  # what open_clip_train's init_distributed_device sets
    return args


def test_split_args():
    options, rest = integration.split_args(
        ["--model", "ViT-B-32", "--m2-mode", "grouped", "--local-loss", "--m2-group-size=4", "--name", "x"])
    assert options == M2Options(mode="grouped", group_size=4)
    assert rest == ["--model", "ViT-B-32", "--local-loss", "--name", "x"]
    assert integration.split_args(["--m2-mode=ring"]) == (M2Options(mode="ring"), [])
    assert integration.split_args(["--batch-size", "8"]) == (M2Options(), ["--batch-size", "8"])


@pytest.mark.parametrize("argv,message", [
    (["--m2-mode", "bogus"], "--m2-mode must be one of global, ring, hierarchical, grouped"),
    (["--m2-mode"], "--m2-mode needs a value"),
    (["--m2-mode", "--local-loss"], "--m2-mode needs a value"),
    (["--m2-modes", "global"], "unknown option --m2-modes"),
    (["--m2-mode", "global", "--m2-mode", "ring"], "--m2-mode was given twice"),
    (["--m2-mode", "grouped", "--m2-group-size", "0"], "--m2-group-size must be a positive integer"),
    (["--m2-mode", "grouped", "--m2-group-size", "two"], "--m2-group-size must be a positive integer"),
    (["--m2-group-size", "2"], "--m2-group-size applies to --m2-mode hierarchical or grouped"),
    (["--m2-mode", "ring", "--m2-group-size", "2"], "got --m2-mode ring"),
])
def test_split_args_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        integration.split_args(argv)


def test_modes_are_the_librarys():
    from m2kernels.distributed import MODES

    assert integration.MODES == MODES


@pytest.mark.parametrize("local_loss,gather_with_grad", COMBOS)
def test_create_loss_keeps_open_clip_arguments(local_loss, gather_with_grad):
    loss = integration.create_loss(_parse(_flags(local_loss, gather_with_grad), rank=1, world_size=2))
    assert type(loss) is m2kernels.ClipLoss
    assert (loss.local_loss, loss.gather_with_grad, loss.rank, loss.world_size, loss.cache_labels) == (
        local_loss, gather_with_grad, 1, 2, True)
    assert loss.mode is None and loss.group_size is None


def test_create_loss_modes():
    loss = integration.create_loss(_parse([], world_size=4), M2Options(mode="ring"))
    assert (loss.mode, loss.group_size, loss.world_size) == ("ring", None, 4)
    loss = integration.create_loss(_parse([], world_size=4), M2Options(mode="grouped", group_size=2))
    assert (loss.mode, loss.group_size) == ("grouped", 2)
    # One process without a process group: every mode is the loss of the one batch.
    loss = integration.create_loss(_parse([]), M2Options(mode="hierarchical"))
    assert loss.mode is None
    with pytest.raises(UsageError, match="--m2-group-size 2 does not divide the world size 1"):
        integration.create_loss(_parse([]), M2Options(mode="grouped", group_size=2))


@pytest.mark.parametrize("argv,message", [
    (["--horovod"], "--horovod is not supported"),
    (["--distill-model", "ViT-B-32", "--distill-pretrained", "openai"], "--distill-model: m2kernels has no"),
    (["--model", "coca_ViT-B-32"], "CoCa's captioning loss is not in m2kernels"),
])
def test_unsupported_trainer_arguments(argv, message):
    with pytest.raises(UsageError, match=message):
        integration.create_loss(_parse(argv))


def test_siglip_needs_m2kernels_siglip(monkeypatch):
    monkeypatch.delattr(m2kernels, "SigLipLoss", raising=False)
    with pytest.raises(IntegrationError, match=r"--siglip needs m2kernels\.SigLipLoss"):
        integration.create_loss(_parse(["--siglip"]))


@pytest.mark.skipif(not HAS_SIGLIP, reason="m2kernels.SigLipLoss does not exist in this m2kernels")
def test_siglip_builds_m2kernels_siglip():
    loss = integration.create_loss(_parse(["--siglip"], rank=1, world_size=2))
    assert isinstance(loss, m2kernels.SigLipLoss)


def test_missing_open_clip_train(monkeypatch):
    monkeypatch.setattr(integration, "import_torchvision", lambda: None)
    monkeypatch.setitem(sys.modules, "open_clip_train", None)
    monkeypatch.setitem(sys.modules, "open_clip_train.main", None)
    with pytest.raises(IntegrationError, match="open_clip_train is not importable"):
        integration.load_trainer()


def _fake_trainer(monkeypatch, with_factory: bool, calls_factory: bool):
    package, module = types.ModuleType("open_clip_train"), types.ModuleType("open_clip_train.main")
    body = "def main(args):\n    return create_loss(args)\n" if calls_factory else \
        "def main(args):\n    return build_the_loss_elsewhere(args)\n"
    exec(body, module.__dict__)  # main's globals are the module's, as in open_clip_train.main
    if with_factory:
        module.create_loss = lambda args: None
    package.main = module
    monkeypatch.setattr(integration, "import_torchvision", lambda: None)
    monkeypatch.setitem(sys.modules, "open_clip_train", package)
    monkeypatch.setitem(sys.modules, "open_clip_train.main", module)
    return module


@pytest.mark.parametrize("with_factory,calls_factory", [(False, True), (True, False)])
def test_moved_loss_factory(monkeypatch, with_factory, calls_factory):
    _fake_trainer(monkeypatch, with_factory, calls_factory)
    with pytest.raises(IntegrationError, match="no longer builds its loss with a module-level create_loss"):
        integration.load_trainer()


def test_factory_replaced_only_during_the_run(monkeypatch):
    trainer = _fake_trainer(monkeypatch, True, True)
    original = trainer.create_loss
    assert integration.load_trainer() is trainer
    with integration.m2kernels_loss(M2Options(mode="global"), trainer):
        loss = trainer.main(_parse([], world_size=2))
        assert type(loss) is m2kernels.ClipLoss and loss.mode == "global"
    assert trainer.create_loss is original
    with pytest.raises(KeyError), integration.m2kernels_loss(M2Options(), trainer):
        raise KeyError("a failing run")
    assert trainer.create_loss is original


# ---------------------------------------------------------------------------------------------------
# the command line, in fresh interpreters

def _python(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def test_cli_rejects_bad_option():
    proc = _python("-m", "m2kernels.integrations.open_clip_train", "--m2-mode", "bogus", "--batch-size", "8")
    assert proc.returncode == 2, proc.stderr
    assert "error: --m2-mode must be one of global, ring, hierarchical, grouped; got 'bogus'" in proc.stderr


def test_cli_help_and_torchvision_in_a_fresh_interpreter():
    """torchvision imports (with stub schemas where its wheel does not fit this torch, whose operators
    then raise a clear error), and --help lists the m2kernels options and open_clip_train's own."""
    code = (
        "import torch\n"
        "from m2kernels.integrations.open_clip_train import cli, import_torchvision\n"
        "import_torchvision()\n"
        "try:\n"
        "    torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
        "    print('torchvision ops: real')\n"
        "except NotImplementedError as e:\n"
        "    assert 'is a stub' in str(e), e\n"
        "    print('torchvision ops: stub')\n"
        "cli(['--help'])\n"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    first, rest = proc.stdout.split("\n", 1)
    assert first in ("torchvision ops: real", "torchvision ops: stub")
    assert "--m2-mode" in rest and "--m2-group-size" in rest
    assert "--train-data" in rest and "--local-loss" in rest  # open_clip_train's own

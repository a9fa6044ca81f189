"""GBAAccumulator: batch accumulation must give the gradients of the loss on the concatenated batch."""

from __future__ import annotations

import copy
import os
import random
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m2kernels import ClipLoss, clip_loss_ref
from m2kernels.distributed import GBAAccumulator

D_IMG, D_TXT, D_EMB = 6, 5, 8


class TwoTower(nn.Module):
    """Two tiny MLP towers and a learnable (log) logit scale: the smallest CLIP."""

    def __init__(self, p_drop: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.visual = self._tower(D_IMG, p_drop)
        self.textual = self._tower(D_TXT, p_drop)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    @staticmethod
    def _tower(d_in: int, p_drop: float) -> nn.Module:
        return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Dropout(p_drop), nn.Linear(16, D_EMB))

    def forward(self, images, texts):
        return (F.normalize(self.visual(images), dim=-1), F.normalize(self.textual(texts), dim=-1),
                self.logit_scale.exp())


def make_data(n_micro: int, b: int, seed: int, dtype=torch.float64, ranks: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(ranks, n_micro, b, D_IMG, generator=g, dtype=dtype)
    texts = torch.randn(ranks, n_micro, b, D_TXT, generator=g, dtype=dtype)
    return images, texts


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_equal(got, want, rtol=1e-10, atol=1e-12):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def torch_clip_loss():
    return ClipLoss(backend="torch")


# ------------------------------------------------------------------------------------------------
# single process: exactness
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["clip_loss_torch", "clip_loss_ref"])
@pytest.mark.parametrize("k", [1, 3])
def test_equals_big_batch(k, loss_name):
    loss_fn = torch_clip_loss() if loss_name == "clip_loss_torch" else clip_loss_ref
    model = TwoTower().double()
    ref_model = copy.deepcopy(model)
    (images,), (texts,) = make_data(k, 5, seed=1)

    acc = GBAAccumulator(loss_fn, accum_steps=k)
    for i in range(k):
        assert len(acc) == i and not acc.ready
        acc.add(model, images[i], texts[i])
    assert acc.ready and len(acc) == k
    loss = acc.backward()
    assert len(acc) == 0 and not acc.ready
    assert not loss.requires_grad and loss.dim() == 0

    ref_loss = loss_fn(*ref_model(images.flatten(0, 1), texts.flatten(0, 1)))
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    want = grads_of(ref_model)
    assert set(want) == {n for n, _ in model.named_parameters()}
    assert want["logit_scale"].abs() > 1e-6  # the scale gradient is really checked
    assert_grads_equal(grads_of(model), want)

    # a second step reuses the accumulator and accumulates into .grad like loss.backward() would
    for i in range(k):
        acc.add(model, images[i], texts[i])
    acc.backward()
    assert_grads_equal(grads_of(model), {n: 2 * g for n, g in want.items()})


def test_more_candidates_than_micro_batch():
    """The accumulated loss is not the mean of per-micro-batch losses: negatives span all K micro-batches."""
    model = TwoTower().double()
    (images,), (texts,) = make_data(2, 4, seed=2)
    acc = GBAAccumulator(clip_loss_ref, accum_steps=2)
    for i in range(2):
        acc.add(model, images[i], texts[i])
    loss = acc.backward()
    with torch.no_grad():
        per_micro = sum(clip_loss_ref(*model(images[i], texts[i])) for i in range(2)) / 2
    assert loss > per_micro + 1e-3  # 8 candidates per positive instead of 4 -> a larger loss


@pytest.mark.parametrize("seeding", ["sequential", "per_micro_batch"])
def test_dropout_rng_restored(seeding):
    k, b = 3, 4
    model = TwoTower(p_drop=0.3).double()
    ref_model = copy.deepcopy(model)
    (images,), (texts,) = make_data(k, b, seed=3)
    loss_fn = torch_clip_loss()

    cached, rerun = [], []

    def forward_fn(x, t):
        out = model(x, t)
        (rerun if torch.is_grad_enabled() else cached).append([o.detach().clone() for o in out[:2]])
        return out

    acc = GBAAccumulator(loss_fn, accum_steps=k, check_recompute=True, recompute_atol=0.0)
    torch.manual_seed(1234)
    for i in range(k):
        if seeding == "per_micro_batch":
            torch.manual_seed(100 + i)
        acc.add(forward_fn, images[i], texts[i])
    after_adds = torch.get_rng_state()
    loss = acc.backward()
    # the re-run reproduced the cached embeddings bit for bit, and the caller's RNG stream is untouched
    assert len(cached) == len(rerun) == k
    for c, r in zip(cached, rerun):
        assert torch.equal(c[0], r[0]) and torch.equal(c[1], r[1])
    assert torch.equal(torch.get_rng_state(), after_adds)

    # reference: the same masks, drawn by a forward with grad on each micro-batch, one big loss
    torch.manual_seed(1234)
    outs = []
    for i in range(k):
        if seeding == "per_micro_batch":
            torch.manual_seed(100 + i)
        outs.append(ref_model(images[i], texts[i]))
    ref_loss = loss_fn(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2])
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    assert_grads_equal(grads_of(model), grads_of(ref_model))

    # dropout is really active: another draw gives other embeddings (so the checks above can fail)
    torch.manual_seed(999)
    with torch.no_grad():
        assert not torch.equal(model(images[0], texts[0])[0], cached[0][0])


def test_check_recompute_catches_nondeterminism():
    model = TwoTower().double()
    (images,), (texts,) = make_data(2, 3, seed=4)

    def noisy(x, t):  # randomness outside torch's generators cannot be restored
        img, txt, s = model(x, t)
        return img + random.random() * 1e-3, txt, s

    acc = GBAAccumulator(clip_loss_ref, accum_steps=2, check_recompute=True)
    for i in range(2):
        acc.add(noisy, images[i], texts[i])
    with pytest.raises(RuntimeError, match="did not reproduce the cached image_features"):
        acc.backward()
    assert len(acc) == 0  # the cache is dropped after a failed backward


def test_logit_bias_dict_outputs_and_dict_loss():
    """open_clip-style outputs: a mapping with logit_bias, and a loss returning {"contrastive_loss": ...}."""
    model = TwoTower().double()
    model.logit_bias = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
    ref_model = copy.deepcopy(model)
    (images,), (texts,) = make_data(2, 4, seed=5)

    def as_dict(m):
        def fwd(x, t):
            img, txt, s = m(x, t)
            return {"image_features": img, "text_features": txt, "logit_scale": s, "logit_bias": m.logit_bias}
        return fwd

    loss_fn = lambda *a: ClipLoss(backend="torch")(*a, output_dict=True)
    acc = GBAAccumulator(loss_fn, accum_steps=2)
    for i in range(2):
        acc.add(as_dict(model), images[i], texts[i])
    loss = acc.backward()
    out = as_dict(ref_model)(images.flatten(0, 1), texts.flatten(0, 1))
    ref = loss_fn(*out.values())["contrastive_loss"]
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    got = grads_of(model)
    assert_grads_equal(got, grads_of(ref_model))
    assert "logit_bias" in got  # the bias gradient was injected (it is 0: the loss is shift-invariant)


def test_grad_scaler_scales_injected_gradients():
    model = TwoTower()
    ref_model = copy.deepcopy(model)
    (images,), (texts,) = make_data(2, 4, seed=6, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    acc = GBAAccumulator(torch_clip_loss(), accum_steps=2)
    for i in range(2):
        acc.add(model, images[i], texts[i])
    loss = acc.backward(scaler=scaler)
    ref = torch_clip_loss()(*ref_model(images.flatten(0, 1), texts.flatten(0, 1)))
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads_of(model), {n: 256.0 * g for n, g in grads_of(ref_model).items()},
                       rtol=1e-4, atol=1e-5)


def test_frozen_tower_and_all_frozen():
    model = TwoTower().double()
    model.textual.requires_grad_(False)
    ref_model = copy.deepcopy(model)
    (images,), (texts,) = make_data(2, 4, seed=7)
    acc = GBAAccumulator(clip_loss_ref, accum_steps=2)
    for i in range(2):
        acc.add(model, images[i], texts[i])
    acc.backward()
    clip_loss_ref(*ref_model(images.flatten(0, 1), texts.flatten(0, 1))).backward()
    got = grads_of(model)
    assert not any(n.startswith("textual") for n in got)
    assert_grads_equal(got, grads_of(ref_model))

    model.requires_grad_(False)
    for i in range(2):
        acc.add(model, images[i], texts[i])
    with pytest.raises(RuntimeError, match="requires grad"):
        acc.backward()


def test_autocast_state_restored_on_rerun():
    """Micro-batches added under CPU autocast (bf16) are re-run under it even if backward() is not."""
    model = TwoTower()
    ref_model = copy.deepcopy(model)
    (images,), (texts,) = make_data(2, 4, seed=8, dtype=torch.float32)
    acc = GBAAccumulator(torch_clip_loss(), accum_steps=2, check_recompute=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(2):
            acc.add(model, images[i], texts[i])
    loss = acc.backward()  # outside autocast: a re-run in fp32 would fail the recompute check
    outs = []
    for i in range(2):  # one autocast region per micro-batch, as the re-runs (no shared weight casts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(ref_model(images[i], texts[i]))
    ref = torch_clip_loss()(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2])
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    assert_grads_equal(grads_of(model), grads_of(ref_model), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_state_errors():
    model = TwoTower().double()
    (images,), (texts,) = make_data(3, 2, seed=9)
    acc = GBAAccumulator(clip_loss_ref, accum_steps=2)
    with pytest.raises(RuntimeError, match=r"needs accum_steps=2 micro-batches, 0 added"):
        acc.backward()
    acc.add(model, images[0], texts[0])
    with pytest.raises(RuntimeError, match=r"needs accum_steps=2 micro-batches, 1 added"):
        acc.backward()
    assert len(acc) == 1  # a premature backward keeps what was added
    acc.add(model, images[1], texts[1])
    with pytest.raises(RuntimeError, match="already holds accum_steps=2"):
        acc.add(model, images[2], texts[2])
    with pytest.raises(TypeError, match="no_sync"):
        acc.backward(no_sync=3)
    acc.clear()
    assert len(acc) == 0

    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="accum_steps"):
            GBAAccumulator(clip_loss_ref, accum_steps=bad)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        GBAAccumulator("clip", accum_steps=2)
    with pytest.raises(TypeError, match="forward_fn must be callable"):
        acc.add(None, images[0], texts[0])


def test_mismatched_micro_batches():
    model = TwoTower().double()
    (images,), (texts,) = make_data(2, 4, seed=10)
    acc = GBAAccumulator(clip_loss_ref, accum_steps=3)
    acc.add(model, images[0], texts[0])
    with pytest.raises(ValueError, match=r"micro-batch 1 has image_features of shape \(3, 8\)"):
        acc.add(model, images[1, :3], texts[1, :3])
    with pytest.raises(ValueError, match="micro-batch 1 has image_features .*float32"):
        acc.add(lambda x, t: tuple(o.float() for o in model(x, t)), images[1], texts[1])
    with torch.no_grad():
        model.logit_scale += 0.1
    with pytest.raises(ValueError, match="logit_scale differs between micro-batches"):
        acc.add(model, images[1], texts[1])
    assert len(acc) == 1


def test_wrong_forward_structure():
    model = TwoTower().double()
    (images,), (texts,) = make_data(1, 4, seed=11)
    img, txt, s = (o.detach() for o in model(images[0], texts[0]))
    acc = GBAAccumulator(clip_loss_ref, accum_steps=2)
    cases = [
        (lambda: img, TypeError, "must return a tuple"),
        (lambda: (img, txt), TypeError, "length 2"),
        (lambda: (img, txt, s, None, None), TypeError, "length 5"),
        (lambda: {"image_features": img, "text_features": txt}, TypeError,
         r"without the key\(s\) \['logit_scale'\]"),
        (lambda: (img.numpy(), txt, s), TypeError, "invalid outputs: image_features must be a torch.Tensor"),
        (lambda: (img, txt.long(), s), TypeError, "text_features must be float32, .* got torch.int64"),
        (lambda: (img[0], txt, s), ValueError, "image_features must be 2-D"),
        (lambda: (img, txt[:2], s), ValueError, "batch sizes differ"),
        (lambda: (img[:0], txt[:0], s), ValueError, "empty batch"),
        (lambda: (img, txt, None), TypeError, "logit_scale=None"),
        (lambda: (img, txt, "s"), TypeError, "logit_scale must be a tensor or a Python number, got str"),
        (lambda: (img, txt, torch.ones(2)), ValueError, "logit_scale must be a scalar"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            acc.add(fn)
        assert len(acc) == 0

    acc = GBAAccumulator(lambda *a: torch.ones(3, requires_grad=True), accum_steps=1)
    acc.add(model, images[0], texts[0])
    with pytest.raises(TypeError, match="scalar tensor"):
        acc.backward()


# ------------------------------------------------------------------------------------------------
# two processes, gloo, DDP with no_sync
# ------------------------------------------------------------------------------------------------

K, B = 3, 4

# (world, mode, group_size, dropout): "local" is the single-process loss on each rank's own K*b samples;
# grouped with n < world is GBA-ITC proper; global/ring are exact global-batch losses.
CONFIGS = {
    2: [(mode, n, p) for mode, n in [("local", None), ("grouped", 1), ("grouped", 2), ("global", None)]
        for p in (0.0, 0.25)],
    4: [("grouped", 2, 0.25), ("ring", None, 0.0)],
}
ALL_CONFIGS = [(w, *cfg) for w, cfgs in CONFIGS.items() for cfg in cfgs]


def _make_loss(mode: str, group_size: int | None):
    if mode == "local":
        return ClipLoss(backend="torch")
    return ClipLoss(mode=mode, group_size=group_size, backend="torch")


def _run_config(rank, world, mode, group_size, p_drop):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    images, texts = make_data(K, B, seed=20, ranks=world)
    model = DDP(TwoTower(p_drop=p_drop).double())
    calls = {"n": 0}

    def counting_hook(pg, bucket):
        calls["n"] += 1
        return default_hooks.allreduce_hook(pg, bucket)

    model.register_comm_hook(dist.group.WORLD, counting_hook)
    acc = GBAAccumulator(_make_loss(mode, group_size), accum_steps=K, check_recompute=True)
    torch.manual_seed(500 + rank)
    for i in range(K):
        acc.add(model, images[rank, i], texts[rank, i])
    loss = acc.backward(no_sync=model.no_sync)
    synced_calls = calls["n"]
    grads = grads_of(model.module)
    mean_loss = loss.clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    # without no_sync, DDP all-reduces after every re-run (K times the hook calls), same gradients
    model.zero_grad()
    torch.manual_seed(500 + rank)
    for i in range(K):
        acc.add(model, images[rank, i], texts[rank, i])
    acc.backward()
    return {"grads": grads, "unsynced_grads": grads_of(model.module), "loss": loss, "mean_loss": mean_loss,
            "synced_calls": synced_calls, "unsynced_calls": calls["n"] - synced_calls}


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {cfg: _run_config(rank, world, *cfg) for cfg in CONFIGS[world]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference(world, mode, group_size, p_drop):
    """Single-process float64: mean over sub-groups of the loss on each sub-group's concatenated batch."""
    images, texts = make_data(K, B, seed=20, ranks=world)
    model = TwoTower(p_drop=p_drop).double()
    feats = []
    for r in range(world):  # same dropout masks as rank r drew in add()
        torch.manual_seed(500 + r)
        outs = [model(images[r, i], texts[r, i]) for i in range(K)]
        feats.append((torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2]))
    n = {"local": 1, "global": world, "ring": world}.get(mode, group_size)
    losses = []
    for g0 in range(0, world, n):
        grp = feats[g0:g0 + n]
        img, txt = torch.cat([f[0] for f in grp]), torch.cat([f[1] for f in grp])
        losses.append(clip_loss_ref(img, txt, grp[0][2]))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.detach(), grads_of(model)


_DDP_RESULTS: dict = {}


def _ddp_results(world):
    """One gloo run per world size (spawning is the slow part) that goes through its configurations."""
    import torch.multiprocessing as mp

    if world not in _DDP_RESULTS:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
            _DDP_RESULTS[world] = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    return _DDP_RESULTS[world]


@pytest.mark.distributed
@pytest.mark.parametrize("world,mode,group_size,p_drop", ALL_CONFIGS)
def test_ddp_gloo_matches_single_process(world, mode, group_size, p_drop):
    results = [per_rank[(mode, group_size, p_drop)] for per_rank in _ddp_results(world)]
    ref_loss, ref_grads = _reference(world, mode, group_size, p_drop)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["mean_loss"], ref_loss, rtol=1e-10, atol=1e-12)
        assert_grads_equal(res["grads"], ref_grads, rtol=1e-9, atol=1e-12)
        assert_grads_equal(res["unsynced_grads"], ref_grads, rtol=1e-9, atol=1e-12)
        assert res["synced_calls"] >= 1
        assert res["unsynced_calls"] == K * res["synced_calls"], f"rank {r}: no_sync was not honoured"
    if mode in ("local", "grouped") and group_size != world:  # the ranks' (sub-groups') losses differ
        assert not torch.equal(results[0]["loss"], results[-1]["loss"])


@pytest.mark.distributed
def test_grouped_differs_from_global():
    """With sub-groups smaller than the world, GBA-ITC is another objective than the global-batch loss."""
    grouped, _ = _reference(4, "grouped", 2, 0.25)
    global_, _ = _reference(4, "global", None, 0.25)
    assert abs(grouped - global_) > 1e-3

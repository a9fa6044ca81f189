"""Training: loss falls, exact resume after a signal (Pillow and DALI), config validation, data counts
in the metrics, resume from damaged checkpoint folders, schedule, 2-process grouped run."""

import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from m2model.data import dali_available
from m2model.synth import generate
from m2model.train import TrainConfig, cosine_schedule, load_config, parse_args, train

TINY = {"width": 32, "heads": 2, "ffn_dim": 64, "num_layers": 1, "num_shared_layers": 1, "embed_dim": 16,
        "image_size": 16, "patch_size": 8, "max_text_len": 20}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(str(out), num_train=96, num_val=8, size=32, seed=0, samples_per_shard=40)
    return out


def _cfg(synth_dir, out, **kw):
    base = dict(model="tiny", model_overrides=dict(TINY), train_jsonl=str(synth_dir / "train.jsonl"),
                batch_size=8, max_steps=6, lr=2e-3, warmup_steps=2, output_dir=str(out), log_every=1,
                progress=False, seed=0, num_threads=1, data_threads=0)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls(synth_dir, tmp_path):
    losses = []
    cfg = _cfg(synth_dir, tmp_path, train_jsonl=None, train_shards=str(synth_dir / "shards" / "train-*.tar"),
               batch_size=16, max_steps=40, lr=3e-3, warmup_steps=5, weight_decay=0.0)
    out = train(cfg, on_step=lambda step, m: losses.append(m["loss"]))
    assert out["step"] == 40 and len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    steps = [x for x in lines if "loss" in x and "event" not in x]
    assert len(steps) == 40 and {"lr", "images_per_s", "logit_scale"} <= set(steps[0])
    epochs = [x for x in lines if x.get("event") == "epoch_end"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3, 4, 5] and all(e["data"] == {} for e in epochs)
    assert os.path.exists(out["checkpoint"])


RESUME_CASES = [("fp32", "pillow"), ("bf16", "pillow")] + ([("fp32", "dali")] if dali_available() else [])


@pytest.mark.parametrize("precision,backend", RESUME_CASES)
def test_resume_after_signal_is_exact(synth_dir, tmp_path, precision, backend):
    """Uninterrupted 7 steps == 3 steps, SIGTERM (checkpoint), resume, 4 more steps: bit-identical
    parameters and optimizer state. Dropout is on, so the restored RNG state matters. On the DALI path
    (shards, 6 steps of 16 an epoch) the resumed part also crosses an epoch boundary."""
    over = dict(TINY, dropout=0.1)
    kw = dict(model_overrides=over, max_steps=7, batch_size=12, precision=precision, data_backend=backend)
    if backend == "dali":
        kw.update(train_jsonl=None, train_shards=str(synth_dir / "shards" / "train-*.tar"), batch_size=16)
    ref = train(_cfg(synth_dir, tmp_path / "ref", **kw))["model"]

    def stop_at_3(step, metrics):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)

    part = train(_cfg(synth_dir, tmp_path / "run", **kw), on_step=stop_at_3)
    assert part["interrupted"] and part["step"] == 3
    assert os.path.basename(part["checkpoint"]) == "checkpoint-00000003.pt"
    assert not [f for f in os.listdir(tmp_path / "run") if ".tmp" in f]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = train(_cfg(synth_dir, tmp_path / "run", resume="auto", **kw))
    assert resumed["step"] == 7 and not resumed["interrupted"]
    for (name, a), b in zip(ref.state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), name
    # and the run did move: not equal to the checkpoint it resumed from
    start = torch.load(part["checkpoint"], weights_only=False)["model"]
    assert not all(torch.equal(start[k], v) for k, v in resumed["model"].state_dict().items())
    ck_ref = torch.load(tmp_path / "ref" / "checkpoint-00000007.pt", weights_only=False)
    ck_res = torch.load(tmp_path / "run" / "checkpoint-00000007.pt", weights_only=False)
    for a, b in zip(ck_ref["optimizer"]["state"].values(), ck_res["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ck_ref["loader"] == ck_res["loader"] and ck_ref["scheduler"] == ck_res["scheduler"]


def test_gba_accumulation_matches_one_big_batch(synth_dir, tmp_path):
    """K=2 micro-batches of 8 through GBAAccumulator == one batch of 16 (same samples, same crops):
    the same parameters after 3 steps, to float32 summation order."""
    big = train(_cfg(synth_dir, tmp_path / "a", batch_size=16, max_steps=3))["model"]
    acc = train(_cfg(synth_dir, tmp_path / "b", batch_size=8, accum_steps=2, max_steps=3))["model"]
    for (name, a), b in zip(big.state_dict().items(), acc.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    start = train(_cfg(synth_dir, tmp_path / "c", max_steps=0))["model"]
    assert not torch.allclose(start.logit_scale, big.logit_scale) or not torch.allclose(
        start.image_proj.weight, big.image_proj.weight)


def test_grad_checkpointing_gives_the_same_training(synth_dir, tmp_path):
    plain = train(_cfg(synth_dir, tmp_path / "a", max_steps=2))["model"]
    ckpt = train(_cfg(synth_dir, tmp_path / "b", max_steps=2, grad_checkpointing=True))["model"]
    assert ckpt.grad_checkpointing
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_periodic_checkpoints_are_pruned(synth_dir, tmp_path):
    train(_cfg(synth_dir, tmp_path, max_steps=6, save_every=2, keep_checkpoints=2))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000004.pt", "checkpoint-00000006.pt", "config.json",
                                            "metrics.jsonl"]


def test_config_file_and_cli_overrides(tmp_path, synth_dir):
    path = tmp_path / "c.yaml"
    path.write_text(f"train_jsonl: {synth_dir / 'train.jsonl'}\nlr: 5e-4\nbatch_size: 4\n"
                    "model_overrides: {image_size: 16, patch_size: 8}\n")
    cfg = parse_args(["--config", str(path), "--batch_size", "8", "--betas", "[0.9, 0.95]", "--resume"
                      , "true"])
    assert cfg.lr == 5e-4 and isinstance(cfg.lr, float) and cfg.batch_size == 8 and cfg.betas == (0.9, 0.95)
    assert cfg.model_overrides == {"image_size": 16, "patch_size": 8} and cfg.resume == "auto"
    jpath = tmp_path / "c.json"
    jpath.write_text(json.dumps({"train_jsonl": "x.jsonl", "accum_steps": 2}))
    assert load_config(str(jpath)).accum_steps == 2
    assert parse_args(["--config", str(path), "--resume"]).resume == "auto"
    resume = parse_args(["--config", str(path), "--resume", "run/checkpoint-00000010.pt"]).resume
    assert resume == "run/checkpoint-00000010.pt"
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(str(jpath), {"learning_rate": 1.0})
    with pytest.raises(ValueError, match="batch_size"):
        load_config(str(jpath), {"batch_size": "eight"})
    with pytest.raises(ValueError, match="loss_mode"):
        load_config(str(jpath), {"loss_mode": "everything"})
    with pytest.raises(ValueError, match="train_jsonl"):
        load_config(None, {})
    with pytest.raises(ValueError, match="does not exist"):
        train(_cfg(synth_dir, tmp_path / "o", resume=str(tmp_path / "nope.pt")))
    with pytest.raises(ValueError, match="lamb"):
        train(_cfg(synth_dir, tmp_path / "o", optimizer="lamb"))


BAD_VALUES = [  # (key, command-line value, what the message must say)
    ("grad_clip", "-1", "'grad_clip': expected a number > 0"),
    ("log_every", "0", "'log_every': expected an integer >= 1"),
    ("crop_scale", "[0.5]", "'crop_scale': expected a list of two numbers"),
    ("crop_scale", "[1.0, 0.1]", "'crop_scale': expected \\[min, max\\] with 0 < min <= max <= 1"),
    ("model_overrides", "5", "'model_overrides': expected a mapping"),
    ("model_overrides", "{widthh: 8}", "'model_overrides': unknown M2Config fields \\['widthh'\\]"),
    ("epochs", "0", "'epochs': expected an integer >= 1"),
    ("progress", "5", "'progress': expected true or false"),
    ("save_every", "-1", "'save_every': expected an integer >= 0"),
    ("warmup_steps", "-5", "'warmup_steps': expected an integer >= 0"),
    ("batch_size", "null", "'batch_size': expected an integer >= 1 \\(null is not allowed here\\)"),
    ("lr", "nan", "'lr': expected a finite number"),
    ("betas", "[0.9, 1.0]", "'betas': expected two values in \\[0, 1\\)"),
    ("data_backend", "opencv", "'data_backend': expected one of"),
    ("keep_checkpoints", "0", "'keep_checkpoints'"),
    ("context_length", "99", "'context_length': 99 exceeds the model's max_text_len 52"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_every_key_is_validated_before_anything_loads(key, value, message):
    with pytest.raises(ValueError, match=message):
        parse_args(["--train_jsonl", "does-not-exist.jsonl", f"--{key}", value])


def test_tokenizer_and_model_vocabulary_must_match(synth_dir, tmp_path):
    with pytest.raises(ValueError, match=r"config key 'tokenizer': .*21,128 ids .*21,000-entry vocabulary"):
        train(_cfg(synth_dir, tmp_path, model_overrides={**TINY, "vocab_size": 21000}))
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the first step


def test_null_on_the_command_line_is_kept(synth_dir, tmp_path):
    """``--grad_clip null`` (documented as off) must reach the config, not be dropped for the default."""
    cfg = parse_args(["--train_jsonl", str(synth_dir / "train.jsonl"), "--grad_clip", "null",
                      "--max_steps", "null", "--model_overrides", json.dumps(TINY), "--progress", "false",
                      "--output_dir", str(tmp_path), "--data_threads", "0", "--batch_size", "16",
                      "--epochs", "1", "--log_every", "1"])
    assert cfg.grad_clip is None and cfg.max_steps is None
    train(cfg)
    steps = [x for x in map(json.loads, open(tmp_path / "metrics.jsonl")) if "event" not in x]
    assert len(steps) == 6 and all("grad_norm" not in x for x in steps)  # no clipping, so no norm


def _write_png(path, seed, damaged=False):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    if damaged:  # header and IEND intact: only decoding finds it
        start = data.index(b"IDAT") + 20
        data[start: start + 40] = bytes(range(40))
    path.write_bytes(bytes(data))


def test_data_counts_are_in_every_record_and_at_the_end(tmp_path):
    """A run that stops mid-epoch reports what was skipped: index-time counts from the first record,
    decode failures as they happen, the total at the end."""
    rows = []
    for i in range(16):
        _write_png(tmp_path / f"{i}.png", i, damaged=i % 4 == 0)
        rows.append(json.dumps({"image": f"{i}.png", "caption": [f"caption {i}"]}))
    rows.append(json.dumps({"image": "gone.png", "caption": ["missing"]}))
    rows.append("{not json")
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    cfg = _cfg(tmp_path, tmp_path / "run", train_jsonl=str(tmp_path / "d.jsonl"), batch_size=2, max_steps=3,
               model_overrides=dict(TINY), seed=1)
    out = train(cfg)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [x for x in lines if "loss" in x and "event" not in x]
    assert len(steps) == 3 and not [x for x in lines if x.get("event") == "epoch_end"]  # mid-epoch
    assert all(x["data"]["missing"] == 1 and x["data"]["bad_line"] == 1 for x in steps)
    end = lines[-1]
    assert end["event"] == "end" and end["data"] == out["data"]
    assert end["data"]["corrupt"] >= 1  # damaged PNGs met while decoding (seed 1 meets some)
    assert [x["data"].get("corrupt", 0) for x in steps] == sorted(x["data"].get("corrupt", 0) for x in steps)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_resume_skips_damaged_checkpoints_and_removes_stale_temp_files(synth_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(synth_dir, run, max_steps=2))
    good = run / "checkpoint-00000002.pt"
    data = good.read_bytes()
    (run / "checkpoint-00000009.pt").write_bytes(data[: len(data) // 2])  # cut short (not by the trainer)
    torch.save({"model": {}}, run / "checkpoint-00000008.pt")  # a torch file, not a trainer checkpoint
    stale = run / f"checkpoint-00000003.pt.tmp.{_dead_pid()}"
    stale.write_bytes(b"partial")
    mine = run / f"checkpoint-00000099.pt.tmp.{os.getpid()}"  # a live process's: kept
    mine.write_bytes(b"in progress")
    out = train(_cfg(synth_dir, run, max_steps=4, resume="auto"))
    assert out["step"] == 4
    err = capsys.readouterr().err
    start = [json.loads(x) for x in open(run / "metrics.jsonl") if '"start"' in x][-1]
    assert start["resumed_from"] == str(good)
    assert start["skipped_checkpoints"] == ["checkpoint-00000009.pt", "checkpoint-00000008.pt"]
    assert "not a complete torch checkpoint" in err and "not a checkpoint written by m2model.train" in err
    assert not stale.exists() and mine.exists()
    # an explicit path must be intact
    with pytest.raises(ValueError, match="not a complete torch checkpoint"):
        train(_cfg(synth_dir, run, max_steps=5, resume=str(run / "checkpoint-00000009.pt")))
    for f in run.glob("checkpoint-*.pt"):
        f.write_bytes(b"junk")
    with pytest.raises(ValueError, match="no intact checkpoint"):
        train(_cfg(synth_dir, run, max_steps=5, resume="auto"))


def test_resume_with_another_world_size_is_refused(synth_dir, tmp_path):
    run = tmp_path / "run"
    train(_cfg(synth_dir, run, max_steps=2))
    path = run / "checkpoint-00000002.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["world_size"] = 2  # as if written by 2 processes: the data split would differ
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"written by 2 processes, this run has 1"):
        train(_cfg(synth_dir, run, max_steps=4, resume="auto"))


def test_shipped_configs_parse():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    demo = load_config(os.path.join(root, "configs", "demo_tiny.yaml"))
    assert demo.loss_mode == "grouped" and demo.flip_prob == 0.0
    base = load_config(os.path.join(root, "configs", "train_base.yaml"))
    assert base.model == "base" and base.accum_steps == 4 and base.precision == "bf16"


def test_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = cosine_schedule(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(15):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def _spawn_worker(rank, world, init, synth_dir, out, kw):
    cfg = _cfg(synth_dir, out / "run", **kw)
    res = train(cfg, rank=rank, world_size=world, init_method=init)
    torch.save((rank, res["step"], res["loss"], [p.detach() for p in res["model"].parameters()]),
               out / f"rank{rank}.pt")


def _run_spawn(tmp_path, synth_dir, kw):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_spawn_worker, args=(2, init, synth_dir, tmp_path, kw), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.distributed
def test_two_process_grouped_training(tmp_path, synth_dir):
    """2 gloo processes (file:// rendezvous), grouped loss, GBA accumulation over K=2 micro-batches."""
    accum_steps = 2
    kw = dict(loss_mode="grouped", max_steps=4, batch_size=8, accum_steps=accum_steps, data_threads=0)
    results = _run_spawn(tmp_path, synth_dir, kw)
    (_, s0, l0, p0), (_, s1, l1, p1) = results
    assert s0 == s1 == 4 and l0 == l1 and l0 == l0  # the logged loss is the all-reduced mean
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))  # DDP keeps replicas identical
    init = [p.detach() for p in train(_cfg(synth_dir, tmp_path / "o1", max_steps=0))["model"].parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(init, p0))
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    start = lines[0]
    assert start["world_size"] == 2 and start["loss_mode"] == "grouped"
    assert start["accum_steps"] == accum_steps

"""Checkpoint files: a process killed (SIGKILL) at any moment of a save leaves the previous checkpoint
intact or none, never a torn one, and its temporary file is removed by the next run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from m2model.checkpoint import atomic_save, read_checkpoint, remove_stale_temp_files, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Saves 16 MB checkpoints in a loop, printing the number of each one completed.
SAVER = """
import sys
import torch
from m2model.checkpoint import atomic_save
state = {"step": 0, "model": torch.randn(4_000_000, generator=torch.Generator().manual_seed(0))}
print("ready", flush=True)
while True:
    state["step"] += 1
    atomic_save(state, sys.argv[1])
    print(state["step"], flush=True)
"""


def test_sigkill_during_saves_never_leaves_a_torn_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-00000001.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for delay in (0.0, 0.05, 0.13, 0.31):  # after the first save, at different points of a later one
        p = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True,
                             env=env)
        assert p.stdout.readline().strip() == "ready"
        done = 0
        if delay:
            done = int(p.stdout.readline())  # one complete checkpoint exists
            time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if path.exists():
            assert verify_checkpoint(str(path)) is None
            ckpt = read_checkpoint(str(path))
            assert ckpt["step"] >= done and ckpt["model"].shape == (4_000_000,)
        else:
            assert done == 0
        left = [f.name for f in tmp_path.iterdir() if ".tmp." in f.name]
        assert remove_stale_temp_files(str(tmp_path)) == left  # the killed process's, if any
        assert not [f for f in tmp_path.iterdir() if ".tmp." in f.name]
    assert path.exists()


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint-00000002.pt")
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    try:
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    except RuntimeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("the save should have failed")
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint-00000002.pt"]  # no temporary file left behind

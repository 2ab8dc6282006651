"""Bit-exact resume: a CPU run killed with SIGKILL mid-stage, then resumed, ends bit-identical to an uninterrupted one.

Both runs are real `python -m train` processes. The killed one is stopped with
SIGKILL as soon as its log shows a mid-stage checkpoint, then restarted with
--resume; model, EMA and optimizer state must equal the uninterrupted run's
exactly (torch.equal), not approximately.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.test_train_loop import make_dataset
from stagewise.train import checkpoint

TIMEOUT_S = 180  # per process; a run takes ~10 s


def args(shards: str, run_dir: Path) -> list[str]:
    # 2 stages of 1 epoch x 6 steps; a checkpoint every 4 steps, so step 4 is mid-epoch in stage 1 and the
    # resumed run crosses the stage boundary.
    return [sys.executable, "-m", "train", "--data", shards, "--run-dir", str(run_dir), "--model", "efficientnetv2_b0",
            "--run.device=cpu", "--run.progress=false", "--run.tensorboard=false", "--run.plots=false",
            "--run.log_every=1", "--run.ckpt_every=4", "--run.threads=1", "--optim.batch_size=8",
            "--optim.warmup_epochs=1", "--schedule.epochs=2", "--schedule.stages=2",
            "--schedule.min_size=32", "--schedule.max_size=48", "--schedule.min_randaug=5", "--schedule.max_randaug=15",
            "--schedule.min_mixup=0", "--schedule.max_mixup=0.4", "--model.channels_last=false",
            "--optim.ema_decay=0.99", "--data.eval_size=32", "--run.eval=none"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def checkpoints_logged(run_dir: Path) -> list[int]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line being written
            continue
        if r["kind"] == "checkpoint":
            out.append(r["step"])
    return out


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    shards = make_dataset(tmp_path, num_classes=4, per_class=12, val_per_class=1)  # 48 images: 6 steps of 8
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # both start at once (the uninterrupted run's timing does not matter)
    ref = subprocess.Popen(args(shards, straight), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(args(shards, killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + TIMEOUT_S
    try:
        while time.time() < deadline and proc.poll() is None and not checkpoints_logged(killed):
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        out, err = ref.communicate(timeout=TIMEOUT_S)
    finally:
        for p in (proc, ref):
            if p.poll() is None:
                p.kill()
    assert ref.returncode == 0, err[-3000:]
    assert proc.returncode == -signal.SIGKILL
    at_kill = checkpoint.load(str(killed / "last.pt"))
    assert at_kill["step"] in (4, 8) and at_kill["batch"] > 0  # mid-epoch, so mid-stage
    assert not (killed / "stage-2.pt").exists()

    resumed = subprocess.run(args(shards, killed) + ["--resume"], env=env(), capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed / 'last.pt'}: step {at_kill['step']}" in resumed.stdout

    a, b = checkpoint.load(str(straight / "last.pt")), checkpoint.load(str(killed / "last.pt"))
    assert a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model.{k} differs"
    for k in a["ema"]["weights"]:
        assert torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k]), f"ema.{k} differs"
    for pid, st in a["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(t, b["optimizer"]["state"][pid][name]), f"optimizer {pid}.{name} differs"
    # identical because resumed exactly, not because nothing trained after the kill
    assert not torch.equal(a["model"]["stem.conv.weight"], at_kill["model"]["stem.conv.weight"])

    # resuming with a changed recipe is refused, naming the change
    from stagewise.train.cli import main

    assert main(args(shards, killed)[3:] + ["--resume", "--optim.lr=0.5"]) == 2

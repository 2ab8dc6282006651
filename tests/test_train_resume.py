"""Bit-exact resume: a CPU run killed with SIGKILL mid-stage, then resumed, ends bit-identical to an uninterrupted one.

All runs are real `python -m stagewise.train` processes. The killed one is
stopped with SIGKILL in the middle of step 5 (its forward pass has run), right
after the checkpoint of step 4 was written: a fixed point, whatever the load on
the machine. Restarted with --resume, its model, EMA and optimizer state must
equal the uninterrupted run's exactly (torch.equal), not approximately; with the
checkpoints on S3 (moto) as well as on the local disk.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stagewise.shards.store import url_exists
from stagewise.train import checkpoint
from stagewise.benchmarks.datasets import write_photo_tree
from stagewise.pipeline.build_shards import build_shards

TIMEOUT_S = 180  # per process; a run takes ~10 s
KILL_AT_STEP = 5  # killed inside this step, after the checkpoint of the step before

# `python -m stagewise.train` with SIGKILL mid-step KILL_AT_STEP: wraps the loop's own functions, so the
# trainer itself carries no test hook.
_KILLED_RUN = f"""
import os, signal, sys
from stagewise.train import cli, loop
save, loss_fn, armed = loop.save_checkpoint, loop.loss_fn, []
def save_then_arm(run, stage_end):
    save(run, stage_end)
    armed.append(run.step == {KILL_AT_STEP} - 1)
def loss_then_die(*args, **kwargs):
    if armed and armed[-1]:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss_fn(*args, **kwargs)
loop.save_checkpoint, loop.loss_fn = save_then_arm, loss_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def options(shards: str, run_dir: Path, ckpt_dir: str) -> list[str]:
    # 2 stages of 1 epoch x 6 steps; a checkpoint every 4 steps, so step 4 is mid-epoch in stage 1 and the
    # resumed run crosses the stage boundary.
    return ["--data", shards, "--run-dir", str(run_dir), "--run.ckpt_dir", ckpt_dir, "--model", "efficientnetv2_b0",
            "--run.device=cpu", "--run.progress=false", "--run.tensorboard=false", "--run.plots=false",
            "--run.log_every=1", "--run.ckpt_every=4", "--run.threads=1", "--optim.batch_size=8",
            "--optim.warmup_epochs=1", "--schedule.epochs=2", "--schedule.stages=2",
            "--schedule.min_size=32", "--schedule.max_size=48", "--schedule.min_randaug=5", "--schedule.max_randaug=15",
            "--schedule.min_mixup=0", "--schedule.max_mixup=0.4", "--model.channels_last=false",
            "--optim.ema_decay=0.99", "--data.eval_size=32", "--run.eval=none"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def photo_dataset(root: Path) -> str:
    """48 photo crops (6 steps of 8), so that every pixel of the decode and the crops counts (solid colours would
    come out the same from any decoder)."""
    write_photo_tree(root / "src", num_classes=4, per_class=12)
    build_shards(str(root / "src"), str(root / "shards"), layout="folder", split="train", samples_per_shard=12)
    return str(root / "shards")


def _as_saved_before_cpu_decoder(url: str) -> None:
    """Rewrite a checkpoint as the trainer saved it before data.cpu_decoder existed (DALI decoded then)."""
    ck = checkpoint.load(url)
    assert ck["config"]["data"].pop("cpu_decoder") == "dali"
    checkpoint.save(url, ck, "")


@pytest.mark.parametrize("store", ["local", "s3", "saved-before-cpu_decoder"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, store, request):
    shards = photo_dataset(tmp_path)
    base = request.getfixturevalue("s3_bucket") if store == "s3" else str(tmp_path)
    straight, killed = (tmp_path / "straight", f"{base}/straight"), (tmp_path / "killed", f"{base}/killed")
    # an old checkpoint: both runs decode with DALI, as the trainer did then; resumed with the default ("auto")
    legacy = ["--data.cpu_decoder=dali"] if store == "saved-before-cpu_decoder" else []
    # both start at once (the uninterrupted run's timing does not matter)
    ref = subprocess.Popen([sys.executable, "-m", "stagewise.train", *options(shards, *straight), *legacy], env=env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, *options(shards, *killed), *legacy], env=env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    try:
        out, err = ref.communicate(timeout=TIMEOUT_S)
    finally:
        if ref.poll() is None:
            ref.kill()
    assert ref.returncode == 0, err[-3000:]
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    at_kill = checkpoint.load(f"{killed[1]}/last.pt")
    assert (at_kill["step"], at_kill["epoch"], at_kill["batch"]) == (KILL_AT_STEP - 1, 0, 4)  # mid-epoch, mid-stage
    assert not url_exists(f"{killed[1]}/stage-1.pt")
    if legacy:
        _as_saved_before_cpu_decoder(f"{killed[1]}/last.pt")

    resumed = subprocess.run([sys.executable, "-m", "stagewise.train", *options(shards, *killed), "--resume"],
                             env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed[1]}/last.pt: step {KILL_AT_STEP - 1}" in resumed.stdout
    assert ("resume: data.cpu_decoder = 'dali', as the checkpoint ran" in resumed.stdout) == bool(legacy)

    a, b = checkpoint.load(f"{straight[1]}/last.pt"), checkpoint.load(f"{killed[1]}/last.pt")
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
    assert all(url_exists(f"{killed[1]}/{name}") for name in ("stage-1.pt", "stage-2.pt", "config.yaml"))

    # resuming with a changed recipe is refused, naming the change
    from stagewise.train.cli import main

    assert main(options(shards, *killed) + ["--resume", "--optim.lr=0.5"]) == 2


"""`torchrun --nproc-per-node 2 -m stagewise.train` on CPU (gloo): both ranks end with identical weights, rank 0 alone writes.

Each rank fingerprints its own model and EMA (sha256 of every tensor) at the
end; the fingerprints are gathered and logged by rank 0. The test checks that
the two fingerprints agree and equal the fingerprint of the checkpoint rank 0
wrote, and that the run trained on the global batch (2 x per-rank batch).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from stagewise.model import create_model
from tests.test_train_loop import make_dataset
from stagewise.train import checkpoint
from stagewise.train.distributed import fingerprint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_processes_agree(tmp_path):
    shards = make_dataset(tmp_path, num_classes=4, per_class=8, val_per_class=2)  # 32 train images
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "-m", "stagewise.train", "--data", shards, "--run-dir", str(run_dir), "--model", "efficientnetv2_b0",
           "--run.device=cpu", "--run.progress=false", "--run.tensorboard=false", "--run.plots=false",
           "--run.log_every=1", "--run.ckpt_every=3", "--optim.batch_per_rank=4", "--optim.warmup_epochs=0",
           "--schedule.epochs=2", "--schedule.stages=2", "--schedule.min_size=32", "--schedule.max_size=40",
           "--schedule.max_mixup=0.2", "--model.channels_last=false", "--data.eval_size=32",
           "--optim.ema_decay=0.9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "2 processes on cpu, 1 torch thread each, global batch 8" in done.stdout
    assert "2 replicas agree" in done.stdout
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train_steps = [r for r in records if r["kind"] == "train"]
    assert len(train_steps) == 2 * (32 // 8)  # 32 images, global batch 8: each rank saw half of every batch
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["images"] for e in evals] == [8, 8]  # the two ranks' eval shards add up to the val split
    (final,) = [r for r in records if r["kind"] == "done"]
    assert len(final["fingerprints"]) == 2 and final["fingerprints"][0] == final["fingerprints"][1]

    # the checkpoint rank 0 wrote is the replicas' state
    ck = checkpoint.load(str(run_dir / "last.pt"))
    net = create_model("efficientnetv2_b0", num_classes=4)
    net.load_state_dict(ck["model"])
    ema = create_model("efficientnetv2_b0", num_classes=4)
    ema.load_state_dict(ck["ema"]["weights"])
    assert fingerprint(net) + fingerprint(ema) == final["fingerprints"][0]
    assert len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix == ".pt") == ["last.pt", "stage-1.pt", "stage-2.pt"]

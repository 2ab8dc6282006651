"""Ctrl-C and SIGTERM mid-epoch: a checkpoint at the next step boundary, one line saying how to continue,
exit 130 / 143 without a traceback; the printed command resumes there and ends bit-identical to an
uninterrupted run. A second Ctrl-C exits at once.

The signal is sent by the run to itself from inside step SIGNAL_AT_STEP (after its forward pass),
through the real handlers: a fixed point whatever the load on the machine. The loop's own function is
wrapped, so the trainer carries no test hook.
"""
from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys

import pytest
import torch

from stagewise.train import checkpoint
from tests.test_train_resume import TIMEOUT_S, env, options, photo_dataset

SIGNAL_AT_STEP = 3  # mid-epoch: epochs hold 6 steps (48 images, global batch 8)

_SIGNALLED_RUN = """
import os, signal, sys
from stagewise.train import cli, loop
loss_fn, step = loop.loss_fn, [0]
signum, at_step, times = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def loss_then_signal(*args, **kwargs):
    step[0] += 1
    if step[0] == at_step:
        for _ in range(times):
            os.kill(os.getpid(), signum)
    return loss_fn(*args, **kwargs)
loop.loss_fn = loss_then_signal
sys.argv = [sys.argv[0]] + sys.argv[4:]
sys.exit(cli.main(sys.argv[1:]))
"""


def _signalled(opts: list[str], signum: int, times: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SIGNALLED_RUN, str(int(signum)), str(SIGNAL_AT_STEP), str(times),
                           *opts], env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: (shards, its final checkpoint, its run folder)."""
    root = tmp_path_factory.mktemp("interrupts")
    shards = photo_dataset(root)
    done = subprocess.run([sys.executable, "-m", "stagewise.train", *options(shards, root / "run", str(root / "run"))],
                          env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return shards, checkpoint.load(str(root / "run" / "last.pt")), root / "run"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_mid_epoch_checkpoints_and_the_printed_command_resumes_bit_identically(straight, tmp_path, signum):
    shards, final, _ = straight
    run_dir = tmp_path / "run"
    opts = options(shards, run_dir, str(run_dir))
    stopped = _signalled(opts, signum)
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    name = signal.Signals(signum).name
    assert f"{name}: stopping after this step, with a checkpoint" in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted at step {SIGNAL_AT_STEP}; continue with: "), stopped.stderr[-2000:]
    ck = checkpoint.load(str(run_dir / "last.pt"))
    assert (ck["step"], ck["epoch"], ck["batch"]) == (SIGNAL_AT_STEP, 0, SIGNAL_AT_STEP)  # mid-epoch, the step it was in

    command = shlex.split(last.split("continue with: ", 1)[1])
    assert command[-1] == "--resume" and command[:-1] == ["-c", *opts]  # as launched (sys.argv here), + --resume
    resumed = subprocess.run([sys.executable, "-m", "stagewise.train", *command[command.index("--data"):]],
                             env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir}/last.pt: step {SIGNAL_AT_STEP}, epoch 0, batch {SIGNAL_AT_STEP}" in resumed.stdout
    ends = checkpoint.load(str(run_dir / "last.pt"))
    assert ends["step"] == final["step"] == 12
    for k in final["model"]:
        assert torch.equal(final["model"][k], ends["model"][k]), f"model.{k} differs"
    for k in final["ema"]["weights"]:
        assert torch.equal(final["ema"]["weights"][k], ends["ema"]["weights"][k]), f"ema.{k} differs"
    assert not torch.equal(ck["model"]["stem.conv.weight"], ends["model"]["stem.conv.weight"])  # it trained on


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(straight, tmp_path):
    shards, _, _ = straight
    run_dir = tmp_path / "run"
    stopped = _signalled(options(shards, run_dir, str(run_dir)) + ["--run.ckpt_every=0"], signal.SIGINT, times=2)
    assert stopped.returncode == 130
    assert "Traceback" not in stopped.stderr
    assert "SIGINT again: exiting now, without a checkpoint" in stopped.stderr
    assert not (run_dir / "last.pt").exists()


def test_stage_checkpoints_hold_weights_only(straight):
    """stage-N.pt: model and EMA (what fine-tuning and evaluation read); last.pt keeps the full state."""
    _, final, run_dir = straight
    stage = checkpoint.load(str(run_dir / "stage-2.pt"))
    assert "optimizer" not in stage and "rng" not in stage and "loader" not in stage
    for k in final["model"]:
        assert torch.equal(stage["model"][k], final["model"][k])
    assert (run_dir / "stage-2.pt").stat().st_size < 0.7 * (run_dir / "last.pt").stat().st_size
    assert "optimizer" in final


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_resumes_on_fewer(straight, tmp_path):
    """torchrun, 2 gloo ranks: only rank 1 gets SIGTERM (a preemption notice seen by one node first); both stop
    after the same step, rank 0 writes the checkpoint there, and one process resumes it at exactly that step."""
    shards, final, _ = straight
    run_dir = tmp_path / "run"
    entry = tmp_path / "entry.py"  # torchrun runs a script: the signalling wrapper, armed on rank 1 only
    entry.write_text(_SIGNALLED_RUN.replace("if step[0] == at_step:",
                                            "if step[0] == at_step and os.environ['RANK'] == '1':"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stopped = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
                              "--master-addr=127.0.0.1", f"--master-port={port}", str(entry),
                              str(int(signal.SIGTERM)), str(SIGNAL_AT_STEP), "1",
                              *options(shards, run_dir, str(run_dir))],
                             env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and "exitcode  : 143" in out, out[-3000:]
    assert (f"interrupted at step {SIGNAL_AT_STEP}; continue with: the same torchrun command with --resume"
            in stopped.stderr), out[-3000:]
    assert out.count("Traceback") == 1 and "ChildFailedError" in out  # the agent's own report of exit 143, no worker's
    ck = checkpoint.load(str(run_dir / "last.pt"))
    assert (ck["step"], ck["epoch"], ck["batch"]) == (SIGNAL_AT_STEP, 0, SIGNAL_AT_STEP)
    assert len(ck["rng"]) == 2

    resumed = subprocess.run([sys.executable, "-m", "stagewise.train", *options(shards, run_dir, str(run_dir)),
                              "--resume"], env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"resumed from {run_dir}/last.pt: step {SIGNAL_AT_STEP}, epoch 0, batch {SIGNAL_AT_STEP}; on 1 process "
            "instead of 2" in resumed.stdout)
    assert checkpoint.load(str(run_dir / "last.pt"))["step"] == final["step"]

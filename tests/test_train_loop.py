"""The training loop with real parts: DALI loader on CPU, real models, real checkpoints.

A stage change reaches the loader (the image size the model receives changes)
and the model (its dropout changes); fine-tuning swaps the head; a torchvision
ResNet-152 trains; multi-label shards train through the soft-target loss; a
diverging loss stops the run and keeps the last good checkpoint.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import math
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from stagewise.loaders import Loader, StageParams
from stagewise.pipeline.build_shards import build_shards
from stagewise.shards import Sample, ShardWriter, make_key
from stagewise.shards.manifest import Manifest, ShardInfo, SplitInfo, write_manifest
from tests.conftest import write_solid_tree
from stagewise.train import checkpoint, config, data, models, preflight
from stagewise.train.distributed import Dist
from stagewise.train.cli import main
from stagewise.train.loop import TrainingDiverged, save_checkpoint, setup, train
from stagewise.train.losses import loss_fn
from stagewise.train.schedule import StagePlan, StageValues, preset_from_config
from stagewise.train.telemetry import Telemetry


# A run small enough for CI: tiny images, few steps, no progress bar. One torch thread: the loader's DALI
# threads share the 2 cores, and a 2-thread OpenMP team slows down badly when a core is taken.
TINY = ["--run.device=cpu", "--run.progress=false", "--run.tensorboard=false", "--run.plots=false",
        "--run.log_every=1", "--run.ckpt_every=0", "--run.threads=1", "--optim.batch_size=8", "--optim.warmup_epochs=0",
        "--model", "efficientnetv2_b0", "--model.channels_last=false", "--data.eval_size=32"]


def make_dataset(root: Path, num_classes: int = 4, per_class: int = 8, val_per_class: int = 2) -> str:
    """Train and val splits of solid-colour images (class = colour), built with the real shard builder."""
    dest = str(root / "shards")
    write_solid_tree(root / "src-train", num_classes, per_class, (40, 36))
    write_solid_tree(root / "src-val", num_classes, val_per_class, (40, 36))
    build_shards(str(root / "src-train"), dest, layout="folder", split="train", samples_per_shard=12)
    build_shards(str(root / "src-val"), dest, layout="folder", split="val")
    return dest


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_dataset(tmp_path_factory.mktemp("train-loop"))


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_stage_changes_reach_loader_and_model(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = config.parse(TINY + ["--data", shards, "--run-dir", str(run_dir), "--schedule.epochs=3",
                               "--schedule.stages=3", "--schedule.min_size=32", "--schedule.max_size=48",
                               "--schedule.min_dropout=0.1", "--schedule.max_dropout=0.3",
                               "--schedule.min_randaug=0", "--schedule.max_randaug=10",
                               "--schedule.min_mixup=0", "--schedule.max_mixup=0.2",
                               "--run.tensorboard=true", "--run.plots=true"])
    result = train(cfg, print_config=False)
    out = capsys.readouterr().out
    assert "stage 1/3: size 32, randaug 0.0, mixup 0.00, dropout 0.10" in out
    assert "stage 2/3: size 40, randaug 5.0, mixup 0.10, dropout 0.20" in out
    assert "stage 3/3: size 48, randaug 10.0, mixup 0.20, dropout 0.30" in out
    steps = records(run_dir, "train")
    assert len(steps) == result["steps"] == 3 * (32 // 8)
    # what the model actually received and actually used, step by step
    seen = [(r["stage"], tuple(r["input_shape"]), r["model_dropout"]) for r in steps]
    assert seen == ([(1, (8, 3, 32, 32), 0.1)] * 4 + [(2, (8, 3, 40, 40), pytest.approx(0.2))] * 4
                    + [(3, (8, 3, 48, 48), 0.3)] * 4)
    evals = records(run_dir, "eval")
    assert [e["stage"] for e in evals] == [1, 2, 3] and all(e["images"] == 8 for e in evals)
    assert all(r["data_wait_pct"] >= 0 and r["img_per_s"] > 0 for r in steps)
    saved = sorted(os.listdir(run_dir))
    assert {"last.pt", "stage-1.pt", "stage-3.pt", "config.yaml", "log.jsonl", "schedule.png", "curves.png",
            "tensorboard"} <= set(saved)
    assert (run_dir / "schedule.png").read_bytes()[:4] == b"\x89PNG"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tensorboard"))


@pytest.mark.parametrize("flag, expected", [([], 0.5), (["--data.hflip_prob=0"], 0.0)])
def test_data_hflip_prob_reaches_the_training_loader(shards, flag, expected):
    cfg = config.parse(TINY + ["--data", shards] + flag)
    stage = StagePlan(stage=0, n_stages=1, values=StageValues(32, 0.0, 0.0, 0.0), start_epoch=0, end_epoch=1,
                      batch_size=8, steps_per_epoch=4)
    with data.train_loader(cfg, stage, Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))) as loader:
        assert loader.hflip_prob == loader._runner.hflip_prob == expected


def test_per_stage_batch_rebuilds_the_loader_and_scales_the_lr(shards, tmp_path):
    cfg = config.parse(TINY + ["--data", shards, "--run-dir", str(tmp_path), "--schedule.epochs=2",
                               "--schedule.stages=2", "--schedule.min_size=32", "--schedule.max_size=48",
                               "--schedule.per_stage_batch=true", "--run.eval=none", "--optim.lr_decay=cosine",
                               "--optim.warmup_epochs=0"])
    train(cfg, print_config=False)
    steps = records(tmp_path, "train")
    # 8 x (48/32)^2 = 18 images at 32 px (1 step of the 32 images), 8 at 48 px (4 steps)
    assert [tuple(r["input_shape"]) for r in steps] == [(18, 3, 32, 32)] + [(8, 3, 48, 48)] * 4
    assert steps[0]["lr"] == pytest.approx(0.256 * 18 / 4096)  # cosine at epoch 0: the peak, scaled to 18 images
    assert steps[1]["lr"] == pytest.approx(0.256 * 8 / 4096 * 0.5)  # epoch 1.0 of 2: half way down the cosine
    assert steps[2]["lr"] == pytest.approx(0.256 * 8 / 4096 * 0.5 * (1 + math.cos(math.pi * 1.25 / 2)))


def test_finetune_replaces_the_head(shards, tmp_path, capsys):
    pre = tmp_path / "pre"
    train(config.parse(TINY + ["--data", shards, "--run-dir", str(pre), "--schedule.epochs=1",
                               "--schedule.stages=1", "--schedule.max_size=32"]), print_config=False)
    other = make_dataset(tmp_path / "other", num_classes=3, per_class=8, val_per_class=1)
    ft = tmp_path / "ft"
    cfg = config.parse(TINY + ["--data", other, "--run-dir", str(ft), "--finetune-from", str(pre / "last.pt"),
                               "--schedule.max_steps=2", "--schedule.max_size=32", "--optim.batch_size=8"])
    assert cfg.recipe == "transfer" and cfg.optim.weight_decay == 0.0 and cfg.optim.lr == 0.001
    result = train(cfg, print_config=False)
    assert result["steps"] == 2
    assert "new classifier head (classifier.bias, classifier.weight)" in capsys.readouterr().out
    src, dst = checkpoint.load(str(pre / "last.pt")), checkpoint.load(str(ft / "last.pt"))
    assert src["model"]["classifier.weight"].shape[0] == 4 and dst["model"]["classifier.weight"].shape[0] == 3
    assert dst["model"]["stem.conv.weight"].shape == src["model"]["stem.conv.weight"].shape


def test_torchvision_resnet152_runs_a_few_steps(shards, tmp_path, capsys):
    cfg = config.parse(TINY + ["--data", shards, "--run-dir", str(tmp_path), "--model", "torchvision:resnet152",
                               "--schedule.max_steps=2", "--schedule.stages=1", "--schedule.max_size=32",
                               "--optim.batch_size=4", "--optim.optimizer=momentum", "--run.eval=none",
                               "--optim.ema_decay=0", "--run.checkpoints=false"])  # 0.5 GB checkpoints: not the point
    result = train(cfg, print_config=False)
    assert result["steps"] == 2
    steps = records(tmp_path, "train")
    assert [r["model_dropout"] for r in steps] == [None, None]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert "torchvision:resnet152 has no set_dropout" in capsys.readouterr().out
    assert not (tmp_path / "last.pt").exists()


def test_multilabel_shards_train_with_soft_targets(tmp_path):
    dest = tmp_path / "ml"
    dest.mkdir()
    splits = {}
    for split, n in (("train", 16), ("val", 4)):
        writer = ShardWriter(str(dest / f"{split}-000000.tar"))
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (36, 36), ((60 * i) % 255, 100, 200)).save(buf, "JPEG")
            labels = (i % 5, (i + 2) % 5) if i % 2 else (i % 5,)
            writer.write(Sample(make_key(f"{split}/{i}"), buf.getvalue(), labels[0], str(labels[0]), f"{i}.jpg",
                                36, 36, labels=labels if len(labels) > 1 else None))
        w = writer.close()
        (dest / f"{split}-000000.idx").write_text(w.index)
        splits[split] = SplitInfo(n, tuple(str(c) for c in range(5)),
                                  (ShardInfo(f"{split}-000000.tar", w.num_samples, w.bytes, w.sha256),),
                                  multi_label=True)
    write_manifest(str(dest), Manifest(layout="folder", splits=splits))
    # what the loader hands the loss: multi-hot rows normalized to sum 1, whatever the smoothing setting
    with Loader(str(dest), split="train", batch_size=16, stage=StageParams(32, 0.0, 0.0), device="cpu") as loader:
        loader.set_epoch(0)
        _, targets = next(iter(loader))
    assert targets.dtype == torch.float32 and targets.shape == (16, 5)
    assert torch.allclose(targets.sum(1), torch.ones(16))
    assert sorted({round(v, 4) for v in targets.flatten().tolist()}) == [0.0, 0.5, 1.0]
    expected = -(targets * torch.log_softmax(torch.zeros(16, 5), 1)).sum(1).mean()
    assert loss_fn(torch.zeros(16, 5), targets, 0.1).item() == pytest.approx(expected.item())
    cfg = config.parse(TINY + ["--data", str(dest), "--run-dir", str(tmp_path / "run"), "--schedule.epochs=1",
                               "--schedule.stages=1", "--schedule.max_size=32", "--recipe=imagenet21k-30",
                               "--schedule.epochs=1", "--optim.label_smoothing=0"])
    result = train(cfg, print_config=False)
    assert result["steps"] == 2 and result["images"] == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(tmp_path / "run", "train"))


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path, capsys):
    args = TINY + ["--data", shards, "--run-dir", str(tmp_path), "--schedule.epochs=2", "--schedule.stages=1",
                   "--schedule.max_size=32", "--run.ckpt_every=1", "--optim.lr=1e12", "--optim.ema_decay=0"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "error: " in err and "stopping" in err and "Last good checkpoint" in err
    ck = checkpoint.load(str(tmp_path / "last.pt"))
    assert ck["step"] >= 1 and f"step {ck['step']})" in err
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    with pytest.raises(TrainingDiverged):
        train(config.parse(args + ["--run-dir", str(tmp_path / "again")]), print_config=False)


def test_the_checkpoint_guard_refuses_non_finite_weights_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    cfg = config.parse(TINY + ["--data", shards, "--run-dir", str(tmp_path), "--schedule.epochs=1",
                               "--schedule.stages=1", "--schedule.max_size=32"])
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = setup(preflight.check(cfg), d, Telemetry(str(tmp_path), enabled=True, tensorboard=False, progress=False),
                print_config=False)
    save_checkpoint(run, stage_end=None)
    good = (tmp_path / "last.pt").read_bytes()
    with torch.no_grad():
        next(run.model.parameters())[0].fill_(float("nan"))  # the loss check has not seen this step
    run.step = 7
    with pytest.raises(TrainingDiverged, match=f"weights are not finite at step 7; not checkpointing. Last good "
                                               f"checkpoint: {tmp_path / 'last.pt'}"):
        save_checkpoint(run, stage_end=1)
    assert (tmp_path / "last.pt").read_bytes() == good and not (tmp_path / "stage-1.pt").exists()


def test_resume_without_a_checkpoint_starts_from_the_beginning(shards, tmp_path, capsys):
    args = TINY + ["--data", shards, "--run-dir", str(tmp_path), "--schedule.epochs=2", "--schedule.stages=1",
                   "--schedule.max_size=32", "--run.eval=none", "--resume"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"resume: no checkpoint at {tmp_path / 'last.pt'}; starting from the beginning" in out
    assert [r["step"] for r in records(tmp_path, "train")] == list(range(1, 9))  # 2 epochs x 32 / 8, from step 1


def test_eval_points_give_a_time_to_accuracy_curve(shards, tmp_path):
    cfg = config.parse(TINY + ["--data", shards, "--run-dir", str(tmp_path), "--schedule.epochs=2",
                               "--schedule.stages=2", "--schedule.min_size=32", "--schedule.max_size=40",
                               "--run.eval_points=3"])
    evals = train(cfg, print_config=False)["evals"]
    # 8 steps: points at 3, 6 and 8; stage ends at 4 and 8 (8 is both, evaluated once)
    assert [e["step"] for e in evals] == [3, 4, 6, 8]
    assert [e["stage"] for e in evals] == [1, 1, 2, 2] and {e["eval_size"] for e in evals} == {32}
    assert [e["images_seen"] for e in evals] == [24, 32, 48, 64]
    seconds = [e["train_seconds"] for e in evals]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert [r["step"] for r in records(tmp_path, "eval")] == [3, 4, 6, 8]


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    """Serves files; logs nothing (its access log would print the URLs under test itself)."""

    def log_message(self, *args) -> None:
        pass


def test_credentials_in_a_url_never_reach_the_printout_the_config_file_or_the_checkpoint(shards, tmp_path, capsys):
    source = tmp_path / "source"  # a checkpoint to fine-tune from, served over HTTP behind a presigned URL
    assert main(TINY + ["--data", shards, "--run-dir", str(source), "--schedule.epochs=1", "--schedule.stages=1",
                        "--schedule.max_size=32", "--run.eval=none"]) == 0
    handler = functools.partial(_QuietFiles, directory=str(source))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "SIGSECRET4242"
    url = f"http://127.0.0.1:{server.server_address[1]}/last.pt?X-Amz-Credential=AKIAFAKE&X-Amz-Signature={secret}"
    run_dir = tmp_path / "run"
    try:
        capsys.readouterr()
        assert main(TINY + ["--data", shards, "--run-dir", str(run_dir), "--recipe", "imagenet1k", "--finetune-from",
                            url, "--schedule.epochs=1", "--schedule.stages=1", "--schedule.max_size=32",
                            "--run.eval=none"]) == 0
    finally:
        server.shutdown()
    printed = capsys.readouterr()
    assert "fine-tuning from http://127.0.0.1" in printed.out  # the URL was used and printed...
    assert "X-Amz-Signature=***" in printed.out  # ...with its signature hidden
    saved = (run_dir / "config.yaml").read_text()
    in_checkpoint = json.dumps(checkpoint.load(str(run_dir / "last.pt"))["config"])
    for where, text in (("stdout", printed.out), ("stderr", printed.err), ("config.yaml", saved),
                        ("last.pt", in_checkpoint), ("log.jsonl", (run_dir / "log.jsonl").read_text())):
        assert secret not in text, f"the signature leaked into {where}"
    assert "X-Amz-Signature=***" in saved and "X-Amz-Signature=***" in in_checkpoint


@pytest.mark.parametrize("model, options, expected", [
    ("efficientnetv2_s", [], (384, 1.0)),  # paper: trains up to 300, tests at 384
    ("efficientnetv2_b0", [], (224, 0.875)),  # the row's own sizes
    ("efficientnetv2_b0", ["--schedule.max_size=128"], (149, 0.875)),  # the row's ratio, 224/192, at 128
    ("torchvision:resnet50", ["--schedule.max_size=200"], (256, 1.0)),  # efficientnetv2_s's ratio, 384/300
    ("efficientnetv2_b0", ["--schedule.max_size=128", "--data.eval_size=96"], (96, 0.875)),  # asked for
])
def test_the_test_size_follows_the_final_train_size(model, options, expected):
    cfg = config.parse(["--model", model, *options])
    variant = models.variant_of(model)
    assert data.eval_size_and_crop(cfg, variant, preset_from_config(cfg.schedule, model, variant)) == expected


def test_a_first_stage_with_1x1_feature_maps_is_pointed_out(shards, tmp_path, capsys):
    base = TINY + ["--data", shards, "--schedule.epochs=1", "--schedule.stages=1", "--run.eval=none"]
    assert main(base + ["--run-dir", str(tmp_path / "a"), "--schedule.max_size=32"]) == 0
    assert "note: the first stage trains at 32 px, where efficientnetv2_b0's last feature maps are 1x1" in (
        capsys.readouterr().out)
    assert main(base + ["--run-dir", str(tmp_path / "b"), "--schedule.max_size=40"]) == 0  # 2x2 maps
    assert "note: the first stage" not in capsys.readouterr().out


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    run_dir = ["--run-dir", str(tmp_path / "run")]
    assert main(TINY + run_dir + ["--data", str(tmp_path / "nowhere")]) == 2
    assert "no manifest.json in" in capsys.readouterr().err
    assert main(TINY + run_dir + ["--data", str(tmp_path), "--optim.lr=abc"]) == 2
    assert "optim.lr must be float, got 'abc'" in capsys.readouterr().err

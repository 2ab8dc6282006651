"""A user's own data, first hour (issue 18): every mistake is one line on stderr, exit status 2, no traceback, and
creates nothing (no run folder, no DEST); the defaults that fit the data; the smaller fixes.

The mistake matrix runs the real command-line entry points in this process (`train.cli.main`,
`pipeline.cli.main`) on real shards, and S3 through moto's server on 127.0.0.1 (tests/conftest.py); two cases
run as real processes to show what a terminal shows. docs/training.md ("Mistakes and what they print") lists
the cases.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stagewise.loaders import StageParams
from stagewise.pipeline.build_shards import build_shards
from stagewise.pipeline.cli import main as pipeline
from stagewise.train import data, preflight
from stagewise.train.cli import main as train
from stagewise.train.config import parse
from stagewise.train.schedule import PRESETS, count
from tests.conftest import _free_port, write_solid_tree

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dest(tmp_path_factory) -> str:
    """24 train / 8 val images of 4 classes, 96 x 72 px."""
    root = tmp_path_factory.mktemp("first-hour")
    write_solid_tree(root / "train", num_classes=4, per_class=6)
    write_solid_tree(root / "val", num_classes=4, per_class=2)
    build_shards(str(root / "train"), str(root / "ds"), split="train")
    build_shards(str(root / "val"), str(root / "ds"), split="val")
    return str(root / "ds")


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train-only")
    write_solid_tree(root / "train", num_classes=4, per_class=6)
    build_shards(str(root / "train"), str(root / "ds"), split="train")
    return str(root / "ds")


def one_line(capsys, code: int, *expected: str) -> str:
    """The command said one line on stderr, with each of `expected`, and exited 2."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# --- the trainer -------------------------------------------------------------------------------------------

TRAIN_MISTAKES = {  # name: (arguments after --data DEST --run.dir RUN, what the line says)
    "batch larger than the data": (["--optim.batch_size=4096"],
                                   ["larger than the 24 training images", "--optim.batch_size=12"]),
    "unknown model, a torchvision name": (["--model", "resnet18"], ["did you mean torchvision:resnet18"]),
    "unknown torchvision model": (["--model", "torchvision:resnet81"], ["did you mean torchvision:resnet18"]),
    "mistyped key": (["--optim.lrr=0.1"], ["unknown option '--optim.lrr'", "did you mean '--optim.lr'"]),
    "mistyped alias": (["--modle", "efficientnetv2_b0"], ["did you mean '--model'"]),
    "a positional argument": (["DEST"], ["unexpected argument 'DEST'", "--data DEST"]),
    "wrong type": (["--optim.lr=fast"], ["optim.lr must be float"]),
    "warm-up as long as the run": (["--schedule.epochs=2", "--optim.warmup_epochs=5"],
                                   ["optim.warmup_epochs=5 is not shorter than the run (2 epochs)",
                                    "--optim.warmup_epochs=0.2"]),
    "bad crop range (the loader's rule)": (["--data.crop_scale=0.5,0.1"], ["data.crop_scale: AugmentSpec.scale"]),
    "unknown schedule kind (the schedule's rule)": (["--schedule.kind=cosine"], ["schedule.kind: unknown schedule"]),
    "unknown fault policy (the loader's rule)": (["--data.on_error=ignore"], ["data.on_error: ReadSpec.on_error"]),
    "missing fine-tuning checkpoint": (["--finetune-from", "/nonexistent/ck.pt", "--optim.batch_size=12"],
                                       ["run.finetune_from: /nonexistent/ck.pt does not exist"]),
    "missing config file": (["--config", "/nonexistent/run.yaml"], ["does not exist"]),
    "missing value": (["--optim.lr"], ["expected one argument"]),
}


@pytest.mark.parametrize("name", list(TRAIN_MISTAKES))
def test_a_training_mistake_is_one_line_and_creates_nothing(dest, tmp_path, capsys, name):
    args, expected = TRAIN_MISTAKES[name]
    run_dir = tmp_path / "run"
    try:
        code = train(["--data", dest, "--run.dir", str(run_dir), *args])
    except SystemExit as exc:  # argparse's own exit, one line through OneLineParser
        code = exc.code
    one_line(capsys, code, *expected)
    assert not run_dir.exists()


def test_no_val_split_says_how_to_build_it(train_only, tmp_path, capsys):
    run_dir = tmp_path / "run"
    line = one_line(capsys, train(["--data", train_only, "--run.dir", str(run_dir)]),
                    "has no 'val' split", "--split val", "--data.val_split=''")
    assert "pipeline build-shards SRC" in line and not run_dir.exists()


@pytest.mark.parametrize("url, expected", [
    ("", "data.url is empty: pass --data DEST"),
    ("/nonexistent/ds", "data.url: no manifest.json in /nonexistent/ds: build a dataset there with"),
])
def test_no_dataset(tmp_path, capsys, url, expected):
    one_line(capsys, train(["--data", url, "--run.dir", str(tmp_path / "run")] if url else
                           ["--run.dir", str(tmp_path / "run")]), expected)
    assert not (tmp_path / "run").exists()


def test_every_problem_is_reported_together(dest, tmp_path, capsys):
    code = train(["--data", dest, "--run.dir", str(tmp_path / "run"), "--optim.batch_size=4096",
                  "--data.val_split=test", "--data.hflip_prob=2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    assert any("data.val_split" in x for x in lines) and any("data.hflip_prob" in x for x in lines)
    assert any("--optim.batch_size=12" in x for x in lines)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(dest, tmp_path, capsys):
    one_line(capsys, train(["--data", dest, "--run.dir", str(tmp_path / "run"), "--run.device=cuda"]),
             "--run.device=cpu")


def test_a_run_folder_is_not_overwritten(dest, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text('{"kind": "done"}\n')
    one_line(capsys, train(["--data", dest, "--run.dir", str(run_dir)]),
             "already holds a run (log.jsonl)", "--resume", "--run.dir", "--run.overwrite")
    assert sorted(os.listdir(run_dir)) == ["log.jsonl"]


def test_overwrite_clears_the_earlier_run_and_elastic_restarts_resume(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "tensorboard").mkdir(parents=True)
    for name in ("log.jsonl", "last.pt", "stage-1.pt", "tensorboard/events.out.tfevents.1", "notes.txt"):
        (run_dir / name).write_text("x")
    cfg = parse(["--run.dir", str(run_dir), "--run.overwrite"])
    assert preflight._run_folder(cfg) == []
    assert len(preflight.clear_run(cfg)) == 4
    assert sorted(os.listdir(run_dir)) == ["notes.txt", "tensorboard"]
    plain = parse(["--run.dir", str(run_dir)])
    assert not preflight.resuming(plain)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert preflight.resuming(plain)  # a restart by torchrun's elastic agent continues the run


def test_debug_shows_the_traceback_and_a_bug_keeps_it(dest, tmp_path, monkeypatch):
    with pytest.raises(preflight.PreflightError):
        train(["--data", dest, "--run.dir", str(tmp_path / "run"), "--optim.batch_size=4096", "--debug"])
    monkeypatch.setattr("stagewise.train.cli.train", lambda cfg: 1 / 0)  # a bug, not a mistake
    with pytest.raises(ZeroDivisionError):
        train(["--data", dest])


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "stagewise.train", "--model", "resnet18"],
    [sys.executable, "-m", "stagewise.pipeline", "build-shards", "/nonexistent", "DEST_NOT_MADE"],
])
def test_a_terminal_sees_one_line(dest, tmp_path, command):
    """A real process: what a person sees, status 2, and STAGEWISE_DEBUG=1 brings the traceback back."""
    command = [c if c != "DEST_NOT_MADE" else str(tmp_path / "out") for c in command]
    command += ["--data", dest, "--run.dir", str(tmp_path / "run")] if "stagewise.train" in command else []
    env = {k: v for k, v in os.environ.items() if k != "STAGEWISE_DEBUG"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
    if "stagewise.train" in command:
        debug = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                               env={**env, "STAGEWISE_DEBUG": "1"})
        assert "Traceback" in debug.stderr and "PreflightError" in debug.stderr


# --- S3 -----------------------------------------------------------------------------------------------------


@pytest.fixture()
def no_credentials(s3_endpoint, monkeypatch, tmp_path):
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup (1 s per try)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture()
def refused_endpoint(s3_endpoint, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


S3_COMMANDS = {
    "train": lambda url, tmp: train(["--data", url, "--run.dir", str(tmp / "run")]),
    "build-shards": lambda url, tmp: pipeline(["build-shards", str(write_solid_tree(tmp / "src", 2, 2)), url,
                                               "--no-progress", "--workers", "1"]),
    "verify-shards": lambda url, tmp: pipeline(["verify-shards", url]),
    "stats": lambda url, tmp: pipeline(["stats", url]),
}


@pytest.mark.parametrize("command", list(S3_COMMANDS))
def test_s3_without_credentials(no_credentials, tmp_path, capsys, command):
    one_line(capsys, S3_COMMANDS[command]("s3://bucket/ds", tmp_path), "no S3 credentials found",
             "AWS_ACCESS_KEY_ID")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "stats"])
def test_s3_endpoint_that_refuses(refused_endpoint, tmp_path, capsys, command):
    one_line(capsys, S3_COMMANDS[command]("s3://bucket/ds", tmp_path), "cannot connect to the S3 endpoint",
             "AWS_ENDPOINT_URL")


@pytest.mark.parametrize("command", list(S3_COMMANDS))
def test_s3_bucket_that_does_not_exist(s3_endpoint, tmp_path, capsys, command):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    one_line(capsys, S3_COMMANDS[command]("s3://no-such-bucket-18/ds", tmp_path), "no-such-bucket-18")
    assert not (tmp_path / "run").exists()


# --- shards -------------------------------------------------------------------------------------------------


def test_an_empty_class_folder_is_refused_or_kept_on_request(tmp_path, capsys):
    src = write_solid_tree(tmp_path / "src", num_classes=3, per_class=2)
    (src / "empty_class").mkdir()
    out = tmp_path / "out"
    one_line(capsys, pipeline(["build-shards", str(src), str(out), "--no-progress", "--workers", "1"]),
             "['empty_class'] hold no files", "--keep-empty-classes")
    assert not out.exists()
    assert pipeline(["build-shards", str(src), str(out), "--no-progress", "--workers", "1",
                     "--keep-empty-classes"]) == 0
    counts = json.loads((out / "manifest.json").read_text())["splits"]["train"]["class_counts"]
    assert counts == [2, 2, 2, 0]
    capsys.readouterr()
    one_line(capsys, train(["--data", str(out), "--data.val_split=", "--run.dir", str(tmp_path / "run")]),
             "1 class without images", "empty_class")


@pytest.mark.parametrize("layout_tree, args, expected", [
    ("plain", ["--layout", "imagenet"], ["--layout imagenet expects SRC/train/<wnid>", "use --layout folder"]),
    ("splits", ["--layout", "imagenet"], ["not WordNet ids", "use --layout folder"]),
    ("splits", [], ["holds split folders (train, val), not classes"]),
    ("missing", [], ["not a folder"]),
])
def test_a_tree_that_does_not_match_the_layout_is_refused_before_anything_is_written(tmp_path, capsys, layout_tree,
                                                                                     args, expected):
    src = tmp_path / "src"
    if layout_tree == "plain":
        write_solid_tree(src, 2, 2)
    elif layout_tree == "splits":
        write_solid_tree(src / "train", 2, 2)
        write_solid_tree(src / "val", 2, 1)
    out = tmp_path / "out"
    one_line(capsys, pipeline(["build-shards", str(src), str(out), "--no-progress", *args]), *expected)
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["build-shards", "SRC", "DEST", "--workres", "2"], ["unknown option '--workres'", "did you mean '--workers'"]),
    (["train", "--optim.lrr=1"], ["unknown option '--optim.lrr'", "did you mean '--optim.lr'"]),
    (["schedule", "--preset", "efficientnetv2_s", "--data", "/nonexistent"], ["no manifest.json in /nonexistent"]),
    (["stats", "/nonexistent"], ["no manifest.json in /nonexistent"]),
    (["verify-shards", "/nonexistent"], ["no manifest.json in /nonexistent"]),
])
def test_pipeline_mistakes(capsys, argv, expected):
    try:
        code = pipeline(argv)
    except SystemExit as exc:
        code = exc.code
    one_line(capsys, code, *expected)


# --- defaults that fit the data, and the smaller things ----------------------------------------------------


def test_auto_values_are_the_papers_on_imagenet_and_scale_down():
    assert data.auto_batch(1_281_167) == 4096 and data.auto_batch(1_281_167, world_size=8) == 4096
    assert (data.auto_warmup(350), data.auto_decay_epochs(350)) == (5.0, 2.4)
    assert data.auto_bn_momentum(350 * (1_281_167 // 4096)) == 0.0  # the model's own (TF 0.99)
    assert data.auto_batch(1600) == 32 and data.auto_batch(148) == 16 and data.auto_batch(24) == 12
    assert data.auto_batch(10) == 10
    assert data.auto_batch(1600, world_size=3) == 30  # a multiple of the world size
    assert data.auto_warmup(12) == pytest.approx(1.2) and data.auto_bn_momentum(600) == pytest.approx(50 / 600)
    s = PRESETS["efficientnetv2_s"]
    assert data.capped_sizes(s, 500) is None  # ImageNet's typical 500 px: the paper's 128 -> 300
    assert data.capped_sizes(s, 128) == (56, 128) and data.capped_sizes(s, 96) == (40, 96)
    assert data.capped_sizes(s, 64) == (40, 64) and data.capped_sizes(s, 36) == (32, 32)  # above the stride if it can


def test_preflight_fills_the_auto_values_from_the_data(dest, tmp_path):
    plan = preflight.check(parse(["--data", dest, "--run.dir", str(tmp_path / "run"), "--schedule.epochs=10"]))
    cfg = plan.cfg
    assert (cfg.optim.batch_size, cfg.schedule.min_size, cfg.schedule.max_size) == (12, 40, 96)  # 96 x 72 images
    assert cfg.optim.warmup_epochs == pytest.approx(1.0) and cfg.optim.decay_epochs == pytest.approx(2.4 / 35)
    assert cfg.model.bn_momentum == 0.1  # 20 steps: as fast as allowed
    assert [sp.values.image_size for sp in plan.stages] == [40, 56, 80, 96]
    assert any("auto, from 24 images: optim.batch_size=12" in n for n in plan.notes)
    assert not (tmp_path / "run").exists()


def test_a_batch_that_drops_much_of_the_data_is_said_before_training(dest, tmp_path):
    plan = preflight.check(parse(["--data", dest, "--run.dir", str(tmp_path / "run"), "--optim.batch_size=16"]))
    assert any("batch 16 on 24 images leaves out 8 (33%) every epoch" in n and "--optim.batch_size=12" in n
               for n in plan.notes)


def test_stage_params_for_an_eval_loader_and_plurals():
    p = StageParams(image_size=96)
    assert (p.randaug_magnitude, p.mixup_alpha, p.randaugment_on, p.mixing_on) == (0.0, 0.0, False, False)
    assert (count(1, "stage"), count(1, "epoch"), count(4, "stage"), count(2, "class"), count(1_600, "image")) == \
        ("1 stage", "1 epoch", "4 stages", "2 classes", "1,600 images")


def test_schedule_counts_the_datas_images(dest, capsys):
    assert pipeline(["schedule", "--preset", "efficientnetv2_s", "--data", dest, "--epochs", "4"]) == 0
    out = capsys.readouterr().out
    assert "24 images per epoch, global batch 12" in out and "1,281,167" not in out
    assert pipeline(["schedule", "--preset", "efficientnetv2_s", "--stages", "1", "--epochs", "1"]) == 0
    assert "1 stage, 1 epoch, 1,281,167 images per epoch" in capsys.readouterr().out


def test_help_lists_every_key(capsys):
    """argparse %-formats help texts: a bare % in one (as "10% of the run" once was) breaks --help."""
    with pytest.raises(SystemExit) as done:
        parse(["--help"])
    assert done.value.code == 0 and "--run.overwrite" in capsys.readouterr().out

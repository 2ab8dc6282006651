"""The trainer's config tree: defaults, recipes, files, command line, rejection of bad keys/types, and redaction."""
from __future__ import annotations

import pytest

from stagewise.train.config import Config, ConfigError, differences, dump_yaml, parse, redacted, to_dict


def test_defaults_are_the_papers_imagenet_recipe():
    """Batch, warm-up and decay period are auto (filled from the data by preflight: the paper's 4096, 5 and 2.4
    on ImageNet, tests/test_first_hour.py); the rest is §5.1 as is."""
    cfg = parse([])
    assert cfg.recipe == "imagenet1k"
    o = cfg.optim
    assert (o.optimizer, o.batch_size, o.lr, o.lr_batch) == ("rmsprop_tf", 0, 0.256, 4096)
    assert (o.rmsprop_decay, o.momentum, o.eps) == (0.9, 0.9, 1e-3)
    assert (o.lr_decay, o.decay_rate, o.decay_epochs, o.warmup_epochs) == ("exponential", 0.97, 0.0, -1.0)
    assert (o.weight_decay, o.label_smoothing, o.ema_decay) == (1e-5, 0.1, 0.9999)
    assert cfg.model.drop_path_rate == 0.2  # survival probability 0.8
    assert (cfg.schedule.epochs, cfg.schedule.stages, cfg.schedule.kind) == (350, 4, "paper")
    assert cfg.schedule.per_stage_batch is False


def test_command_line_overrides_with_types():
    cfg = parse(["--optim.lr=0.1", "--optim.batch_size", "256", "--model.channels_last=false", "--run.resume",
                 "--data.mean=0.4,0.5,0.6", "--model", "torchvision:resnet50", "--schedule", "automl",
                 "--data", "s3://bucket/imagenet"])
    assert cfg.optim.lr == 0.1 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.batch_size == 256 and isinstance(cfg.optim.batch_size, int)
    assert cfg.model.channels_last is False and cfg.run.resume is True
    assert cfg.data.mean == (0.4, 0.5, 0.6)
    assert cfg.model.name == "torchvision:resnet50" and cfg.schedule.kind == "automl"
    assert cfg.data.url == "s3://bucket/imagenet"


def test_yaml_file_then_command_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("recipe: imagenet21k-30\noptim:\n  lr: 0.5\n  grad_clip: 1\nschedule:\n  stages: 3\n")
    cfg = parse(["--config", str(f), "--schedule.stages=2"])
    assert cfg.schedule.epochs == 30 and cfg.optim.lr_decay == "cosine"  # from the recipe named in the file
    assert cfg.optim.lr == 0.5
    assert cfg.optim.grad_clip == 1.0 and isinstance(cfg.optim.grad_clip, float)  # an int is a fine float
    assert cfg.schedule.stages == 2  # the command line wins over the file


def test_toml_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\nname = "efficientnetv2_m"\nsync_bn = true\n[data]\nstd = [0.2, 0.2, 0.2]\n')
    cfg = parse(["--config", str(f)])
    assert cfg.model.name == "efficientnetv2_m" and cfg.model.sync_bn is True and cfg.data.std == (0.2, 0.2, 0.2)


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lrr: 0.1\n", r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    ("optimizer:\n  lr: 0.1\n", "unknown config key 'optimizer.lr'"),
    ("optim: 3\n", "unknown config key 'optim'"),
    ("optim:\n  lr: fast\n", "optim.lr must be float, got 'fast'"),
    ("optim:\n  batch_size: 3.5\n", "optim.batch_size must be int, got 3.5"),
    ("model:\n  compile: 'yes'\n", "model.compile must be bool, got 'yes'"),
    ("optim:\n  batch_size: true\n", "optim.batch_size must be int, got True"),
    ("data:\n  mean: [0.5, 0.5]\n", "data.mean must be 3 numbers"),
    ("data:\n  hflip_prob: false\n", "data.hflip_prob must be float, got False"),  # a probability, not a switch
    ("data:\n  hflip_prob: 'off'\n", "data.hflip_prob must be float, got 'off'"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("optim: [unclosed\n", "cannot parse"),
])
def test_bad_files_are_rejected_naming_file_and_key(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        parse(["--config", str(f)])
    assert str(f) in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["--optim.lrr=1"], r"unknown option '--optim.lrr' \(did you mean '--optim.lr'\?\)"),
    (["--optim.lr=fast"], "--optim.lr: optim.lr must be float, got 'fast'"),
    (["--run.resume=maybe"], "run.resume must be bool"),
    (["--optim.batch_size=-1"], "optim.batch_size must be >= 1"),
    (["--recipe=imagenet22k"], "recipe must be one of"),
    (["--config", "/nonexistent/x.yaml"], "does not exist"),
    (["--data.hflip_prob=no"], "--data.hflip_prob: data.hflip_prob must be float, got 'no'"),
])
def test_bad_command_lines_are_rejected(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_recipes():
    t = parse(["--recipe", "transfer"])
    assert (t.optim.batch_size, t.optim.lr, t.optim.lr_batch, t.optim.lr_decay) == (512, 0.001, 512, "cosine")
    assert (t.schedule.max_steps, t.optim.weight_decay) == (10_000, 0.0)
    assert parse(["--finetune-from", "ckpt.pt"]).recipe == "transfer"  # fine-tuning defaults to transfer
    ft = parse(["--finetune-from", "ckpt.pt", "--recipe", "finetune-1k"])
    assert (ft.recipe, ft.schedule.epochs, ft.optim.lr_decay) == ("finetune-1k", 15, "cosine")
    assert parse(["--recipe", "imagenet21k-60"]).schedule.epochs == 60
    assert parse(["--recipe", "transfer", "--optim.lr=0.01"]).optim.lr == 0.01  # overrides beat recipes


def test_credentials_never_reach_the_printout():
    cfg = parse(["--data.url=s3://AKIAEXAMPLE:hunter2-secret@bucket/data",
                 "--finetune-from=https://host/ckpt.pt?X-Amz-Signature=deadbeef1234&x=1"])
    text = dump_yaml(cfg)
    assert "hunter2-secret" not in text and "AKIAEXAMPLE" not in text and "deadbeef1234" not in text
    assert "s3://***@bucket/data" in text and "X-Amz-Signature=***" in text
    for section in ("data:", "model:", "schedule:", "optim:", "run:", "recipe:"):
        assert section in text  # printed in full
    tree = redacted({"storage": {"aws_secret_access_key": "zzz", "session_token": "ttt", "api_key": "kkk",
                                 "region": "us-east-1"}})
    assert tree == {"storage": {"aws_secret_access_key": "***", "session_token": "***", "api_key": "***",
                                "region": "us-east-1"}}


def test_differences_name_the_changed_keys():
    a = to_dict(Config())
    b = to_dict(parse(["--optim.lr=0.1", "--run.progress=false"]))
    assert differences(a, b) == ["optim.lr: 0.256 -> 0.1", "run.progress: True -> False"]
    assert differences(a, b, ignore=("run.",)) == ["optim.lr: 0.256 -> 0.1"]


def test_hflip_prob_is_accepted_from_file_and_command_line(tmp_path):
    assert parse([]).data.hflip_prob == 0.5  # the loader's default: mirror half the training images
    f = tmp_path / "digits.yaml"
    f.write_text("data:\n  hflip_prob: 0\n")
    from_file = parse(["--config", str(f)]).data.hflip_prob
    assert from_file == 0.0 and isinstance(from_file, float)  # an int is a fine float
    assert parse(["--data.hflip_prob=1"]).data.hflip_prob == 1.0


def test_a_key_missing_from_an_older_tree_counts_as_its_default():
    """Checkpoints written before `data.hflip_prob` existed resume while it keeps its default."""
    old = to_dict(Config())
    del old["data"]["hflip_prob"]
    assert differences(old, to_dict(Config())) == []
    assert differences(old, to_dict(parse(["--data.hflip_prob=0"]))) == ["data.hflip_prob: 0.5 -> 0.0"]

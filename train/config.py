"""The trainer's one typed configuration tree: defaults in code, a recipe, a YAML/TOML file, then `--section.key=value`.

Layers, later wins: the dataclass defaults below (the paper's §5.1 ImageNet
recipe) -> the named `recipe` (ImageNet-21k, fine-tuning, transfer) -> the
`--config` file -> command-line overrides. Unknown keys and values of the
wrong type are rejected with the key and the source named, from files as well
as from the command line. `redacted()` hides credentials before anything is
printed or saved.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str) -> Any:  # noqa: A002 - `help` reads best here
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    url: str = _f("", "dataset DEST built by `pipeline build-shards` (local path or s3://bucket/prefix)")
    train_split: str = _f("train", "split to train on")
    val_split: str = _f("val", "split to evaluate on at stage ends; '' = no evaluation")
    device: str = _f("auto", "where the loader decodes: auto (= run.device) | cuda | cpu")
    num_threads: int = _f(0, "loader threads per process; 0 = the loader's default")
    eval_size: int = _f(0, "test image size, px; 0 = the variant's test/train ratio x the final train size "
                              "(S at 300: 384, paper Table 6)")
    eval_crop_pct: float = _f(0.0, "test center-crop fraction; 0 = the variant's (1.0 for S/M/L)")
    eval_batch_size: int = _f(0, "global eval batch; 0 = the training batch")
    mean: tuple[float, float, float] = _f((0.5, 0.5, 0.5), "normalization mean on the 0..1 scale (official V2: 0.5)")
    std: tuple[float, float, float] = _f((0.5, 0.5, 0.5), "normalization std on the 0..1 scale")
    crop_scale: tuple[float, float] = _f((0.05, 1.0), "random-resized-crop area range (official code: 0.05..1)")
    hflip_prob: float = _f(0.5, "chance that a training image is mirrored left-right; 0 = never (digits, text)")
    randaug_ops: int = _f(2, "RandAugment ops per image (paper: 2)")
    on_error: str = _f("raise", "undecodable sample: raise | skip")
    cpu_decoder: str = _f("auto", "decoder in the loader's CPU mode: host (crop-decode-resize in C threads, "
                                  "loaders/_cropdecode.c) | dali (DALI's decoder and resize) | auto (host where "
                                  "built; on resume, the checkpoint's)")


@dataclass
class ModelConfig:
    name: str = _f("efficientnetv2_s", "a model/ name (see `model.list_models()`) or torchvision:NAME")
    drop_path_rate: float = _f(0.2, "stochastic depth rate = 1 - survival probability (paper §5.1: survival 0.8)")
    zero_head: bool = _f(True, "zero-initialize the classifier: training starts at loss ln(classes) (train/models.py)")
    bn_momentum: float = _f(0.0, "> 0: torch BN momentum for all BN layers; 0 = auto: the model's (TF 0.99), faster "
                                 "on runs under 5,000 steps (docs/training.md, Defaults that fit the data)")
    sync_bn: bool = _f(False, "SyncBatchNorm across ranks")
    channels_last: bool = _f(True, "channels_last memory format for model and images")
    compile: bool = _f(False, "torch.compile the model")
    tf_same_padding: bool = _f(False, "TF SAME padding (only for weights ported from TF)")


@dataclass
class ScheduleConfig:
    kind: str = _f("paper", "paper (Algorithm 1) | automl (official code) | random-resize (Mix&Match, Table 13) | "
                            "ffcv (late linear size ramp) | composer (progressive resizing); the last two keep "
                            "regularization constant")
    preset: str = _f("", "Table 6 preset; '' = the model's name when it is one, else built from its variant row")
    stages: int = _f(4, "progressive stages M (paper: 4); 1 = train at the final values throughout")
    epochs: int = _f(350, "training epochs (paper §5.1: 350)")
    max_steps: int = _f(0, "> 0: stop after this many optimizer steps; epochs then follow from it")
    time_budget: str = _f("", "wall-clock budget such as 2h, 45m, 1h30m: the epochs are chosen so that the run, "
                              "evaluation included, ends within it (overrides epochs); '' = off")
    chunk_epochs: int = _f(8, "random-resize: epochs per sampled size (paper §6.3: 8)")
    ramp_start: float = _f(-1.0, "ffcv: share of the run at which the size ramp starts; < 0 = FFCV's rn50 configs'")
    ramp_end: float = _f(-1.0, "ffcv: share of the run at which the size ramp ends; < 0 = FFCV's rn50 configs'")
    delay_fraction: float = _f(0.5, "composer: share of the run at the initial scale (min_size/max_size)")
    finetune_fraction: float = _f(0.2, "composer: share of the run, at its end, at the full size")
    adaptive: bool = _f(True, "regularization follows the size; false = fixed at the max values (Table 13 vanilla)")
    per_stage_batch: bool = _f(False, "batch ~ (Se/Si)^2 per stage, LR scaled linearly (about constant memory)")
    min_size: int = _f(0, "first-stage image size, px; 0 = the preset's")
    max_size: int = _f(0, "last-stage image size, px; 0 = the preset's")
    min_randaug: float = _f(-1.0, "first-stage RandAugment magnitude; < 0 = the preset's")
    max_randaug: float = _f(-1.0, "last-stage RandAugment magnitude; < 0 = the preset's")
    min_mixup: float = _f(-1.0, "first-stage mixup alpha; < 0 = the preset's")
    max_mixup: float = _f(-1.0, "last-stage mixup alpha; < 0 = the preset's")
    min_dropout: float = _f(-1.0, "first-stage dropout; < 0 = the preset's")
    max_dropout: float = _f(-1.0, "last-stage dropout; < 0 = the preset's")


@dataclass
class OptimConfig:
    optimizer: str = _f("rmsprop_tf", "rmsprop_tf (paper) | momentum (SGD + Nesterov, for ResNets)")
    batch_size: int = _f(0, "global batch, images per step; 0 = auto: the paper's 4096, or a power of two near "
                             "images/40 on smaller data")
    batch_per_rank: int = _f(0, "> 0: batch per process; the global batch is then this x world size")
    lr: float = _f(0.256, "peak learning rate per `lr_batch` images, scaled linearly with the global batch")
    lr_batch: int = _f(4096, "batch that `lr` refers to (paper: 0.256 per 4096)")
    lr_decay: str = _f("exponential", "exponential (x decay_rate every decay_epochs, staircase) | cosine")
    decay_rate: float = _f(0.97, "exponential decay factor (paper: 0.97)")
    decay_epochs: float = _f(0.0, "epochs between exponential decays; 0 = auto: the paper's 2.4 per 350 epochs, "
                                  "scaled to the run")
    warmup_epochs: float = _f(-1.0, "linear warm-up from 0, epochs; < 0 = auto: the paper's 5, at most a tenth of the run")
    weight_decay: float = _f(1e-5, "L2 on conv/linear weights, not on BN or biases (paper: 1e-5)")
    momentum: float = _f(0.9, "RMSProp / SGD momentum (paper: 0.9)")
    rmsprop_decay: float = _f(0.9, "RMSProp squared-gradient decay (paper: 0.9)")
    eps: float = _f(1e-3, "RMSProp epsilon, inside the square root as in TF (official: 1e-3)")
    label_smoothing: float = _f(0.1, "label smoothing (paper: 0.1)")
    grad_clip: float = _f(0.0, "> 0: clip the global gradient norm to this")
    ema_decay: float = _f(0.9999, "EMA of weights (paper: 0.9999); 0 = no EMA")
    ema_warmup: bool = _f(True, "TF num_updates warm-up: decay = min(ema_decay, (1+t)/(10+t))")


@dataclass
class RunConfig:
    dir: str = _f("runs/train", "local folder for logs, TensorBoard, plots")
    ckpt_dir: str = _f("", "checkpoint folder (local or s3://); '' = run.dir")
    seed: int = _f(0, "seed of model init, dropout and the loader's order")
    device: str = _f("auto", "auto (cuda when available) | cuda | cpu")
    threads: int = _f(0, "torch CPU threads per process; 0 = auto: on CPU half the cores, shared by the node's "
                          "processes (the loader takes the rest); on GPU torch's default")
    bf16: bool = _f(True, "bf16 autocast on GPU (ignored on CPU)")
    ckpt_every: int = _f(1000, "checkpoint every N optimizer steps (and at every stage end); 0 = stage ends only")
    ckpt_every_s: float = _f(1800.0, "also checkpoint when this many seconds passed since the last one (bounds the "
                                     "work a SIGKILL loses); 0 = off")
    checkpoints: bool = _f(True, "write checkpoints (false: benchmarks and smoke runs that keep nothing)")
    resume: bool = _f(False, "continue from the latest checkpoint in ckpt_dir (if there is one)")
    overwrite: bool = _f(False, "start a new run in a run.dir that holds one (its log and checkpoints are removed)")
    finetune_from: str = _f("", "checkpoint to start from, with a new classifier head (a resume takes precedence)")
    eval: str = _f("stages", "evaluate the EMA weights on data.val_split: stages (every stage end) | end | none")
    eval_points: int = _f(0, "also evaluate at this many evenly spaced steps (time-to-accuracy curves); 0 = none")
    log_every: int = _f(20, "log metrics every N steps")
    progress: bool = _f(True, "progress bar per stage (rank 0)")
    plots: bool = _f(True, "PNG plots in run.dir at the end")
    tensorboard: bool = _f(True, "TensorBoard scalars in run.dir")
    sample_log: bool = _f(False, "each rank writes every step's sample keys to run.dir/samples-rank<R>.jsonl "
                                 "(which samples each global step trained on, across restarts and world sizes)")
    dist_timeout_s: int = _f(600, "timeout of collective operations, seconds")


@dataclass
class Config:
    recipe: str = _f("imagenet1k", "imagenet1k | imagenet21k-60 | imagenet21k-30 | finetune-1k | transfer")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Recipes: changes to the defaults, applied before the file and the command line.
RECIPES: dict[str, dict[str, Any]] = {
    "imagenet1k": {},  # paper §5.1: the defaults above
    # paper §5.2: 60 or 30 epochs with cosine decay; multi-label targets come from
    # the dataset. (The official code also disables staging and augmentation for
    # 21k; the paper says it reuses the 1k settings, which we follow.)
    "imagenet21k-60": {"schedule.epochs": 60, "optim.lr_decay": "cosine"},
    "imagenet21k-30": {"schedule.epochs": 30, "optim.lr_decay": "cosine"},
    # paper §5.2: 21k -> 1k fine-tuning for 15 epochs, cosine; one stage at the
    # final values (the official ImagenetFt config sets stages=0).
    "finetune-1k": {"schedule.epochs": 15, "optim.lr_decay": "cosine", "schedule.stages": 1},
    # paper §5.3: batch 512, LR 0.001 with cosine decay, 10,000 steps, no weight
    # decay. Deviation: the paper adds cutout; the loader has no cutout.
    "transfer": {"optim.batch_size": 512, "optim.lr": 0.001, "optim.lr_batch": 512, "optim.lr_decay": "cosine",
                 "schedule.max_steps": 10_000, "optim.weight_decay": 0.0, "schedule.stages": 1},
}

# data.cpu_decoder -> the loader's EngineSpec.host_decode (None: the loader's per-device default).
CPU_DECODERS: dict[str, bool | None] = {"auto": None, "host": True, "dali": False}

CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": tuple(RECIPES),
    "data.device": ("auto", "cuda", "cpu"),
    "data.cpu_decoder": tuple(CPU_DECODERS),
    "optim.optimizer": ("rmsprop_tf", "momentum"),
    "optim.lr_decay": ("exponential", "cosine"),
    "run.device": ("auto", "cuda", "cpu"),
    "run.eval": ("stages", "end", "none"),
}

# Top-level flags kept short for everyday use; each is one key of the tree.
ALIASES: dict[str, str] = {
    "--model": "model.name",
    "--data": "data.url",
    "--schedule": "schedule.kind",
    "--preset": "schedule.preset",
    "--run-dir": "run.dir",
    "--finetune-from": "run.finetune_from",
}


class ConfigError(ValueError):
    """A key that does not exist or a value of the wrong type; the message names both and the source."""


# --- The tree as flat keys ----------------------------------------------------------------


def _leaf_types(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """{'optim.lr': float, ...} for every leaf of the tree."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_leaf_types(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


LEAVES = _leaf_types()


def _help(key: str) -> str:
    obj: Any = Config
    parts = key.split(".")
    for p in parts[:-1]:
        obj = typing.get_type_hints(obj)[p]
    f = {x.name: x for x in dataclasses.fields(obj)}[parts[-1]]
    return f.metadata.get("help", "")


def to_dict(cfg: Config) -> dict:
    """The tree as nested plain dicts (tuples become lists), for YAML/JSON and checkpoints."""
    def conv(x: Any) -> Any:
        if isinstance(x, tuple):
            return [conv(v) for v in x]
        return x
    return {k: ({kk: conv(vv) for kk, vv in v.items()} if isinstance(v, dict) else conv(v))
            for k, v in dataclasses.asdict(cfg).items()}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unknown(key: str, where: str) -> ConfigError:
    near = difflib.get_close_matches(key, list(LEAVES), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, where: str, from_text: bool) -> Any:
    """`value` as the leaf's type. Text (command line) is parsed; file values must already have the type."""
    t = LEAVES[key]
    bad = ConfigError(f"{where}: {key} must be {getattr(t, '__name__', str(t))}, got {value!r}")
    if t is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if t is str:
        if not isinstance(value, str):
            raise bad
        choices = CHOICES.get(key)
        if choices and value not in choices:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(choices)}; got {value!r}")
        return value
    if typing.get_origin(t) is tuple:
        n = len(typing.get_args(t))
        items = value.split(",") if (from_text and isinstance(value, str)) else value
        if not isinstance(items, (list, tuple)) or len(items) != n:
            raise ConfigError(f"{where}: {key} must be {n} numbers, got {value!r}")
        try:
            return tuple(_coerce_number(x, from_text) for x in items)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be {n} numbers, got {value!r}") from None
    raise TypeError(f"no coercion for {key}: {t}")  # a programming error in the tree


def _coerce_number(x: Any, from_text: bool) -> float:
    if isinstance(x, bool):
        raise ValueError(x)
    if isinstance(x, (int, float)):
        return float(x)
    if from_text and isinstance(x, str):
        return float(x)
    raise ValueError(x)


def set_key(cfg: Config, key: str, value: Any) -> None:
    section, _, name = key.rpartition(".")
    setattr(getattr(cfg, section) if section else cfg, name, value)


# --- Files ----------------------------------------------------------------------------


def read_file(path: str) -> dict[str, Any]:
    """Flat {key: value} from a YAML (.yaml/.yml) or TOML (.toml) file; unknown keys rejected."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            import tomllib

            tree = tomllib.loads(raw.decode("utf-8"))
        elif path.endswith((".yaml", ".yml")):
            import yaml

            tree = yaml.safe_load(raw) or {}
        else:
            raise ConfigError(f"config file {path}: use a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser error becomes one clear message
        raise ConfigError(f"config file {path}: cannot parse: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    flat = flatten(tree)
    for key in flat:
        if key not in LEAVES:
            raise _unknown(key, f"config file {path}")
    return flat


# --- Command line ---------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE`, the short aliases, `--resume`, and one `--section.key` option per leaf."""
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML file with sections of the tree below")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (= --run.resume)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or STAGEWISE_DEBUG=1)")
    for flag, key in ALIASES.items():
        parser.add_argument(flag, dest=f"alias:{key}", metavar="VALUE", help=f"= --{key}")
    for key, t in LEAVES.items():
        meta = ("BOOL" if t is bool else "N" if t in (int, float) else
                ",".join("ABC"[: len(typing.get_args(t))]) if typing.get_origin(t) is tuple else "S")
        parser.add_argument(f"--{key}", dest=f"key:{key}", metavar=meta, nargs="?" if t is bool else None,
                            const="true" if t is bool else None, help=_help(key))


def from_args(args: argparse.Namespace) -> Config:
    """Defaults -> recipe -> --config file -> command-line values."""
    cli: dict[str, str] = {}
    for dest, value in vars(args).items():
        if value is None:
            continue
        if dest.startswith("key:"):
            cli[dest[4:]] = value
        elif dest.startswith("alias:"):
            cli[dest[6:]] = value
    if getattr(args, "resume", False):
        cli["run.resume"] = "true"
    file_values = read_file(args.config) if getattr(args, "config", None) else {}
    return build(file_values, cli, file_name=getattr(args, "config", None) or "")


def build(file_values: dict[str, Any], cli: dict[str, str], file_name: str = "config file") -> Config:
    cfg = Config()
    recipe = cli.get("recipe", file_values.get("recipe", None))
    if recipe is None and (cli.get("run.finetune_from") or file_values.get("run.finetune_from")):
        recipe = "transfer"  # fine-tuning a checkpoint onto another dataset: paper §5.3
    recipe = _coerce("recipe", recipe or "imagenet1k", "recipe", from_text=False)
    cfg.recipe = recipe
    for key, value in RECIPES[recipe].items():
        set_key(cfg, key, value)
    for key, value in file_values.items():
        set_key(cfg, key, _coerce(key, value, f"config file {file_name}", from_text=False))
    for key, value in cli.items():
        if key not in LEAVES:
            raise _unknown(key, "command line")
        set_key(cfg, key, _coerce(key, value, f"--{key}", from_text=True))
    validate(cfg)
    return cfg


def parse(argv: list[str]) -> Config:
    """The tree from a command line such as `["--config", "a.yaml", "--optim.lr=0.1"]`."""
    from stagewise.pipeline.errors import OneLineParser  # a bad flag is one line, as in every `pipeline` command

    parser = OneLineParser(prog="python -m stagewise.train", allow_abbrev=False,
                           description="Train a classifier on shards, the EfficientNetV2 way.")
    add_arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"command line: {parser.unknown(unknown[0])}")  # the nearest of all flags, aliases too
    return from_args(args)


def validate(cfg: Config) -> None:
    """Range checks of the trainer's own keys that types alone cannot express. Keys the loader, the schedule or
    the model interpret are checked by those parts, in `train/preflight.py`, before anything runs."""
    checks = [
        (cfg.optim.batch_size >= 0, "optim.batch_size must be >= 1 (0 = auto)"),
        (cfg.optim.batch_per_rank >= 0, "optim.batch_per_rank must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.lr_batch >= 1, "optim.lr_batch must be >= 1"),
        (0 <= cfg.optim.label_smoothing < 1, "optim.label_smoothing must be in [0, 1)"),
        (0 <= cfg.optim.ema_decay < 1, "optim.ema_decay must be in [0, 1)"),
        (cfg.optim.eps > 0, "optim.eps must be > 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.decay_epochs >= 0, "optim.decay_epochs must be > 0 (0 = auto)"),
        (cfg.schedule.stages >= 1, "schedule.stages must be >= 1"),
        (cfg.schedule.epochs >= 1, "schedule.epochs must be >= 1"),
        (cfg.schedule.max_steps >= 0, "schedule.max_steps must be >= 0"),
        (0 <= cfg.model.drop_path_rate < 1, "model.drop_path_rate must be in [0, 1)"),
        (0 <= cfg.model.bn_momentum <= 1, "model.bn_momentum must be in [0, 1]"),
        (cfg.run.ckpt_every >= 0, "run.ckpt_every must be >= 0"),
        (cfg.run.log_every >= 1, "run.log_every must be >= 1"),
        (cfg.run.eval_points >= 0, "run.eval_points must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# --- Credentials ------------------------------------------------------------------------

SECRET_NAME = re.compile(r"secret|token|passw|credential|private|(^|[._-])key($|[._-])|api_?key|access_?key", re.I)
URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
SECRET_QUERY = re.compile(r"(?P<name>[?&][^=&]*(?:signature|token|secret|credential|key)[^=&]*=)[^&\s]*", re.I)
REDACTED = "***"


def redact_text(text: str) -> str:
    """URLs lose their user:password@ part and signed query parameters."""
    text = URL_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)
    return SECRET_QUERY.sub(lambda m: m.group("name") + REDACTED, text)


def redacted(tree: dict) -> dict:
    """A copy of a nested dict safe to print or save: credential-like keys and URL credentials hidden."""
    out: dict = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = redacted(v)
        elif SECRET_NAME.search(str(k)) and v not in ("", None):
            out[k] = REDACTED
        elif isinstance(v, str):
            out[k] = redact_text(v)
        else:
            out[k] = v
    return out


def dump_yaml(cfg: Config) -> str:
    """The full tree, redacted, as YAML (what is printed at start and saved beside checkpoints)."""
    import yaml

    return yaml.safe_dump(redacted(to_dict(cfg)), sort_keys=False, default_flow_style=None)


# Keys whose "auto" a resumed run takes from its checkpoint, so that it computes what the interrupted run
# did, and the value they had before they existed (checkpoints saved earlier lack them).
ADOPTED_ON_RESUME = {"data.cpu_decoder": "dali"}  # before 2026-11-28 DALI decoded in CPU mode


def adopt_from_checkpoint(cfg: Config, saved: dict) -> list[str]:
    """Set each ADOPTED_ON_RESUME key still "auto" in `cfg` to the checkpoint's value; `key = value` of each set."""
    flat, done = flatten(saved), []
    for key, before in ADOPTED_ON_RESUME.items():
        section, _, name = key.rpartition(".")
        value = flat.get(key, before)
        if getattr(getattr(cfg, section), name) == "auto" and value != "auto":
            set_key(cfg, key, value)
            done.append(f"{key} = {value!r}")
    return done


def differences(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: a -> b` for the leaves that differ between two (redacted) trees.

    A leaf missing from a tree (one saved before the key existed, such as `data.hflip_prob`)
    counts as its default, so such a checkpoint still resumes while the new key keeps it;
    an ADOPTED_ON_RESUME key counts as the value it had before it existed.
    """
    defaults = flatten(to_dict(Config()))
    fa, fb = {**defaults, **ADOPTED_ON_RESUME, **flatten(a)}, {**defaults, **ADOPTED_ON_RESUME, **flatten(b)}
    keys = sorted(set(fa) | set(fb))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in keys
            if fa.get(k) != fb.get(k) and not k.startswith(ignore)]

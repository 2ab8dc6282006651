"""Preflight: everything about a run that can be known before its first step, checked before anything is created.

`check(cfg)` asks each part to check its own values (the loader's specs, the
model's name, the schedule's kind and stage sizes), reads the manifest, sends
one cheap request to S3, fills the config's auto values from the data
(`train/data.py`, "Defaults that fit the data"), lays out the stages, and
looks at the run folder. Every problem found is reported together in one
`PreflightError`, one line each with its fix; nothing has been written then.
Lines that do not stop a run (a batch that drops a few percent of the data)
come back as notes, printed before the first step.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import os
import re
from dataclasses import dataclass

import torch

from stagewise.loaders import StageParams
from stagewise.loaders.graph import layout_for
from stagewise.model.variants import Variant
from stagewise.shards import MANIFEST_NAME, SplitView
from stagewise.shards.manifest import read_manifest
from stagewise.shards.store import join_url, list_names, probe, remove_url, url_exists
from stagewise.train import budget, checkpoint, data, interrupts, models
from stagewise.train.config import Config, ConfigError
from stagewise.train.distributed import _env_int
from stagewise.train.schedule import (STAGED, PeerRule, Preset, StagePlan, check_config, count, plan,
                                      preset_from_config)

LOG_NAME = "log.jsonl"  # train/telemetry.py's log: with last.pt, the sign that a folder holds a run
TENSORBOARD = "tensorboard"  # train/telemetry.py's SummaryWriter folder in run.dir
# The config key behind each spec field that `data.py` fills from the config (for the line that names it).
SPEC_KEYS = {"scale": "data.crop_scale", "hflip_prob": "data.hflip_prob", "mean": "data.mean", "std": "data.std",
             "crop_pct": "data.eval_crop_pct", "on_error": "data.on_error", "host_decode": "data.cpu_decoder"}
DROP_NOTE = data.MAX_AUTO_DROP  # share of the images the loader's dropped last batch may leave out without a note


class PreflightError(ConfigError):
    """Every problem preflight found, one line each (str() joins them with newlines)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Plan:
    """What preflight worked out, so that `setup` does not work it out again."""

    cfg: Config  # with the auto values filled in
    split: SplitView  # the train split
    variant: Variant | None
    preset: Preset
    batch: int  # global
    epochs: int
    max_steps: int
    stages: list[StagePlan]
    notes: tuple[str, ...]


def resuming(cfg: Config) -> bool:
    """Whether this start may continue a run in run.dir, so that finding one there is no mistake: --resume, or
    a start by torchrun's elastic agent that may be a restart (`interrupts.elastic_restart`: a restart count
    > 0) or a node joining a named job (TORCHELASTIC_RUN_ID other than torchrun's default "none"; whether it
    is this job's, setup() reads from the checkpoint)."""
    named_job = os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none"
    return cfg.run.resume or interrupts.elastic_restart() or named_job


def check(cfg: Config) -> Plan:
    """The run's plan with its auto values filled, or PreflightError with every problem; creates nothing."""
    cfg = copy.deepcopy(cfg)  # auto values are filled into a copy: the caller's config stays as given
    problems: list[str] = []
    world = _env_int("WORLD_SIZE", 1)
    problems += _parts(cfg)
    model_problem = models.check_name(cfg.model.name)
    if model_problem:
        problems.append(model_problem)
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        problems.append("run.device=cuda, but no CUDA device is visible: pass --run.device=cpu (or auto)")
    split = _data(cfg, problems)
    problems += _run_folder(cfg)
    if cfg.run.finetune_from:
        problems += _reachable(cfg.run.finetune_from, "run.finetune_from", must_exist=True)
    if cfg.schedule.time_budget:  # the run's length is the budget's (loop.py: budget.fit, then replan)
        problems += budget.problems(cfg, world)
        cfg.schedule.epochs, cfg.schedule.max_steps = max(cfg.schedule.epochs, cfg.schedule.stages), 0
    if split is None or model_problem or any(p.startswith("schedule.kind") for p in problems):
        raise PreflightError(problems)  # nothing to plan with: what was found so far
    return _planned(cfg, split, problems, world)


def replan(given: Config, checked: Plan, epochs: int, max_steps: int) -> Plan:
    """`checked` again for the run length a time budget chose (train/budget.py): the stages and the auto values
    that follow the length (warm-up, decay, BN momentum) from the config as given; the run folder is not looked at
    again (`check` did)."""
    cfg = copy.deepcopy(given)
    cfg.schedule.epochs, cfg.schedule.max_steps = epochs, max_steps
    return _planned(cfg, checked.split, [], _env_int("WORLD_SIZE", 1))


def layout(checked: Plan, epochs: int) -> list[StagePlan]:
    """The stages `checked` would have over `epochs` epochs (its batch, sizes and schedule kind), as `_stages` lays
    them out: the stage count capped at the epochs where a stage spans whole epochs."""
    return _lay_out(checked.cfg, checked.preset, checked.split.num_samples, checked.batch, _env_int("WORLD_SIZE", 1),
                    epochs)


def _lay_out(cfg: Config, preset: Preset, n: int, batch: int, world: int, epochs: int) -> list[StagePlan]:
    """schedule.py's plan of the config's schedule over `epochs` epochs of `n` images."""
    s = cfg.schedule
    n_stages = s.stages if s.kind == "random-resize" else min(s.stages, epochs)
    return plan(preset, epochs=epochs, n_stages=n_stages, schedule=s.kind, num_images=n, batch_size=batch,
                adaptive=s.adaptive, seed=cfg.run.seed, chunk_epochs=s.chunk_epochs,
                per_stage_batch=s.per_stage_batch, batch_multiple=world, peer=PeerRule.from_config(s))


def _planned(cfg: Config, split: SplitView, problems: list[str], world: int) -> Plan:
    """The auto values, the stages and their sizes checked: the Plan, or PreflightError with `problems` and these."""
    notes: list[str] = []
    variant = models.variant_of(cfg.model.name)
    try:
        preset = preset_from_config(cfg.schedule, cfg.model.name, variant)
    except (ConfigError, ValueError) as exc:
        raise PreflightError(problems + [f"schedule: {exc}"]) from None
    notes += _fit_to_data(cfg, split, preset, world)
    preset = preset_from_config(cfg.schedule, cfg.model.name, variant)  # again: sizes may now be capped
    plan_or_problems = _stages(cfg, split, preset, world, notes)
    if isinstance(plan_or_problems, list):
        raise PreflightError(problems + plan_or_problems)
    batch, epochs, max_steps, stages = plan_or_problems
    problems += _stage_sizes(cfg, variant, preset, stages, notes)
    if problems:
        raise PreflightError(problems)
    return Plan(cfg=cfg, split=split, variant=variant, preset=preset, batch=batch, epochs=epochs,
                max_steps=max_steps, stages=stages, notes=tuple(notes))


def clear_run(cfg: Config) -> list[str]:
    """run.overwrite: remove the earlier run's log, TensorBoard events and checkpoints; returns their URLs."""
    stage_files = checkpoint.stage_name("*")  # type: ignore[arg-type] - the name pattern: stage-*.pt
    gone = []
    for folder in dict.fromkeys((cfg.run.dir, cfg.run.ckpt_dir or cfg.run.dir)):
        for name in list_names(folder):
            if name in (LOG_NAME, checkpoint.LATEST) or fnmatch.fnmatch(name, stage_files):
                gone.append(join_url(folder, name))
    gone += [join_url(join_url(cfg.run.dir, TENSORBOARD), n) for n in list_names(join_url(cfg.run.dir, TENSORBOARD))]
    for url in gone:
        remove_url(url)
    return gone


# --- the checks ---------------------------------------------------------------------------------------------


def _parts(cfg: Config) -> list[str]:
    """Each part checks the values it interprets (its own rule, not restated here); one line per key."""
    found = []
    gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    checks = [
        lambda: data.train_augment(cfg),
        lambda: data.eval_augment(cfg, cfg.data.eval_crop_pct or 1.0),
        lambda: data.read_spec(cfg),
        lambda: layout_for(train=True, gpu=gpu and cfg.data.device != "cpu", engine=data.engine_spec(cfg)),
        lambda: check_config(cfg.schedule),  # the kind and the settings it reads: whole lines, key first
    ]
    for build in checks:
        try:
            build()
        except ValueError as exc:  # "AugmentSpec.scale=(0.5, 0.1): need ..." -> "data.crop_scale: AugmentSpec..."
            field = re.match(r"\w+\.(\w+)=", str(exc))
            found.append(str(exc) if str(exc).startswith("schedule.") else
                         f"{SPEC_KEYS.get(field[1] if field else '', 'schedule.kind')}: {exc}")
    return found


def _reachable(url: str, key: str, must_exist: bool) -> list[str]:
    """One request to the store of `url`: S3 credentials, endpoint and bucket; the object itself if asked."""
    problem = probe(url)
    if problem is None and must_exist and not url_exists(url):
        problem = f"{url} does not exist"
    return [f"{key}: {problem}"] if problem else []


def _data(cfg: Config, problems: list[str]) -> SplitView | None:
    """The train split, and whether the val split is there; problems appended."""
    if not cfg.data.url:
        problems.append("data.url is empty: pass --data DEST (a dataset built by `pipeline build-shards SRC DEST`)")
        return None
    url = cfg.data.url.rstrip("/")
    reach = _reachable(join_url(url, MANIFEST_NAME), "data.url", must_exist=False)
    if reach:
        problems += reach
        return None
    try:
        manifest = read_manifest(url)
    except FileNotFoundError:
        problems.append(f"data.url: no {MANIFEST_NAME} in {url}: build a dataset there with `pipeline build-shards "
                        f"SRC {url} --split {cfg.data.train_split}`")
        return None
    except ValueError as exc:
        problems.append(f"data.url: {exc}")
        return None
    have = ", ".join(sorted(manifest.splits)) or "none"
    build = f"`pipeline build-shards SRC {url} --split NAME`"
    if cfg.data.val_split and cfg.run.eval != "none" and cfg.data.val_split not in manifest.splits:
        problems.append(f"data.val_split: {url} has no {cfg.data.val_split!r} split (has {have}): build it with "
                        f"{build.replace('NAME', cfg.data.val_split)}, or train without evaluation: "
                        f"--data.val_split=''")
    if cfg.data.train_split not in manifest.splits:
        problems.append(f"data.train_split: {url} has no {cfg.data.train_split!r} split (has {have}): build it "
                        f"with {build.replace('NAME', cfg.data.train_split)}")
        return None
    info = manifest.splits[cfg.data.train_split]
    empty = [c for c, n in zip(info.classes, info.class_counts) if n == 0]
    if info.num_samples == 0:
        problems.append(f"data.train_split: the {cfg.data.train_split!r} split of {url} has no images")
        return None
    if empty:
        problems.append(f"data.train_split: {count(len(empty), 'class')} without images in {url} "
                        f"({', '.join(empty[:5])}): rebuild without the empty folders")
    return SplitView(dest=url, name=cfg.data.train_split, info=info)


def _run_folder(cfg: Config) -> list[str]:
    """A new run must not mix into an earlier one's log and checkpoints."""
    if resuming(cfg) or cfg.run.overwrite:
        return []
    ckpt_dir = cfg.run.ckpt_dir or cfg.run.dir
    unreachable = probe(ckpt_dir)  # S3 checkpoints: credentials, endpoint, bucket (None for a local folder)
    if unreachable:
        return [f"run.ckpt_dir: {unreachable}"]
    held = [join_url(ckpt_dir, checkpoint.LATEST)] + [join_url(cfg.run.dir, LOG_NAME)]
    found = [u for u in held if url_exists(u)]
    if not found:
        return []
    return [f"run.dir: {cfg.run.dir} already holds a run ({', '.join(os.path.basename(u) for u in found)}): pass "
            f"--resume to continue it, a new --run.dir, or --run.overwrite to start over there"]


def _fit_to_data(cfg: Config, split: SplitView, preset: Preset, world: int) -> list[str]:
    """Fill the auto values (batch, warm-up, decay, image sizes, BN momentum) from the data and the run length;
    one note naming what was chosen."""
    chosen = []
    n = split.num_samples
    if cfg.optim.batch_size == 0 and cfg.optim.batch_per_rank == 0:
        cfg.optim.batch_size = data.auto_batch(n, world)
        chosen.append(f"optim.batch_size={cfg.optim.batch_size}")
    if cfg.schedule.min_size == 0 and cfg.schedule.max_size == 0:
        side = data.typical_side(split)
        variant = models.variant_of(cfg.model.name)
        sizes = data.capped_sizes(preset, side, variant.stride if variant else data.STRIDE)
        if sizes is not None:
            cfg.schedule.min_size, cfg.schedule.max_size = sizes
            chosen.append(f"schedule.min_size={sizes[0]} schedule.max_size={sizes[1]} (the images are {side} px)")
    if not chosen:
        return []
    return [f"auto, from {count(n, 'image')}: {', '.join(chosen)}"]


def _stages(cfg: Config, split: SplitView, preset: Preset, world: int,
            notes: list[str]) -> tuple[int, int, int, list[StagePlan]] | list[str]:
    """Batch against the data, warm-up against the run, and the stage plan; (batch, epochs, max_steps, stages)
    or the problems."""
    n = split.num_samples
    try:
        batch = data.global_batch(cfg, world)
    except ConfigError as exc:
        return [str(exc)]
    suggest = data.auto_batch(n, world)
    key = "optim.batch_per_rank" if cfg.optim.batch_per_rank else "optim.batch_size"
    fix = (f"pass --optim.batch_size={suggest}" + (" --optim.batch_per_rank=0" if cfg.optim.batch_per_rank else "")
           + " (or 0 = auto)")
    if batch > n:
        return [f"{key}: the global batch {batch} is larger than the {count(n, 'training image')}: {fix}"]
    epochs, max_steps = cfg.schedule.epochs, cfg.schedule.max_steps
    if max_steps:  # step-counted recipes (transfer: 10,000 steps): enough epochs to hold them
        epochs = math.ceil(max_steps / max(1, n // batch))
    if cfg.schedule.stages > epochs and cfg.schedule.kind in STAGED:  # a stage spans whole epochs
        notes.append(f"note: schedule.stages={cfg.schedule.stages} over {count(epochs, 'epoch')}: "
                     f"{count(epochs, 'stage')}, one an epoch")
        cfg.schedule.stages = epochs  # the value used is the one printed and saved
    try:
        stages = _lay_out(cfg, preset, n, batch, world, epochs)
    except ValueError as exc:
        return [f"schedule: {exc}: {fix}" if "larger than" in str(exc) else f"schedule: {exc}"]
    problems = []
    worst = max(stages, key=lambda sp: n % sp.batch_size)
    dropped = (n % worst.batch_size) / n
    if dropped > DROP_NOTE:  # a note, not a problem: a small test set or schedule.per_stage_batch may mean it
        notes.append(f"note: {key}: batch {worst.batch_size} on {count(n, 'image')} leaves out "
                     f"{n % worst.batch_size} ({dropped:.0%}) every epoch (the last, partial batch is dropped); "
                     f"--optim.batch_size={suggest} would not")
    run_epochs = max_steps / stages[0].steps_per_epoch if max_steps else float(epochs)
    o = cfg.optim
    if o.warmup_epochs < 0:
        o.warmup_epochs = data.auto_warmup(run_epochs)
    elif o.warmup_epochs >= run_epochs:
        problems.append(f"optim.warmup_epochs={o.warmup_epochs:g} is not shorter than the run "
                        f"({run_epochs:g} epoch{'' if run_epochs == 1 else 's'}): the learning rate would never reach its peak; pass "
                        f"--optim.warmup_epochs={data.auto_warmup(run_epochs):g} (or -1 = auto)")
    if o.decay_epochs == 0:
        o.decay_epochs = data.auto_decay_epochs(run_epochs)
    if cfg.model.bn_momentum == 0 and models.variant_of(cfg.model.name) is not None:
        cfg.model.bn_momentum = data.auto_bn_momentum(max_steps or sum(sp.steps for sp in stages))
    return problems or (batch, epochs, max_steps, stages)


def _stage_sizes(cfg: Config, variant: Variant | None, preset: Preset, stages: list[StagePlan],
                 notes: list[str]) -> list[str]:
    """Each stage's loader values and the eval size, checked by StageParams; the model's stride as a note."""
    problems = []
    for sp in stages:
        try:
            data.stage_params(sp, cfg)
        except ValueError as exc:
            problems.append(f"schedule: stage {sp.stage + 1}: {exc} (schedule.min_size / schedule.max_size)")
    eval_size, _ = data.eval_size_and_crop(cfg, variant, preset)
    try:
        StageParams(image_size=eval_size)
    except ValueError as exc:
        problems.append(f"data.eval_size: {exc}")
    if variant is not None and preset.min_size <= variant.stride:  # padded stride-2 convs round up: ceil(size / 32)
        notes.append(f"note: the first stage trains at {preset.min_size} px, where {cfg.model.name}'s last feature "
                     f"maps are 1x1: the outer taps of their kernels see only padding there, and such weights carry "
                     f"badly to larger sizes (docs/training.md); start above {variant.stride} px (schedule.min_size)")
    return problems


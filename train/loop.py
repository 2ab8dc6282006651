"""The training loop: progressive stages (Algorithm 1), one process or many, checkpointed and resumable to the bit.

Read top to bottom: `train` sets the run up (`setup`: config, data, stages, model,
EMA, optimizer, resume), then for each stage pushes its size and regularization
to the loader and the model (`begin_stage`), runs `train_one_epoch` over its
epochs, and at its end `evaluate`s the EMA weights and checkpoints
(`end_stage`). `Run` holds everything the loop carries from step to step.
"""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stagewise.loaders import Loader
from stagewise.loaders.plan import world_sizes_for
from stagewise.shards.store import join_url, url_exists, write_atomic
from stagewise.train import budget, checkpoint, config, data, distributed, interrupts, models, preflight
from stagewise.train.config import Config, ConfigError
from stagewise.train.ema import EMA
from stagewise.train.losses import loss_fn, topk_correct
from stagewise.train.optim import build_optimizer, learning_rate, scaled_lr, set_lr
from stagewise.train.schedule import StagePlan, count
from stagewise.train.telemetry import Meter, Telemetry

# Keys that may change between a run and its resume: where and how much it logs, not what it computes.
RESUME_FREE = ("run.resume", "run.overwrite", "run.progress", "run.log_every", "run.ckpt_every", "run.ckpt_every_s", "run.dir",
               "run.ckpt_dir", "run.plots", "run.tensorboard", "run.sample_log", "run.dist_timeout_s", "run.eval_points",
               "data.num_threads", "data.url")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class Run:
    """What the loop carries from step to step: the parts it trains, and where it stands."""

    cfg: Config
    d: distributed.Dist
    tel: Telemetry
    stages: list[StagePlan]
    model: nn.Module  # the weights that train
    net: nn.Module  # the model as stepped: wrapped for DDP and torch.compile
    ema: EMA | None
    opt: torch.optim.Optimizer
    autocast: Any  # a context manager: bf16 on GPU, nothing on CPU
    eval_size: int  # px
    eval_crop: float
    eval_batch: int  # global
    total_epochs: float  # where cosine decay reaches 0
    max_steps: int  # 0: as many as the epochs hold
    eval_steps: frozenset[int]  # run.eval_points, as step numbers
    latest: str  # URL of last.pt
    cfg_yaml: str
    cfg_tree: dict
    step: int = 0
    resumed_at: int = 0  # the step this process started from (a checkpoint's, or 0)
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained
    loader_state: dict | None = None  # a mid-epoch resume's loader position, used once
    last_good: tuple[str, int] | None = None  # (checkpoint URL, step)
    seconds_before: float = 0.0  # training seconds before this stage (earlier stages, and before a resume)
    images_seen: int = 0  # all ranks together
    evals: list[dict] = field(default_factory=list)
    meter: Meter = field(default_factory=Meter)
    loss_sum: torch.Tensor | None = None  # losses since the last log line, summed on the device
    loss_n: int = 0
    loader: Loader | None = None
    started: float = field(default_factory=time.time)  # wall clock, for the last line
    signals: interrupts.StopSignals = field(default_factory=interrupts.StopSignals)
    saved_at: float = field(default_factory=time.monotonic)  # the last checkpoint (run.ckpt_every_s)
    deadline: budget.Deadline | None = None  # schedule.time_budget: where the run ends at the latest

    @property
    def done(self) -> bool:
        return bool(self.max_steps and self.step >= self.max_steps)

    @property
    def train_seconds(self) -> float:
        """Wall time spent training (waiting for data and stepping); evaluation, logging and checkpoints excluded."""
        return self.seconds_before + self.meter.stage()[0]


def train(cfg: Config, print_config: bool = True) -> dict:
    """Run the whole training described by `cfg`; returns the final metrics and every evaluation (on every rank).

    Preflight first (train/preflight.py): a problem found before the first step stops the run before anything
    is created, and the auto values are filled from the data."""
    entered, given, checked = time.monotonic(), cfg, preflight.check(cfg)
    cfg = checked.cfg
    d = distributed.setup(cfg.run.device, cfg.run.dist_timeout_s)
    distributed.barrier()  # no rank creates the run folder before every rank checked it
    if cfg.run.overwrite and d.is_main and not preflight.resuming(cfg):  # a resume (elastic restart) keeps the run
        preflight.clear_run(cfg)
    threads = torch.get_num_threads()
    signals = interrupts.StopSignals().install()  # Ctrl-C / SIGTERM: a checkpoint at the next step, then exit
    run, tel = None, None
    try:
        if n := distributed.torch_threads(cfg.run.threads, d.device):
            torch.set_num_threads(n)
        say = functools.partial(print, flush=True) if d.is_main else lambda line: None
        fitted = budget.fit(checked, d, say, preflight.layout, entered) if cfg.schedule.time_budget else None
        if fitted is not None:  # the run's length, from steps timed here (train/budget.py), and what follows it
            checked = preflight.replan(given, checked, fitted.epochs, fitted.max_steps)
        # The run folder's log and TensorBoard from here: a budget refused as too short has created nothing.
        tel = Telemetry(cfg.run.dir, enabled=d.is_main, tensorboard=cfg.run.tensorboard, progress=cfg.run.progress)
        run = setup(checked, d, tel, print_config)
        run.deadline = fitted.deadline if fitted else None
        run.signals = signals
        result: dict = {}
        for sp in run.stages[stage_of(run.stages, run.epoch):]:
            begin_stage(run, sp)
            while run.epoch < sp.end_epoch and not run.done:
                train_one_epoch(run, sp)
            result = end_stage(run, sp)
            if run.done:
                break
        return finish(run, result)
    finally:
        if run is not None and run.loader is not None:
            run.loader.close()  # however the run ends: its reader threads and pipelines go
        torch.set_num_threads(threads)  # process-wide state: leave it as found (train() may run in a test process)
        signals.restore()
        if tel is not None:
            tel.close()
        distributed.teardown()


def setup(checked: preflight.Plan, d: distributed.Dist, tel: Telemetry, print_config: bool) -> Run:
    """Config printed and saved, model, EMA and optimizer built, and a checkpoint resumed (the stages were
    planned by preflight)."""
    cfg = checked.cfg
    cfg_yaml, cfg_tree = config.dump_yaml(cfg), config.redacted(config.to_dict(cfg))
    tel.print(f"config:\n{cfg_yaml}" if print_config else f"config: {cfg.run.dir}/{checkpoint.CONFIG_NAME}")
    if d.is_main:
        write_atomic(join_url(cfg.run.dir, checkpoint.CONFIG_NAME), cfg_yaml.encode())

    # --- data and stages
    split, variant, preset, batch, stages = checked.split, checked.variant, checked.preset, checked.batch, checked.stages
    epochs, max_steps = checked.epochs, checked.max_steps
    total_steps = max_steps or sum(sp.steps for sp in stages)
    threads = f"{count(torch.get_num_threads(), 'torch thread')} each, " if d.device.type == "cpu" else ""
    tel.print(f"data: {count(split.num_samples, cfg.data.train_split + ' image')}, "
              f"{count(split.num_classes, 'class')}{' (multi-label)' if split.info.multi_label else ''}; "
              f"{count(d.world_size, 'process')} on {d.device}, {threads}global batch {batch}; "
              f"{count(len(stages), 'stage')} over {count(epochs, 'epoch')} ({cfg.schedule.kind})")
    for line in checked.notes:
        tel.print(line)

    # --- model, EMA, optimizer
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = models.build_model(cfg.model.name, split.num_classes, drop_path_rate=cfg.model.drop_path_rate,
                               tf_same_padding=cfg.model.tf_same_padding)
    if cfg.run.finetune_from:
        tel.print(config.redact_text(models.load_for_finetune(model, cfg.run.finetune_from)))
    if cfg.model.zero_head:
        models.zero_head(model)
    if cfg.model.bn_momentum > 0:
        models.set_bn_momentum(model, cfg.model.bn_momentum)
    if not models.supports_dropout(model):
        tel.print(f"note: {cfg.model.name} has no set_dropout; the dropout ramp is not applied to it")
    model.to(d.device, memory_format=torch.channels_last if cfg.model.channels_last else torch.contiguous_format)
    if cfg.model.sync_bn and d.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    o = cfg.optim
    ema = EMA(model, o.ema_decay, o.ema_warmup) if o.ema_decay > 0 else None
    opt = build_optimizer(model, o.optimizer, lr=0.0, weight_decay=o.weight_decay, momentum=o.momentum,
                          rmsprop_decay=o.rmsprop_decay, eps=o.eps)
    net: nn.Module = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if cfg.model.compile:
        # dynamic=False: one static graph per stage size (4 in the paper's schedule). Automatic dynamic shapes
        # turned the second size into a symbolic-shape recompile that ran for minutes on an H100.
        net = torch.compile(net, dynamic=False)
    eval_size, eval_crop = data.eval_size_and_crop(cfg, variant, preset)
    run = Run(cfg=cfg, d=d, tel=tel, stages=stages, model=model, net=net, ema=ema, opt=opt,
              autocast=(torch.autocast("cuda", dtype=torch.bfloat16) if cfg.run.bf16 and d.device.type == "cuda"
                        else nullcontext()),
              eval_size=eval_size, eval_crop=eval_crop, eval_batch=cfg.data.eval_batch_size or batch,
              total_epochs=max_steps / stages[0].steps_per_epoch if max_steps else float(epochs),
              max_steps=max_steps,
              eval_steps=frozenset(_spread(total_steps, cfg.run.eval_points if cfg.data.val_split else 0)),
              latest=join_url(cfg.run.ckpt_dir or cfg.run.dir, checkpoint.LATEST), cfg_yaml=cfg_yaml,
              cfg_tree=cfg_tree, loss_sum=torch.zeros((), device=d.device))

    # --- resume
    torch.manual_seed(cfg.run.seed + 7919 * d.rank)  # dropout / drop-path masks differ between ranks
    wanted = cfg.run.resume or interrupts.under_torchrun()  # a restart by torchrun's elastic agent is a resume
    ck = checkpoint.load(run.latest) if wanted and url_exists(run.latest) else None
    if ck is not None and (cfg.run.resume or interrupts.elastic_restart(ck.get("elastic_run_id"))):
        _resume(run, ck)
    elif cfg.run.resume or interrupts.elastic_restart():
        tel.print(f"resume: no checkpoint at {config.redact_text(run.latest)}; starting from the beginning")
    return run


def begin_stage(run: Run, sp: StagePlan) -> None:
    """Push the stage's size and regularization to the loader and its dropout to the model."""
    run.tel.print(sp.line())
    models.set_dropout(run.model, sp.values.dropout)
    if run.loader is not None and run.loader.batch_size * run.d.world_size != sp.batch_size:
        run.loader.close()  # schedule.per_stage_batch: a new batch size needs a new loader
        run.loader = None
    if run.loader is None:
        run.loader = data.train_loader(run.cfg, sp, run.d)
    else:
        run.loader.set_stage(data.stage_params(sp, run.cfg))  # from the very next batch, without a rebuild
    run.meter.new_stage()
    done_in_stage = (run.epoch - sp.start_epoch) * sp.steps_per_epoch + run.batch_in_epoch
    run.tel.open_bar(f"stage {sp.stage + 1}/{sp.n_stages}", sp.steps, done_in_stage)


def train_one_epoch(run: Run, sp: StagePlan) -> None:
    """One epoch (the rest of it after a mid-epoch resume), or up to schedule.max_steps."""
    cfg, d, o, loader, meter = run.cfg, run.d, run.cfg.optim, run.loader, run.meter
    assert loader is not None
    if run.loader_state is not None and run.batch_in_epoch > 0:
        loader.load_state_dict(run.loader_state)  # mid-epoch resume: the same batches as an uninterrupted run
        run.loader_state = None
    else:
        loader.set_epoch(run.epoch)
    n_batches = len(loader)
    peak = scaled_lr(o.lr, o.lr_batch, sp.batch_size)  # linear scaling with this stage's global batch
    check_every = 1 if d.device.type == "cpu" else cfg.run.log_every  # a CPU sync is free; a GPU sync is not
    meter.mark()
    for images, targets in loader:
        meter.got_batch()
        images, targets = images.to(d.device, non_blocking=True), targets.to(d.device, non_blocking=True)
        set_lr(run.opt, learning_rate(run.epoch + run.batch_in_epoch / n_batches, peak=peak,
                                      warmup_epochs=o.warmup_epochs, decay=o.lr_decay, total_epochs=run.total_epochs,
                                      decay_rate=o.decay_rate, decay_epochs=o.decay_epochs))
        with run.autocast:
            loss = loss_fn(run.net(images), targets, o.label_smoothing)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            nn.utils.clip_grad_norm_(run.model.parameters(), o.grad_clip)
        run.opt.step()
        if run.ema is not None:
            run.ema.update(run.model)
        run.step, run.batch_in_epoch = run.step + 1, run.batch_in_epoch + 1
        run.loss_sum += loss.detach()
        run.loss_n += 1
        run.images_seen += images.shape[0] * d.world_size
        if cfg.run.sample_log:
            _log_samples(run, loader.batch_keys)
        meter.did_step(images.shape[0] * d.world_size)
        run.tel.update_bar(1)
        if run.batch_in_epoch == n_batches:
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0
        if run.deadline is not None and not run.done and run.deadline.reached():  # schedule.time_budget's guard
            run.tel.print(run.deadline.line(run.step))
            run.max_steps = run.step  # done: this stage ends here, evaluated and saved, and the run with it
        ckpt_now = bool(cfg.run.ckpt_every and run.step % cfg.run.ckpt_every == 0)
        stop = None
        if run.step % check_every == 0 or ckpt_now:
            stop, due = _agree(run, sp, loss)
            ckpt_now = ckpt_now or due
        if run.step % cfg.run.log_every == 0:
            _log_train(run, sp, list(images.shape))
        at_stage_end = run.epoch == sp.end_epoch or run.done
        stop = stop if not at_stage_end else None  # end_stage evaluates and checkpoints; the next step stops
        if ckpt_now or stop:
            save_checkpoint(run, stage_end=None)
        if stop:
            raise interrupts.Interrupted(stop, run.step, f"interrupted at step {run.step}; continue with: "
                                         f"{interrupts.resume_command()}" if d.is_main else "")
        if run.step in run.eval_steps and not (at_stage_end and _evaluates_at_end(run, sp)):
            evaluate_now(run, sp)
        if run.done:
            break
        meter.mark()  # what came after the step (logs, checkpoints, evaluation) is not training time
    if run.batch_in_epoch and not run.done:
        raise RuntimeError(f"the loader yielded {run.batch_in_epoch} batches in epoch {run.epoch}; len() said {n_batches}")


def end_stage(run: Run, sp: StagePlan) -> dict:
    """Summarize the stage, evaluate (run.eval), checkpoint; returns the stage's record."""
    tel = run.tel
    tel.close_bar()
    seconds, img_s, wait = run.meter.stage()
    result = {"stage": sp.stage + 1, "step": run.step, "stage_seconds": round(seconds, 2), "img_per_s": img_s,
              "data_wait_pct": wait}
    if _evaluates_at_end(run, sp):
        result.update(evaluate_now(run, sp))
    else:
        tel.log("stage", run.step, result)
    tel.print(f"stage {sp.stage + 1}/{sp.n_stages} done: {seconds:.0f} s, {img_s:.0f} img/s, data wait {wait:.0f}%"
              + (f"; val top-1 {result['top1']:.1f}%, top-5 {result['top5']:.1f}% "
                 f"({'EMA' if run.ema else 'weights'}, {run.eval_size} px, {count(result['images'], 'image')})"
                 if "top1" in result else ""))
    save_checkpoint(run, stage_end=sp.stage + 1)
    run.seconds_before += seconds
    run.meter.new_stage()
    return result


def evaluate_now(run: Run, sp: StagePlan) -> dict:
    """Evaluate the weights the trainer reports (EMA) and log the record: top-1/5 with the training time and
    images behind them. Its own time is not training time."""
    _sync_buffers(run)
    record = {"stage": sp.stage + 1, "epoch": run.epoch, "eval_size": run.eval_size,
              "train_seconds": round(run.train_seconds, 3), "images_seen": run.images_seen,
              **evaluate(run.ema.module if run.ema else run.model, run.cfg, run.d, run.eval_size, run.eval_crop,
                         run.eval_batch, run.autocast)}
    run.evals.append({"step": run.step, **record})
    run.tel.log("eval", run.step, record)
    return record


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, d: distributed.Dist, size: int, crop: float, batch: int,
             autocast) -> dict:  # noqa: ANN001 - a context manager
    """Top-1/top-5 (%) of `model` on the val split, summed over ranks; padded samples (-1) are not counted."""
    loader = data.eval_loader(cfg, size, crop, batch, d)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=d.device)
    try:
        loader.set_epoch(0)
        for images, targets in loader:
            with autocast:
                logits = model(images)
            counts += torch.stack(topk_correct(logits.float(), targets.to(d.device)))
    finally:
        loader.close()
        model.train(was_training)
    top1, top5, n = distributed.all_reduce_sum(counts).tolist()
    return {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "images": n}


def save_checkpoint(run: Run, stage_end: int | None) -> None:
    """last.pt (and stage-N.pt at the end of stage N), never from non-finite weights."""
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise TrainingDiverged(f"weights are not finite at step {run.step}; not checkpointing. "
                               f"Last good checkpoint: {run.last_good[0] if run.last_good else 'none'}")
    _sync_buffers(run)
    rngs = checkpoint.gather_rng_states(run.d.world_size)
    if not run.cfg.run.checkpoints:
        return
    if run.d.is_main:
        # the loader's position is global (epoch, step, seed, global batch): it resumes on any world size
        position = checkpoint.plain(run.loader.state_dict()) if run.loader is not None and run.batch_in_epoch else None
        weights = {"model": run.model.state_dict(), "ema": run.ema.state_dict() if run.ema else None,
                   "step": run.step, "epoch": run.epoch, "stage": stage_of(run.stages, run.epoch),
                   "config": run.cfg_tree, "evals": run.evals}
        payload = {**weights, "optimizer": run.opt.state_dict(), "batch": run.batch_in_epoch, "loader": position,
                   "rng": rngs, "train_seconds": run.train_seconds, "images_seen": run.images_seen,
                   "stage_batches": [sp.batch_size for sp in run.stages],
                   "elastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID")}
        checkpoint.save(run.latest, payload, run.cfg_yaml)
        if stage_end is not None:  # weights only (model and EMA): last.pt alone resumes
            ckpt_dir = run.cfg.run.ckpt_dir or run.cfg.run.dir
            checkpoint.save(join_url(ckpt_dir, checkpoint.stage_name(stage_end)), weights, run.cfg_yaml)
        run.tel.log("checkpoint", run.step, {"url": run.latest, "epoch": run.epoch, "batch": run.batch_in_epoch})
    run.last_good = (run.latest, run.step)
    run.saved_at = time.monotonic()


def finish(run: Run, result: dict) -> dict:
    """Check that every replica ended with the same weights; log, print and plot the end of the run."""
    if run.loader is not None:
        run.loader.close()  # before the fingerprints: its threads are done
        run.loader = None
    mine = distributed.fingerprint(run.model) + (distributed.fingerprint(run.ema.module) if run.ema else "")
    prints = distributed.gather_strings(mine)
    if len(set(prints)) != 1:
        raise RuntimeError(f"replicas disagree after training: {prints}")
    run.tel.log("done", run.step, {"train_seconds": round(run.train_seconds, 2), "fingerprints": prints, **result})
    ckpt_dir = run.cfg.run.ckpt_dir or run.cfg.run.dir
    run.tel.print(f"done: {count(run.step, 'step')} in {time.time() - run.started:.0f} s; checkpoints in {ckpt_dir}"
                  + (f"; {run.d.world_size} replicas agree ({prints[0][:12]})" if run.d.enabled else ""))
    if run.cfg.run.plots:
        run.tel.plots()
    return {**result, "steps": run.step, "fingerprint": prints[0], "train_seconds": run.train_seconds,
            "evals": run.evals}


def stage_of(stages: list[StagePlan], epoch: int) -> int:
    """The stage that trains `epoch` (len(stages) past the end: nothing left to train)."""
    for sp in stages:
        if sp.start_epoch <= epoch < sp.end_epoch:
            return sp.stage
    return len(stages)


# --- helpers of the steps above -------------------------------------------------------------------


def _resume(run: Run, ck: dict) -> None:
    adopted = config.adopt_from_checkpoint(run.cfg, ck["config"])  # before any loader is built
    if adopted:
        run.cfg_yaml, run.cfg_tree = config.dump_yaml(run.cfg), config.redacted(config.to_dict(run.cfg))
        if run.d.is_main:
            write_atomic(join_url(run.cfg.run.dir, checkpoint.CONFIG_NAME), run.cfg_yaml.encode())
        run.tel.print(f"resume: {', '.join(adopted)}, as the checkpoint ran (\"auto\" takes the checkpoint's)")
    changed = config.differences(ck["config"], run.cfg_tree, ignore=RESUME_FREE)
    if changed:
        raise ConfigError(f"refusing to resume {run.latest} with a different config: {'; '.join(changed)}")
    _check_global_batch(run, ck)
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    if run.ema is not None:
        run.ema.load_state_dict(ck["ema"])
    run.step, run.epoch, run.batch_in_epoch = ck["step"], ck["epoch"], ck["batch"]
    run.resumed_at = run.step
    run.loader_state, run.last_good = ck["loader"], (run.latest, run.step)
    run.seconds_before, run.images_seen = ck.get("train_seconds", 0.0), ck.get("images_seen", 0)
    run.evals = list(ck.get("evals", []))
    saved_world = len(ck["rng"])
    if saved_world == run.d.world_size:
        checkpoint.set_rng_state(ck["rng"][run.d.rank])
    else:  # each rank's dropout and drop-path masks: drawn afresh, from (seed, step, rank) (docs/training.md)
        torch.manual_seed(run.cfg.run.seed + 7919 * run.d.rank + 104_729 * run.step)
    run.tel.print(f"resumed from {config.redact_text(run.latest)}: step {run.step}, epoch {run.epoch}, "
                  f"batch {run.batch_in_epoch}"
                  + (f"; on {count(run.d.world_size, 'process')} instead of {saved_world}: "
                     f"the same samples per global step, new dropout masks" if saved_world != run.d.world_size
                     else ""))


def _check_global_batch(run: Run, ck: dict) -> None:
    """A resume on another world size keeps every stage's global batch (so the samples of each step and the LR);
    a world size that cannot is refused, naming those that can."""
    saved, now = ck.get("stage_batches"), [sp.batch_size for sp in run.stages]
    if saved is None or saved == now:
        return
    sizes = ", ".join(str(w) for w in world_sizes_for(math.gcd(*saved)))
    raise ConfigError(f"{run.latest} trained with global batch {'/'.join(map(str, saved))} per step, this run would "
                      f"use {'/'.join(map(str, now))} on {run.d.world_size} process(es): resume with the same "
                      f"--optim.batch_size (global) on a world size dividing it ({sizes})")


def _evaluates_at_end(run: Run, sp: StagePlan) -> bool:
    """Whether `end_stage` evaluates this stage (run.eval: every stage, or the last one)."""
    last = sp.stage == len(run.stages) - 1 or run.done
    return bool(run.cfg.data.val_split) and (run.cfg.run.eval == "stages" or (run.cfg.run.eval == "end" and last))


def _agree(run: Run, sp: StagePlan, loss: torch.Tensor) -> tuple[int | None, bool]:
    """What every rank must decide alike after a step, in one collective: a non-finite loss on any rank (raises),
    a stop signal on any rank (returns SIGINT or SIGTERM), a checkpoint due by rank 0's clock (run.ckpt_every_s)."""
    asked = run.signals.requested
    every_s = run.cfg.run.ckpt_every_s
    due = run.d.is_main and every_s > 0 and time.monotonic() - run.saved_at >= every_s
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                         torch.tensor(float(asked == signal.SIGINT), device=loss.device),
                         torch.tensor(float(asked == signal.SIGTERM), device=loss.device),
                         torch.tensor(float(due), device=loss.device)])
    bad, sigint, sigterm, due = (v > 0 for v in distributed.all_reduce_sum(flags).tolist())
    if bad:
        where = f"{run.last_good[0]} (step {run.last_good[1]})" if run.last_good else "none was written"
        raise TrainingDiverged(f"loss is {loss.item()} at step {run.step} (stage {sp.stage + 1}, epoch {run.epoch}); "
                               f"stopping. Last good checkpoint: {where}")
    stop = signal.SIGINT if sigint else signal.SIGTERM if sigterm else None
    return stop, due


def _log_train(run: Run, sp: StagePlan, input_shape: list[int]) -> None:
    loss_avg = distributed.all_reduce_sum(run.loss_sum.clone()).item() / (run.loss_n * run.d.world_size)
    img_s, wait = run.meter.window()
    run.tel.bar_postfix(img_s, wait, loss_avg)
    v = sp.values
    run.tel.log("train", run.step, {
        "loss": loss_avg, "lr": run.opt.param_groups[0]["lr"], "epoch": run.epoch, "stage": sp.stage + 1,
        "image_size": v.image_size, "randaug": v.randaug_magnitude, "mixup": v.mixup_alpha, "dropout": v.dropout,
        "batch_size": sp.batch_size, "input_shape": input_shape,  # observed, not planned
        "model_dropout": getattr(run.model, "dropout_rate", None), "img_per_s": img_s, "data_wait_pct": wait})
    run.loss_sum.zero_()
    run.loss_n = 0


def _log_samples(run: Run, keys: list[str]) -> None:
    """One line per step and rank: which samples it trained on (run.sample_log). The line says which start of
    the run trained it (torchrun's restart count, the step it resumed at, the world size) and when, so that a
    step redone after a restart can be told from its lost first try."""
    line = {"step": run.step, "epoch": run.epoch, "rank": run.d.rank, "world_size": run.d.world_size,
            "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0), "resumed_at": run.resumed_at,
            "time": round(time.time(), 3), "keys": keys}
    with open(os.path.join(run.cfg.run.dir, f"samples-rank{run.d.rank}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def _sync_buffers(run: Run) -> None:
    """BN statistics drift apart between ranks after each forward; rank 0's win."""
    distributed.broadcast_buffers(run.model)
    if run.ema is not None:
        distributed.broadcast_buffers(run.ema.module)


def _spread(total_steps: int, points: int) -> list[int]:
    """`points` step numbers spread evenly over 1..total_steps, the last one at the end."""
    return sorted({max(1, math.ceil(k * total_steps / points)) for k in range(1, points + 1)}) if points > 0 else []

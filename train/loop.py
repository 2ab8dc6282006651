"""The training loop: progressive stages (Algorithm 1), one process or many, checkpointed and resumable to the bit.

Read top to bottom: set up (config, data, model, EMA, optimizer, resume), then
for each stage push its size and regularization to the loader and the model,
train its epochs, and at its end evaluate the EMA weights and checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import ExitStack, nullcontext

import torch
from torch import nn

from stagewise.shards import open_split
from stagewise.shards.store import join_url, url_exists, write_atomic
from stagewise.train import checkpoint, config, data, distributed, models
from stagewise.train.config import Config, ConfigError
from stagewise.train.ema import EMA
from stagewise.train.losses import loss_fn, topk_correct
from stagewise.train.optim import build_optimizer, learning_rate, scaled_lr, set_lr
from stagewise.train.schedule import StagePlan, plan
from stagewise.train.telemetry import Meter, Telemetry

# Keys that may change between a run and its resume: where and how much it logs, not what it computes.
RESUME_FREE = ("run.resume", "run.progress", "run.log_every", "run.ckpt_every", "run.dir", "run.ckpt_dir", "run.plots",
               "run.tensorboard", "run.dist_timeout_s", "data.num_threads", "data.url")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """`python -m train` / `pipeline train`: exit 0 when done, 2 on a bad config or input, 3 when the loss diverged."""
    try:
        cfg = config.from_args(args) if args is not None else config.parse(sys.argv[1:] if argv is None else argv)
        train(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def train(cfg: Config, print_config: bool = True) -> dict:
    """Run the whole training described by `cfg`; returns the final metrics (on every rank)."""
    d = distributed.setup(cfg.run.device, cfg.run.dist_timeout_s)
    tel = Telemetry(cfg.run.dir, enabled=d.is_main, tensorboard=cfg.run.tensorboard, progress=cfg.run.progress)
    threads = torch.get_num_threads()
    try:
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        with ExitStack() as resources:  # loaders close however the run ends
            return _train(cfg, d, tel, resources, print_config)
    finally:
        torch.set_num_threads(threads)  # process-wide state: leave it as found (train() may run in a test process)
        tel.close()
        distributed.teardown()


def _train(cfg: Config, d: distributed.Dist, tel: Telemetry, resources: ExitStack, print_config: bool) -> dict:
    cfg_yaml, cfg_tree = config.dump_yaml(cfg), config.redacted(config.to_dict(cfg))
    ckpt_dir = cfg.run.ckpt_dir or cfg.run.dir
    tel.print(f"config:\n{cfg_yaml}" if print_config else f"config: {cfg.run.dir}/{checkpoint.CONFIG_NAME}")
    if d.is_main:
        write_atomic(join_url(cfg.run.dir, checkpoint.CONFIG_NAME), cfg_yaml.encode())

    # --- data, preset, stages -------------------------------------------------------------
    if not cfg.data.url:
        raise ConfigError("data.url is empty: pass --data DEST (a dataset built by `pipeline build-shards`)")
    split = open_split(cfg.data.url, cfg.data.train_split)
    variant = models.variant_of(cfg.model.name)
    preset = data.resolve_preset(cfg, variant)
    batch = data.global_batch(cfg, d.world_size)
    epochs, max_steps = cfg.schedule.epochs, cfg.schedule.max_steps
    if max_steps:  # step-counted recipes (transfer: 10,000 steps): enough epochs to hold them
        epochs = math.ceil(max_steps / max(1, split.num_samples // batch))
    stages = plan(preset, epochs=epochs, n_stages=min(cfg.schedule.stages, epochs), schedule=cfg.schedule.kind,
                  num_images=split.num_samples, batch_size=batch, adaptive=cfg.schedule.adaptive, seed=cfg.run.seed,
                  chunk_epochs=cfg.schedule.chunk_epochs, per_stage_batch=cfg.schedule.per_stage_batch,
                  batch_multiple=d.world_size)
    total_epochs = max_steps / stages[0].steps_per_epoch if max_steps else float(epochs)  # where cosine reaches 0
    tel.print(f"data: {split.num_samples} {cfg.data.train_split} images, {split.num_classes} classes"
              f"{' (multi-label)' if split.info.multi_label else ''}; {d.world_size} process(es) on {d.device}, "
              f"global batch {batch}; {len(stages)} stages over {epochs} epochs ({cfg.schedule.kind})")

    # --- model, EMA, optimizer --------------------------------------------------------------
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = models.build_model(cfg.model.name, split.num_classes, drop_path_rate=cfg.model.drop_path_rate,
                               tf_same_padding=cfg.model.tf_same_padding)
    if cfg.run.finetune_from:
        _load_for_finetune(model, cfg.run.finetune_from, tel)
    if cfg.model.zero_head:
        models.zero_head(model)
    if cfg.model.bn_momentum > 0:
        models.set_bn_momentum(model, cfg.model.bn_momentum)
    if not models.supports_dropout(model):
        tel.print(f"note: {cfg.model.name} has no set_dropout; the dropout ramp is not applied to it")
    model.to(d.device, memory_format=torch.channels_last if cfg.model.channels_last else torch.contiguous_format)
    if cfg.model.sync_bn and d.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = EMA(model, cfg.optim.ema_decay, cfg.optim.ema_warmup) if cfg.optim.ema_decay > 0 else None
    o = cfg.optim
    opt = build_optimizer(model, o.optimizer, lr=0.0, weight_decay=o.weight_decay, momentum=o.momentum,
                          rmsprop_decay=o.rmsprop_decay, eps=o.eps)

    # --- resume -------------------------------------------------------------------------------
    step, epoch, batch_in_epoch, loader_state, last_good = 0, 0, 0, None, None
    torch.manual_seed(cfg.run.seed + 7919 * d.rank)  # dropout / drop-path masks differ between ranks
    latest = join_url(ckpt_dir, checkpoint.LATEST)
    if cfg.run.resume and url_exists(latest):
        ck = checkpoint.load(latest)
        changed = config.differences(ck["config"], cfg_tree, ignore=RESUME_FREE)
        if changed:
            raise ConfigError(f"refusing to resume {latest} with a different config: {'; '.join(changed)}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        step, epoch, batch_in_epoch = ck["step"], ck["epoch"], ck["batch"]
        loader_state, last_good = ck["loader"], (latest, step)
        if len(ck["rng"]) == d.world_size:
            checkpoint.set_rng_state(ck["rng"][d.rank])
        tel.print(f"resumed from {latest}: step {step}, epoch {epoch}, batch {batch_in_epoch}")
    elif cfg.run.resume:
        tel.print(f"resume: no checkpoint at {latest}; starting from the beginning")

    net: nn.Module = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if cfg.model.compile:
        # dynamic=False: one static graph per stage size (4 in the paper's schedule). Automatic dynamic shapes
        # turned the second size into a symbolic-shape recompile that ran for minutes on an H100.
        net = torch.compile(net, dynamic=False)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.run.bf16 and d.device.type == "cuda"
                else nullcontext())
    eval_size, eval_crop = data.eval_size_and_crop(cfg, variant, preset)
    weights = "EMA" if ema is not None else "weights"
    check_every = 1 if d.device.type == "cpu" else cfg.run.log_every  # a CPU sync is free; a GPU sync is not

    def sync_buffers() -> None:  # BN statistics drift apart between ranks after each forward; rank 0's win
        distributed.broadcast_buffers(model)
        if ema is not None:
            distributed.broadcast_buffers(ema.module)

    def save(stage_end: int | None) -> None:
        nonlocal last_good
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingDiverged(f"weights are not finite at step {step}; not checkpointing. "
                                   f"Last good checkpoint: {last_good[0] if last_good else 'none'}")
        sync_buffers()
        rngs = _gather_rng(d)
        if d.is_main and cfg.run.checkpoints:
            position = _plain(loader.state_dict()) if loader is not None and batch_in_epoch else None
            payload = {"model": model.state_dict(), "ema": ema.state_dict() if ema else None,
                       "optimizer": opt.state_dict(), "step": step, "epoch": epoch, "batch": batch_in_epoch,
                       "stage": _stage_of(stages, epoch), "loader": position, "rng": rngs, "config": cfg_tree}
            checkpoint.save(latest, payload, cfg_yaml)
            if stage_end is not None:
                checkpoint.save(join_url(ckpt_dir, checkpoint.stage_name(stage_end)), payload, cfg_yaml)
            tel.log("checkpoint", step, {"url": latest, "epoch": epoch, "batch": batch_in_epoch})
        if cfg.run.checkpoints:
            last_good = (latest, step)

    # --- the stages -----------------------------------------------------------------------------
    loader, loader_batch, meter, result = None, 0, Meter(), {}
    loss_sum, loss_n, t_start = torch.zeros((), device=d.device), 0, time.time()
    for sp in stages[_stage_of(stages, epoch):]:
        peak = scaled_lr(o.lr, o.lr_batch, sp.batch_size)  # linear scaling with this stage's global batch
        tel.print(sp.line())
        models.set_dropout(model, sp.values.dropout)
        if loader is not None and loader_batch != sp.batch_size:  # per-stage batch: a new loader
            loader.close()
            loader = None
        if loader is None:
            loader, loader_batch = resources.enter_context(data.train_loader(cfg, sp, d)), sp.batch_size
        else:
            loader.set_stage(data.loader_params(sp.values, cfg))
        meter.new_stage()
        done_in_stage = (epoch - sp.start_epoch) * len(loader) + batch_in_epoch
        tel.open_bar(f"stage {sp.stage + 1}/{sp.n_stages}", sp.steps, done_in_stage)
        while epoch < sp.end_epoch and not (max_steps and step >= max_steps):
            if loader_state is not None and batch_in_epoch > 0:
                loader.load_state_dict(loader_state)  # mid-epoch resume: the same batches as an uninterrupted run
                loader_state = None
            else:
                loader.set_epoch(epoch)
            n_batches = len(loader)
            meter.mark()
            for images, targets in loader:
                meter.got_batch()
                images, targets = images.to(d.device, non_blocking=True), targets.to(d.device, non_blocking=True)
                set_lr(opt, learning_rate(epoch + batch_in_epoch / n_batches, peak=peak, warmup_epochs=o.warmup_epochs,
                                          decay=o.lr_decay, total_epochs=total_epochs, decay_rate=o.decay_rate,
                                          decay_epochs=o.decay_epochs))
                with autocast:
                    loss = loss_fn(net(images), targets, o.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if o.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                opt.step()
                if ema is not None:
                    ema.update(model)
                step, batch_in_epoch = step + 1, batch_in_epoch + 1
                loss_sum += loss.detach()
                loss_n += 1
                meter.did_step(images.shape[0] * d.world_size)
                tel.update_bar(1)
                if batch_in_epoch == n_batches:
                    epoch, batch_in_epoch = epoch + 1, 0
                ckpt_now = cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0
                if step % check_every == 0 or ckpt_now:
                    bad = not bool(torch.isfinite(loss.detach()))
                    if distributed.any_true(bad, d.device):
                        where = f"{last_good[0]} (step {last_good[1]})" if last_good else "none was written"
                        raise TrainingDiverged(f"loss is {loss.item()} at step {step} (stage {sp.stage + 1}, "
                                               f"epoch {epoch}); stopping. Last good checkpoint: {where}")
                if step % cfg.run.log_every == 0:
                    loss_avg = distributed.all_reduce_sum(loss_sum.clone()).item() / (loss_n * d.world_size)
                    img_s, wait = meter.window()
                    tel.bar_postfix(img_s, wait, loss_avg)
                    tel.log("train", step, {"loss": loss_avg, "lr": opt.param_groups[0]["lr"], "epoch": epoch,
                                            "stage": sp.stage + 1, "image_size": sp.values.image_size,
                                            "randaug": sp.values.randaug_magnitude, "mixup": sp.values.mixup_alpha,
                                            "dropout": sp.values.dropout, "batch_size": sp.batch_size,
                                            "input_shape": list(images.shape),  # observed, not planned
                                            "model_dropout": getattr(model, "dropout_rate", None),
                                            "img_per_s": img_s, "data_wait_pct": wait})
                    loss_sum.zero_()
                    loss_n = 0
                if ckpt_now:
                    save(None)
                if max_steps and step >= max_steps:
                    break
                meter.mark()
            if batch_in_epoch and not (max_steps and step >= max_steps):
                raise RuntimeError(f"the loader yielded {batch_in_epoch} batches in epoch {epoch}; "
                                   f"len() said {n_batches}")
        tel.close_bar()
        seconds, img_s, wait = meter.stage()
        result = {"stage": sp.stage + 1, "step": step, "stage_seconds": round(seconds, 2), "img_per_s": img_s,
                  "data_wait_pct": wait}
        sync_buffers()
        last = sp.stage == len(stages) - 1 or bool(max_steps and step >= max_steps)
        if cfg.data.val_split and (cfg.run.eval == "stages" or (cfg.run.eval == "end" and last)):
            result.update(evaluate(ema.module if ema else model, cfg, d, eval_size, eval_crop, batch, autocast))
        tel.log("eval" if "top1" in result else "stage", step, result)
        tel.print(f"stage {sp.stage + 1}/{sp.n_stages} done: {seconds:.0f} s, {img_s:.0f} img/s, data wait {wait:.0f}%"
                  + (f"; val top-1 {result['top1']:.1f}%, top-5 {result['top5']:.1f}% ({weights}, {eval_size} px, "
                     f"{result['images']} images)" if "top1" in result else ""))
        save(sp.stage + 1)
        if max_steps and step >= max_steps:
            break
    if loader is not None:
        loader.close()  # before the fingerprints: its threads are done
    mine = distributed.fingerprint(model) + (distributed.fingerprint(ema.module) if ema else "")
    prints = distributed.gather_strings(mine)
    if len(set(prints)) != 1:
        raise RuntimeError(f"replicas disagree after training: {prints}")
    tel.log("done", step, {"seconds": round(time.time() - t_start, 2), "fingerprints": prints, **result})
    tel.print(f"done: {step} steps in {time.time() - t_start:.0f} s; checkpoints in {ckpt_dir}"
              + (f"; {d.world_size} replicas agree ({prints[0][:12]})" if d.enabled else ""))
    if cfg.run.plots:
        tel.plots()
    return {**result, "steps": step, "fingerprint": prints[0]}


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, d: distributed.Dist, size: int, crop: float, batch: int,
             autocast) -> dict:  # noqa: ANN001 - a context manager
    """Top-1/top-5 (%) of `model` on the val split, summed over ranks; padded samples (-1) are not counted."""
    loader = data.eval_loader(cfg, size, crop, cfg.data.eval_batch_size or batch, d)
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


def _stage_of(stages: list[StagePlan], epoch: int) -> int:
    for sp in stages:
        if sp.start_epoch <= epoch < sp.end_epoch:
            return sp.stage
    return len(stages)  # past the end: nothing left to train


def _gather_rng(d: distributed.Dist) -> list[dict]:
    """Every rank's RNG states, in rank order (each rank resumes with its own)."""
    if not d.enabled:
        return [checkpoint.rng_state()]
    out: list = [None] * d.world_size
    torch.distributed.all_gather_object(out, checkpoint.rng_state())
    return out


def _load_for_finetune(model: nn.Module, url: str, tel: Telemetry) -> None:
    """Backbone from a checkpoint's EMA weights (official ft_init_ema) or plain weights; a fresh head."""
    ck = checkpoint.load(url)
    state = ck["ema"]["weights"] if ck.get("ema") else ck["model"]
    replaced = models.load_backbone(model, state, url)
    tel.print(f"fine-tuning from {url}: new classifier head ({', '.join(replaced)})")


def _plain(x):  # noqa: ANN001, ANN202 - loader state as plain JSON values (weights_only-safe)
    return json.loads(json.dumps(x, default=lambda v: v.item() if hasattr(v, "item") else str(v)))

"""`pipeline schedule`: print the per-stage progressive-learning plan of a preset (a table, or JSON with --json).

    pipeline schedule --preset efficientnetv2_s                # paper Table 6 / Algorithm 1, 4 stages, 350 epochs
    pipeline schedule --preset efficientnetv2_m --stages 8 --epochs 100 --json
    pipeline schedule --preset efficientnetv2_s --data DEST --epochs 12       # the images a dataset holds
    pipeline schedule --schedule ffcv --epochs 16        # FFCV's late size ramp; composer: Composer's resizing

Steps per stage count the train split of --data DEST (and its auto batch, as the
trainer picks it, and sizes capped at its images' size), else ImageNet-1k (1,281,167 training images) and a global
batch of 4096, unless --num-images / --batch-size say otherwise.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

from stagewise.pipeline.errors import report
from stagewise.model.variants import get_variant, list_models
from stagewise.shards import open_split
from stagewise.train.data import PAPER_BATCH, auto_batch, capped_sizes, typical_side
from stagewise.train.schedule import SCHEDULES, PeerRule, count, plan, preset_for

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC2012 train split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="efficientnetv2_s", choices=list_models(),
                        help="a model whose row gives the stages (Table 6's for s/m/l); default efficientnetv2_s")
    parser.add_argument("--stages", type=int, default=4, help="stages M (paper: 4)")
    parser.add_argument("--epochs", type=int, default=350, help="total epochs (paper: 350)")
    parser.add_argument("--schedule", default="paper", choices=SCHEDULES,
                        help="paper | automl | random-resize | ffcv | composer (the last two: regularization "
                             "constant, one stage per size)")
    parser.add_argument("--chunk-epochs", type=int, default=8, help="random-resize: epochs per sampled size")
    d = PeerRule()
    parser.add_argument("--ramp-start", type=float, default=d.ramp_start,
                        help="ffcv: share of the run where the size ramp starts (< 0 = FFCV's configs')")
    parser.add_argument("--ramp-end", type=float, default=d.ramp_end,
                        help="ffcv: share of the run where it ends (< 0 = FFCV's configs')")
    parser.add_argument("--delay-fraction", type=float, default=d.delay_fraction,
                        help=f"composer: share of the run at the first size (default {d.delay_fraction})")
    parser.add_argument("--finetune-fraction", type=float, default=d.finetune_fraction,
                        help=f"composer: share of the run, at its end, at the final size (default "
                             f"{d.finetune_fraction})")
    parser.add_argument("--vanilla", action="store_true", help="regularization fixed at the max (Table 13 vanilla)")
    parser.add_argument("--per-stage-batch", action="store_true", help="batch ~ (Se/Si)^2 per stage")
    parser.add_argument("--data", metavar="DEST", default=None, help="count the images of this dataset's split")
    parser.add_argument("--split", default="train", help="with --data: the split to count (default train)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="training images per epoch (default: --data's, else ImageNet's 1,281,167)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch (default: the trainer's auto batch for --data, else the paper's 4096)")
    parser.add_argument("--seed", type=int, default=0, help="random-resize: seed of the sampled sizes")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    add_budget_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.time_budget:
        return run_budget(args)
    try:
        view = open_split(args.data, args.split) if args.data else None
        num_images = args.num_images or (view.num_samples if view else IMAGENET_TRAIN_IMAGES)
        batch = args.batch_size or (auto_batch(num_images) if view else PAPER_BATCH)
        preset = preset_for(get_variant(args.preset))  # as the trainer derives it (Table 6's rows for s/m/l)
        sizes = capped_sizes(preset, typical_side(view), get_variant(args.preset).stride) if view else None  # as train
        if sizes:
            preset = replace(preset, min_size=sizes[0], max_size=sizes[1])
        rows = plan(preset, epochs=args.epochs, n_stages=args.stages, schedule=args.schedule,
                    num_images=num_images, batch_size=batch, adaptive=not args.vanilla,
                    seed=args.seed, chunk_epochs=args.chunk_epochs, per_stage_batch=args.per_stage_batch,
                    peer=PeerRule(args.ramp_start, args.ramp_end, args.delay_fraction, args.finetune_fraction))
    except (FileNotFoundError, KeyError, ValueError) as exc:  # KeyError: no such split in the manifest
        return report("pipeline schedule", exc, (FileNotFoundError, KeyError, ValueError))
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=1))
        return 0
    header = (f"{'stage':>5} {'size':>5} {'randaug':>8} {'mixup':>6} {'dropout':>8} {'epochs':>7} {'steps':>8} "
              f"{'batch':>6}")
    print(f"{args.preset}, {args.schedule} schedule, {count(len(rows), 'stage')}, {count(args.epochs, 'epoch')}, "
          f"{count(num_images, 'image')} per epoch, global batch {batch}")
    print(header)
    for r in rows:
        v = r.values
        print(f"{r.stage + 1:>5} {v.image_size:>5} {v.randaug_magnitude:>8.1f} {v.mixup_alpha:>6.2f} "
              f"{v.dropout:>8.2f} {r.epochs:>7} {r.steps:>8} {r.batch_size:>6}")
    print(f"{'total':>5} {'':>5} {'':>8} {'':>6} {'':>8} {sum(r.epochs for r in rows):>7} "
          f"{sum(r.steps for r in rows):>8}")
    return 0


# --- --time-budget (train/budget.py) ----------------------------------------------------------------------------


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--time-budget", metavar="DURATION", default="",
                        help="with --data: the plan a run under this budget would make here (2h, 45m, 1h30m): the "
                             "trainer's probe times steps on this machine, then prints epochs, steps and seconds "
                             "per stage (--epochs is then ignored)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="with --time-budget: where the probe runs (default auto)")
    parser.add_argument("--threads", type=int, default=0, help="with --time-budget: torch threads (0 = auto)")


def run_budget(args: argparse.Namespace) -> int:
    """The trainer's own plan for the budget: the config the trainer would build from these flags, probed here."""
    from stagewise.train import budget, config  # torch and the loader: only for the probe

    if not args.data:
        return report("pipeline schedule", ValueError("--time-budget needs --data DEST: the probe times steps on "
                                                      "its images"), (ValueError,))
    cli = {"data.url": args.data, "data.train_split": args.split, "model.name": args.preset,
           "schedule.kind": args.schedule, "schedule.stages": str(args.stages),
           "schedule.chunk_epochs": str(args.chunk_epochs), "schedule.adaptive": str(not args.vanilla),
           "schedule.per_stage_batch": str(args.per_stage_batch), "schedule.time_budget": args.time_budget,
           "run.device": args.device, "run.threads": str(args.threads), "run.seed": str(args.seed)}
    if args.batch_size:
        cli["optim.batch_size"] = str(args.batch_size)
    try:
        lines = budget.preview(config.build({}, cli))
    except (FileNotFoundError, KeyError, ValueError) as exc:  # ConfigError and preflight's problems too
        return report("pipeline schedule", exc, (FileNotFoundError, KeyError, ValueError))
    print("\n".join(lines))
    return 0

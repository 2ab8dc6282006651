"""`pipeline schedule`: print the per-stage progressive-learning plan of a preset (a table, or JSON with --json).

    pipeline schedule --preset efficientnetv2_s                # paper Table 6 / Algorithm 1, 4 stages, 350 epochs
    pipeline schedule --preset efficientnetv2_m --stages 8 --epochs 100 --json

Steps per stage assume ImageNet-1k (1,281,167 training images) and a global
batch of 4096 unless --num-images / --batch-size say otherwise.
"""
from __future__ import annotations

import argparse
import json

from stagewise.train.schedule import PRESETS, SCHEDULES, get_preset, plan

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC2012 train split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="paper Table 6 row")
    parser.add_argument("--stages", type=int, default=4, help="stages M (paper: 4)")
    parser.add_argument("--epochs", type=int, default=350, help="total epochs (paper: 350)")
    parser.add_argument("--schedule", default="paper", choices=SCHEDULES, help="paper | automl | random-resize")
    parser.add_argument("--chunk-epochs", type=int, default=8, help="random-resize: epochs per sampled size")
    parser.add_argument("--vanilla", action="store_true", help="regularization fixed at the max (Table 13 vanilla)")
    parser.add_argument("--per-stage-batch", action="store_true", help="batch ~ (Se/Si)^2 per stage")
    parser.add_argument("--num-images", type=int, default=IMAGENET_TRAIN_IMAGES, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=4096, help="global batch (paper: 4096)")
    parser.add_argument("--seed", type=int, default=0, help="random-resize: seed of the sampled sizes")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        rows = plan(get_preset(args.preset), epochs=args.epochs, n_stages=args.stages, schedule=args.schedule,
                    num_images=args.num_images, batch_size=args.batch_size, adaptive=not args.vanilla,
                    seed=args.seed, chunk_epochs=args.chunk_epochs, per_stage_batch=args.per_stage_batch)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=1))
        return 0
    header = (f"{'stage':>5} {'size':>5} {'randaug':>8} {'mixup':>6} {'dropout':>8} {'epochs':>7} {'steps':>8} "
              f"{'batch':>6}")
    print(f"{args.preset}, {args.schedule} schedule, {len(rows)} stages, {args.epochs} epochs, "
          f"{args.num_images} images per epoch")
    print(header)
    for r in rows:
        v = r.values
        print(f"{r.stage + 1:>5} {v.image_size:>5} {v.randaug_magnitude:>8.1f} {v.mixup_alpha:>6.2f} "
              f"{v.dropout:>8.2f} {r.epochs:>7} {r.steps:>8} {r.batch_size:>6}")
    print(f"{'total':>5} {'':>5} {'':>8} {'':>6} {'':>8} {sum(r.epochs for r in rows):>7} "
          f"{sum(r.steps for r in rows):>8}")
    return 0

"""Progressive learning on small data: the paper's Tables 12 and 13 in miniature, on the embedded digits dataset.

Three trainings with the same model, data, epochs and total steps (the demo's
recipe, `train.demo.demo_args`, for 12 epochs):
  1. fixed size: one stage at the final size and final regularization;
  2. vanilla progressive: sizes ramp 32 -> 64 px, regularization fixed at its
     final values (Table 13 "vanilla");
  3. progressive with adaptive regularization (Algorithm 1).
Each prints its wall-clock time and held-out top-1. Results are recorded in
docs/training.md; this is not a test.

    .venv/bin/python benchmarks/progressive.py --root /tmp/progressive --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

from stagewise.pipeline.build_shards import build_shards
from stagewise.pipeline.demo import write_digits_tree
from stagewise.train import config
from stagewise.train.demo import demo_args
from stagewise.train.loop import train

RUNS = {
    "fixed size": ["--schedule.stages=1"],
    "progressive, vanilla": ["--schedule.adaptive=false"],
    "progressive, adaptive": [],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/progressive", help="working folder (recreated)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training per seed and setting")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of every training (the demo runs 10)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.root, ignore_errors=True)
    src, shards = os.path.join(args.root, "digits"), os.path.join(args.root, "shards")
    write_digits_tree(src)
    for split in ("train", "val"):
        build_shards(os.path.join(src, split), shards, layout="folder", split=split, samples_per_shard=400)
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in RUNS}
    for seed in args.seeds:
        for name, extra in RUNS.items():
            run_dir = os.path.join(args.root, f"{name.replace(' ', '').replace(',', '-')}-seed{seed}")
            cfg = config.parse(demo_args(shards, run_dir) + [f"--run.seed={seed}", "--run.progress=false",
                                                             f"--schedule.epochs={args.epochs}"] + extra)
            start = time.time()
            out = train(cfg, print_config=False)
            seconds = time.time() - start
            results[name].append((seconds, out["top1"], out["steps"]))
            print(f"{name}, seed {seed}: {seconds:.0f} s, top-1 {out['top1']:.1f}%, {out['steps']} steps", flush=True)
    print(f"\n| setting | steps | wall-clock (s) | held-out top-1 (%) | runs |\n|---|---|---|---|---|")
    for name, rows in results.items():
        secs, tops = [r[0] for r in rows], [r[1] for r in rows]
        spread = f" ± {statistics.stdev(tops):.1f}" if len(tops) > 1 else ""
        print(f"| {name} | {rows[0][2]} | {statistics.mean(secs):.0f} | {statistics.mean(tops):.1f}{spread} "
              f"| {len(rows)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

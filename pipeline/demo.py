"""`make demo`: the main job end to end on data shipped inside a pip package.

scikit-learn's digits (1,797 real 8x8 scans of handwritten digits, 10 classes)
are written out as a class-per-folder tree of 32x32 grayscale PNGs, built into
train and val shards with `pipeline build-shards` (PNG and grayscale inputs
exercise the re-encoding fixes), verified, summarised, and then trained on
with progressive learning when the trainer is installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys

import numpy as np
from PIL import Image

from stagewise.pipeline.cli import main as pipeline_main

VAL_PER_CLASS = 30  # 300 held-out images


def write_digits_tree(root: str, seed: int = 0) -> tuple[int, int]:
    """`root/{train,val}/<digit>/<n>.png`; returns (train, val) image counts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        for rank, i in enumerate(idx):
            split = "val" if rank < VAL_PER_CLASS else "train"
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # 16 grey levels -> 0..255
            Image.fromarray(pixels, "L").resize((32, 32), Image.Resampling.BICUBIC).save(os.path.join(folder, f"{i:04d}.png"))
            counts[split] += 1
    return counts["train"], counts["val"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="demo-data", help="working folder (recreated)")
    parser.add_argument("--shards-only", action="store_true", help="stop after building and checking the shards")
    args = parser.parse_args(argv)
    src, dest = os.path.join(args.root, "digits"), os.path.join(args.root, "shards")
    shutil.rmtree(args.root, ignore_errors=True)
    n_train, n_val = write_digits_tree(src)
    print(f"demo: wrote {n_train} train and {n_val} val digit images under {src}/", flush=True)
    for split in ("train", "val"):
        rc = pipeline_main(["build-shards", os.path.join(src, split), dest, "--layout", "folder", "--split", split,
                            "--samples-per-shard", "400", "--no-progress"])
        if rc:
            return rc
    for cmd in (["verify-shards", dest], ["stats", dest]):
        rc = pipeline_main(cmd)
        if rc:
            return rc
    if args.shards_only:
        return 0
    if importlib.util.find_spec("stagewise.train.demo") is None:
        print("demo: the trainer is not installed; stopping after the shards")
        return 0
    from stagewise.train.demo import run as train_demo

    train_demo(dest, os.path.join(args.root, "run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

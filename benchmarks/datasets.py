"""A class-per-folder tree of real photo crops, for the `pipeline bench-…` commands.

Crops come from the two photographs shipped with scikit-learn (427x640 each), so
the JPEGs have real image statistics. The default 500x375 is ImageNet's most
common size. Usage: python benchmarks/photo_tree.py DIR --count 5000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write(root: Path, start: int, count: int, classes: int, size: tuple[int, int], quality: int, seed: int) -> None:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng((seed, start))
    w, h = size
    for i in range(start, start + count):
        photo = photos[i % len(photos)]
        scale = rng.uniform(max(w / photo.shape[1], h / photo.shape[0]), 1.0)  # crop then resize: varied content
        cw, ch = round(w / scale * 0.999), round(h / scale * 0.999)
        y, x = int(rng.integers(0, photo.shape[0] - ch + 1)), int(rng.integers(0, photo.shape[1] - cw + 1))
        crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"img_{i:06d}.jpg", quality=quality)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--start", type=int, default=0, help="first image number (parallel writers into one tree)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", default="500x375", help="WxH, px")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    write(Path(a.dir), a.start, a.count, a.classes, (w, h), a.quality, a.seed)


if __name__ == "__main__":
    main()

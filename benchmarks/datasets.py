"""The one generator of image trees for the tests and the benchmarks, made from photographs that pip packages ship.

Sources (`source_photo`, cached): scikit-learn's two sample photos (china,
flower: 640x427 RGB), the photos bundled in scikit-image's wheel under
skimage/data/ (never the ones it downloads), and matplotlib's sample_data
photo of Grace Hopper. Nothing is fetched from the network.

Writers:
- `write_photo_tree`: small class folders of random crops (the tests' shards).
- `photo`, `mosaic`: single crops and 2x2 mosaics of crops (the quirk trees,
  the re-encoder tests).
- `make_input`: `pipeline bench-build --make-input`'s reproducible input.
- `write_crop_tree`: many same-size crops in N class folders (loader and
  build benchmarks; CLI `crops`).
- `write_texture_task`: a Brodatz / KTH-TIPS style material task whose
  classes differ in fine texture, with train and val patches from disjoint
  regions of each photo, for `pipeline bench-progressive` (CLI `textures`).

Every writer is deterministic: the same arguments write byte-identical files.

    python -m stagewise.benchmarks.datasets textures DIR
    python -m stagewise.benchmarks.datasets crops DIR --count 5000
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# --- Sources ------------------------------------------------------------------------------

# name -> (package, path inside the package). Only files that ship in the wheels.
SOURCES: dict[str, tuple[str, str]] = {
    **{name: ("skimage", f"data/{name}.png") for name in (
        "astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel", "ihc", "moon",
        "page", "text", "clock_motion", "motorcycle_left")},
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def source_path(name: str) -> str:
    """File path of a bundled photo; a clear error when its package is not installed."""
    try:
        package, rel = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown source photo {name!r}; choose one of {', '.join(sorted(SOURCES))}") from None
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        extra = {"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(package, package)
        raise ModuleNotFoundError(f"source photo {name!r} ships with {extra}: pip install {extra}")
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


@functools.lru_cache(maxsize=None)
def source_photo(name: str) -> np.ndarray:
    """A bundled photo as a read-only uint8 array: HxWx3 (RGB; alpha dropped) or HxW (grayscale)."""
    with Image.open(source_path(name)) as im:
        im = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
    arr = np.asarray(im)
    arr.flags.writeable = False  # shared by every caller through the cache
    return arr


@functools.lru_cache(maxsize=1)
def sample_photos() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's two 427x640 RGB sample photos (china, flower), as `load_sample_images()` returns them."""
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


# --- Small trees and single crops (tests) ----------------------------------------------------


def write_photo_tree(root: Path, num_classes: int = 3, per_class: int = 5, seed: int = 0) -> Path:
    """Class folders of real photographs (scikit-learn's sample images), randomly cropped."""
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = Path(root) / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo_ = photos[(c + i) % len(photos)]
            h, w = int(rng.integers(120, 300)), int(rng.integers(120, 300))
            y, x = int(rng.integers(0, photo_.shape[0] - h)), int(rng.integers(0, photo_.shape[1] - w))
            Image.fromarray(photo_[y : y + h, x : x + w]).save(folder / f"photo_{i}.jpg", quality=90)
    return Path(root)


def photo(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    """A crop of one of scikit-learn's two sample photographs."""
    images = sample_photos()
    rng = np.random.default_rng(seed)
    src = images[seed % len(images)]
    w, h = size
    y = int(rng.integers(0, src.shape[0] - h))
    x = int(rng.integers(0, src.shape[1] - w))
    return Image.fromarray(src[y : y + h, x : x + w])


def mosaic(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo larger than the sample photos, with detail down to the pixel: tiles of real crops."""
    out = Image.new("RGB", size)
    tile = (size[0] // 2 + 1, size[1] // 2 + 1)
    for k in range(4):
        out.paste(photo(seed + k, tile), (tile[0] * (k % 2), tile[1] * (k // 2)))
    return out


# --- Benchmark inputs ----------------------------------------------------------------------------


def make_input(dest: str, count: int, seed: int = 0) -> None:
    """`count` photos in 10 class folders: baseline JPEGs, quality 90, 4:2:0 (Pillow's defaults).

    `pipeline bench-build --make-input`'s input. Crops of scikit-learn's two
    640x427 sample photographs, mirrored and colour-jittered at random: 3 in 4
    are 500x375 (a common ImageNet size); 1 in 4 is 1000x750, a 2x2 mosaic of
    such crops, so that it has detail down to the pixel like a larger photo (an
    upscaled crop would be smooth, and flatter the DCT-domain downscaling).
    """
    from PIL import ImageEnhance

    if os.path.isdir(dest) and os.listdir(dest):
        raise ValueError(f"--make-input: {dest} is not empty")
    photos = [Image.fromarray(a) for a in sample_photos()]
    rng = np.random.default_rng(seed)

    def crop() -> Image.Image:
        src = photos[int(rng.integers(len(photos)))]
        h = rng.uniform(375, src.height)  # at most 1.14x downscaled to 500x375: native detail
        x, y = rng.uniform(0, src.width - h * 4 / 3), rng.uniform(0, src.height - h)
        im = src.resize((500, 375), Image.Resampling.LANCZOS, box=(x, y, x + h * 4 / 3, y + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
        return ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))

    for i in range(count):
        if i % 4 == 3:
            im = Image.new("RGB", (1000, 750))
            for k in range(4):
                im.paste(crop(), (500 * (k % 2), 375 * (k // 2)))
        else:
            im = crop()
        folder = os.path.join(dest, f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        im.save(os.path.join(folder, f"{i:06d}.jpg"), "JPEG", quality=90)


def write_crop_tree(root: Path, start: int, count: int, classes: int, size: tuple[int, int], quality: int,
                    seed: int) -> None:
    """Images `start` .. `start + count - 1` of a tree of same-size photo crops: `root/class_KKK/img_NNNNNN.jpg`.

    Crops of scikit-learn's two photos at a random scale, resized (bicubic) to
    `size` (W, H px); image i goes to class i % `classes`. Several writers may
    fill one tree in parallel with disjoint `start` ranges.
    """
    photos = sample_photos()
    rng = np.random.default_rng((seed, start))
    w, h = size
    for i in range(start, start + count):
        photo_ = photos[i % len(photos)]
        scale = rng.uniform(max(w / photo_.shape[1], h / photo_.shape[0]), 1.0)  # crop then resize: varied content
        cw, ch = round(w / scale * 0.999), round(h / scale * 0.999)
        y, x = int(rng.integers(0, photo_.shape[0] - ch + 1)), int(rng.integers(0, photo_.shape[1] - cw + 1))
        crop = Image.fromarray(photo_[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
        folder = Path(root) / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"img_{i:06d}.jpg", quality=quality)


# --- The texture task ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A rectangle of one photo, in that photo's pixels (x0, y0, x1, y1; x1, y1 exclusive), filled by one material."""

    photo: str
    box: tuple[int, int, int, int]


# Materials: each a region of a real photo that one material fills. Picked by eye.
MATERIALS: dict[str, tuple[Region, ...]] = {
    "grass": (Region("grass", (0, 0, 512, 512)),),
    "gravel": (Region("gravel", (0, 0, 512, 512)),),
    "brick": (Region("brick", (0, 0, 512, 512)),),
    "stars": (Region("hubble_deep_field", (0, 0, 1000, 872)),),
    "tissue": (Region("ihc", (0, 0, 512, 512)),),
    "moon": (Region("moon", (0, 0, 512, 512)),),
    "cells": (Region("cell", (0, 0, 550, 660)),),
    "text": (Region("page", (0, 0, 384, 191)), Region("text", (0, 0, 448, 172))),
    "retina": (Region("retina", (300, 300, 1100, 1100)),),
    "coins": (Region("coins", (0, 0, 384, 303)),),
}

PATCH = 128  # px, stored patch side: the benchmark's final train and eval size
VERSION = 1  # of the texture task; bump when what it writes changes


def split_region(box: tuple[int, int, int, int], val_fraction: float) -> dict[str, tuple[int, int, int, int]]:
    """The region cut across its longer side: the first 1 - `val_fraction` for train, the rest for val.

    Patches are cut from inside one part only, so no val pixel is ever in a
    train patch (the parts share an edge, not a pixel).
    """
    x0, y0, x1, y1 = box
    if x1 - x0 >= y1 - y0:
        cut = x1 - round((x1 - x0) * val_fraction)
        return {"train": (x0, y0, cut, y1), "val": (cut, y0, x1, y1)}
    cut = y1 - round((y1 - y0) * val_fraction)
    return {"train": (x0, y0, x1, cut), "val": (x0, cut, x1, y1)}


def _gray(name: str) -> np.ndarray:
    """Luma (ITU-R 601, Pillow's L) of a source photo, float32 0..255."""
    arr = source_photo(name)
    if arr.ndim == 3:
        arr = np.asarray(Image.fromarray(arr).convert("L"))
    return arr.astype(np.float32)


def _patch(gray: np.ndarray, window: tuple[int, int, int], size: int, k: int, contrast: float) -> Image.Image:
    """The square window (x, y, side) resized (Lanczos) to `size`, turned by k (dihedral), standardized, as RGB."""
    x, y, side = window
    crop = Image.fromarray(gray[y:y + side, x:x + side])  # mode F: the resize sees only these pixels
    arr = np.asarray(crop.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    arr = np.rot90(arr, k % 4)
    if k >= 4:
        arr = arr[:, ::-1]
    # Same mean and spread for every patch: brightness and contrast say nothing about the class.
    arr = (arr - arr.mean()) / max(float(arr.std()), 1e-3) * contrast + 128.0
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(out[:, :, None], 3, axis=2))


def write_texture_task(root: str | Path, *, train_per_class: int = 160, val_per_class: int = 40,
                       size: int = PATCH, scale: tuple[float, float] = (1.0, 1.25), val_fraction: float = 0.35,
                       contrast: float = 48.0, quality: int = 95, seed: int = 0,
                       materials: dict[str, tuple[Region, ...]] | None = None) -> dict:
    """Write `root/{train,val}/<material>/<n>.jpg` and `root/textures.json`; returns the summary (also that JSON).

    Each patch is a square window of a material's region, `scale` source
    pixels per patch pixel (at least 1: never upscaled, so the finest detail
    of the photo is in the patch), resized to `size` px, turned to one of the
    8 orientations, converted to gray and standardized to one mean and spread.
    Train windows come from the first part of each region, val windows from
    the rest (`split_region`); every window is recorded in the JSON.
    """
    root = Path(root)
    materials = MATERIALS if materials is None else materials
    rng = np.random.default_rng(seed)
    counts = {"train": train_per_class, "val": val_per_class}
    patches: list[dict] = []
    regions: list[dict] = []
    for label, (name, parts) in enumerate(sorted(materials.items())):
        for split, n in counts.items():
            usable = []
            for region in parts:
                part = split_region(region.box, val_fraction)[split]
                regions.append({"class": name, "photo": region.photo, "split": split, "box": list(part)})
                usable.append((region.photo, part))
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                src, (x0, y0, x1, y1) = usable[i % len(usable)]
                most = min(x1 - x0, y1 - y0)
                side = min(most, int(round(size * rng.uniform(*scale))))
                if side < size:
                    raise ValueError(f"texture task: {name}'s {split} region of {src} is {x1 - x0}x{y1 - y0} px, "
                                     f"smaller than one {size} px patch")
                x = int(rng.integers(x0, x1 - side + 1))
                y = int(rng.integers(y0, y1 - side + 1))
                k = int(rng.integers(8))
                rel = f"{split}/{name}/{i}.jpg"
                _patch(_gray(src), (x, y, side), size, k, contrast).save(root / rel, quality=quality)
                patches.append({"file": rel, "class": name, "label": label, "split": split, "photo": src,
                                "box": [x, y, x + side, y + side], "orientation": k})
    summary = {"task": "textures", "version": VERSION, "size": size, "seed": seed, "scale": list(scale),
               "val_fraction": val_fraction, "contrast": contrast, "quality": quality,
               "classes": sorted(materials), "counts": {s: n * len(materials) for s, n in counts.items()},
               "photos": {src: list(source_photo(src).shape[:2][::-1]) for src in
                          sorted({r.photo for parts in materials.values() for r in parts})},
               "regions": regions, "patches": patches}
    (root / "textures.json").write_text(json.dumps(summary, indent=1))
    return summary


def overlapping_patches(summary: dict) -> list[tuple[str, str]]:
    """(train file, val file) pairs whose windows share a pixel of the same photo; empty when the task is clean."""
    bad = []
    by_photo: dict[str, dict[str, list[dict]]] = {}
    for p in summary["patches"]:
        by_photo.setdefault(p["photo"], {"train": [], "val": []})[p["split"]].append(p)
    for splits in by_photo.values():
        for t in splits["train"]:
            tx0, ty0, tx1, ty1 = t["box"]
            for v in splits["val"]:
                vx0, vy0, vx1, vy1 = v["box"]
                if tx0 < vx1 and vx0 < tx1 and ty0 < vy1 and vy0 < ty1:
                    bad.append((t["file"], v["file"]))
    return bad


# --- CLI ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stagewise.benchmarks.datasets", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("textures", help="the texture task: DIR/{train,val}/<material>/<n>.jpg + DIR/textures.json")
    t.add_argument("dir")
    t.add_argument("--train-per-class", type=int, default=160)
    t.add_argument("--val-per-class", type=int, default=40)
    t.add_argument("--size", type=int, default=PATCH, help="patch side, px")
    t.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("crops", help="same-size photo crops in class folders")
    c.add_argument("dir")
    c.add_argument("--count", type=int, default=5000)
    c.add_argument("--start", type=int, default=0, help="first image number (parallel writers into one tree)")
    c.add_argument("--classes", type=int, default=10)
    c.add_argument("--size", default="500x375", help="WxH, px")
    c.add_argument("--quality", type=int, default=90)
    c.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.what == "textures":
        if os.path.isdir(a.dir) and os.listdir(a.dir):
            print(f"error: {a.dir} is not empty", file=sys.stderr)
            return 2
        s = write_texture_task(a.dir, train_per_class=a.train_per_class, val_per_class=a.val_per_class,
                               size=a.size, seed=a.seed)
        print(f"textures: {len(s['classes'])} classes ({', '.join(s['classes'])}), {s['counts']['train']} train / "
              f"{s['counts']['val']} val patches of {s['size']} px in {a.dir}")
        print(f"next: pipeline build-shards {a.dir}/train SHARDS --layout folder --split train && "
              f"pipeline build-shards {a.dir}/val SHARDS --layout folder --split val")
        return 0
    try:
        w, h = (int(v) for v in a.size.split("x"))
    except ValueError:
        print(f"error: --size must be WxH, got {a.size!r}", file=sys.stderr)
        return 2
    write_crop_tree(Path(a.dir), a.start, a.count, a.classes, (w, h), a.quality, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

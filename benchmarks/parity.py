"""Eval preprocessing parity: the loader's eval path against torchvision on the same JPEGs.

torchvision side (what users evaluating torchvision/timm weights run): Pillow decode, then
`Resize(floor(S / crop_pct), antialias=True)` (bilinear, shorter side), `CenterCrop(S)`,
`ToDtype(float32, scale=True)`, `Normalize(mean, std)`. Loader side: `Loader(train=False)`
with the same size, crop_pct, mean and std. Prints the mean and max absolute difference
in normalized units and in grey levels (0..255).

    python -m stagewise.benchmarks.parity DEST [--split val] [--size 224] [--crop-pct 0.875] [--count 256]
    pipeline bench-loader DEST --parity ...          # the same report

Why they differ at all, by design (docs/loader.md, "Eval parity"): the loader decodes only
the square that resize + center crop keeps and resizes it straight to S x S, so the
antialias filter sees no pixels outside that square and the square's corners are rounded
to whole source pixels; libjpeg-turbo (DALI) and Pillow's libjpeg may round the IDCT differently.
"""
from __future__ import annotations

import argparse
import io
import math

import numpy as np
import torch

DEFAULT_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's, as torchvision/timm weights use


def torchvision_eval(jpg: bytes, size: int, crop_pct: float, mean, std) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import v2

    transform = v2.Compose([
        v2.Resize(math.floor(size / crop_pct), antialias=True),
        v2.CenterCrop(size),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])
    with Image.open(io.BytesIO(jpg)) as im:
        return transform(im.convert("RGB"))


def compare(url: str, split: str, size: int, crop_pct: float, count: int, mean=DEFAULT_MEAN_STD[0],
            std=DEFAULT_MEAN_STD[1], device: str = "cpu", geometry: str = "torchvision") -> dict:
    """Differences over the first `count` samples of `split` (eval order = manifest order)."""
    from stagewise.loaders import AugmentSpec, Loader, StageParams
    from stagewise.shards import iter_samples, open_split

    view = open_split(url, split)
    samples = []
    for shard in view.shard_urls:
        for sample in iter_samples(shard):
            samples.append(sample)
            if len(samples) == count:
                break
        if len(samples) == count:
            break
    ours = []
    stage = StageParams(image_size=size, randaug_magnitude=0.0, mixup_alpha=0.0)
    with Loader(url, split=split, batch_size=min(64, max(1, len(samples))), stage=stage, device=device, train=False,
                augment=AugmentSpec(crop_pct=crop_pct, mean=tuple(mean), std=tuple(std),
                                    eval_geometry=geometry)) as loader:
        for images, labels in loader:
            ours += list(images[labels >= 0].cpu())
            if len(ours) >= len(samples):
                break
    diffs = np.concatenate([
        (a - torchvision_eval(s.jpg, size, crop_pct, mean, std)).abs().numpy().ravel()
        for a, s in zip(ours[: len(samples)], samples)
    ])
    grey = diffs * (255.0 * float(np.mean(std)))  # normalized units -> grey levels (mean std over channels)
    return {"samples": len(samples), "size": size, "crop_pct": crop_pct, "geometry": geometry,
            "mean_abs": float(diffs.mean()), "max_abs": float(diffs.max()), "p99_abs": float(np.quantile(diffs, 0.99)),
            "mean_grey": float(grey.mean()), "max_grey": float(grey.max())}


def report(stats: dict) -> str:
    return (f"eval_geometry={stats['geometry']!r} vs torchvision Resize({math.floor(stats['size'] / stats['crop_pct'])}, antialias) + "
            f"CenterCrop({stats['size']}) + Normalize, {stats['samples']} images: "
            f"mean |diff| {stats['mean_abs']:.4f} ({stats['mean_grey']:.2f} grey levels), "
            f"p99 {stats['p99_abs']:.4f}, max {stats['max_abs']:.4f} ({stats['max_grey']:.1f} grey levels)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagewise.benchmarks.parity", description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--split", default="train")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--crop-pct", type=float, default=0.875)
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    for geometry in ("torchvision", "window"):
        print(report(compare(args.url, args.split, args.size, args.crop_pct, args.count, device=args.device,
                             geometry=geometry)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

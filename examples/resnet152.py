"""Train torchvision's resnet152 (weights=None) for a few steps from shards, fed by the stagewise Loader.

The loader knows nothing about the model: any ConvNet takes its (images, targets).

    python examples/resnet152.py DATA [--split train] [--steps 3] [--batch-size 4] [--size 64] [--device cpu]

DATA is a folder or s3://bucket/prefix written by `pipeline build-shards`.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F
import torchvision

from stagewise.loaders import Loader, StageParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--split", default="train")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="training image size, px")
    parser.add_argument("--magnitude", type=float, default=5.0, help="RandAugment magnitude (reference scale)")
    parser.add_argument("--mixup", type=float, default=0.2, help="mixup alpha; 0 = off")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)

    stage = StageParams(image_size=args.size, randaug_magnitude=args.magnitude, mixup_alpha=args.mixup)
    loader = Loader(args.data, split=args.split, batch_size=args.batch_size, stage=stage, device=args.device)
    model = torchvision.models.resnet152(weights=None, num_classes=loader.num_classes).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    step = 0
    while step < args.steps:
        epoch = loader.epoch
        for images, targets in loader:  # like a DataLoader: each pass is the next epoch, no set_epoch needed
            loss = F.cross_entropy(model(images), targets)  # int64 labels or soft rows, both accepted
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            print(f"step {step} epoch {epoch} images {tuple(images.shape)} loss {loss.item():.4f}", flush=True)
            if not math.isfinite(loss.item()):
                return 1
            step += 1
            if step == args.steps:
                break
    loader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

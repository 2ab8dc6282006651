"""`python -m stagewise.train` and `pipeline train`: the trainer's command line (the config tree's `--section.key=value`).

Exit status: 0 when done, 2 on a bad config or input (one line naming the key or
file), 3 when the loss diverged (the last good checkpoint is named).
"""
from __future__ import annotations

import argparse
import sys

from stagewise.train import config
from stagewise.train.config import ConfigError
from stagewise.train.loop import TrainingDiverged, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return main(args=args)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
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

"""`pipeline train`: the trainer (same as `python -m train`); options are the config tree's `--section.key=value`."""
from __future__ import annotations

import argparse

from stagewise.train import config
from stagewise.train.loop import main as train_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return train_main(args=args)

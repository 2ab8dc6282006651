"""`python -m stagewise.train` and `pipeline train`: the trainer's command line (the config tree's `--section.key=value`).

Exit status: 0 when done, 2 on a bad config or input (one line per problem, naming
the key or file; `--debug` or STAGEWISE_DEBUG=1 shows the traceback), 3 when the loss diverged (the last good checkpoint is named), 130 / 143 when
stopped by Ctrl-C / SIGTERM (a checkpoint at the step it stopped after, and the
command that continues the run).
"""
from __future__ import annotations

import argparse
import os
import sys

from stagewise.pipeline.errors import debug_enabled, report
from stagewise.train import config
from stagewise.train.config import ConfigError
from stagewise.train.interrupts import Interrupted
from stagewise.train.loop import TrainingDiverged, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return main(args=args)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = debug_enabled(argv if args is None else ["--debug"] if args.debug else [])
    try:
        cfg = config.from_args(args) if args is not None else config.parse(argv)
        train(cfg)
    except (ConfigError, FileNotFoundError) as exc:  # preflight's problems too: one line each
        if os.environ.get("RANK", "0") != "0" and not debug:
            return 2  # under torchrun every rank finds the same mistake: rank 0 says it
        return report("train", exc, (ConfigError, FileNotFoundError), debug)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except Interrupted as exc:
        if str(exc):  # rank 0 says it
            print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before the loop took over Ctrl-C: nothing trained, nothing to save
        print("interrupted before the first step; nothing to save", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - report() re-raises all but a person's storage mistakes (S3)
        return report("train", exc, debug=debug)
    return 0

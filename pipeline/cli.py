"""The `pipeline` console script: one subcommand per module, imported only when used.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`, so
`pipeline --help` stays fast and a missing optional extra (DALI, timm, Ray) only
affects the subcommand that needs it. A mistake (a bad flag, an S3 error) is one
line on stderr and exit status 2 (`errors`); `--debug` shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from stagewise.pipeline.errors import OneLineParser, debug_enabled, report

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build-shards": ("stagewise.pipeline.build_shards", "turn an image tree into WebDataset shards (folder or s3://)"),
    "verify-shards": ("stagewise.pipeline.verify", "re-read shards: checksums, tar structure, decodes, class counts"),
    "stats": ("stagewise.pipeline.stats", "print samples, classes, bytes and image sizes of a shard dataset"),
    "bench-build": ("stagewise.benchmarks.bench_build", "benchmark build-shards against a naive Pillow + webdataset baseline"),
    "bench-model": ("stagewise.benchmarks.bench_model", "benchmark efficientnetv2_s against timm's tf_efficientnetv2_s"),
    "bench-loader": ("stagewise.benchmarks.bench_loader", "benchmark the DALI loader against webdataset + torchvision"),
    "bench-progressive": ("stagewise.benchmarks.bench_progressive", "time to accuracy: progressive learning vs fixed-size training"),
    "schedule": ("stagewise.train.schedule_cli", "print the per-stage progressive-learning plan of a preset"),
    "train": ("stagewise.train.cli", "train a model on shards (same as `python -m stagewise.train`)"),
}


def pillow_flavour() -> str:
    """Which PIL is active: 'Pillow-SIMD x.y' or 'Pillow x.y' (both install into PIL/)."""
    import PIL

    version = PIL.__version__
    try:
        simd = importlib.metadata.version("pillow-simd")
    except importlib.metadata.PackageNotFoundError:
        simd = None
    # pillow-simd is installed over Pillow, so both dists may be listed; the
    # imported module's version tells which one's files are live.
    if simd is not None and simd == version:
        return f"Pillow-SIMD {version}"
    return f"Pillow {version}"


def version_string() -> str:
    try:
        own = importlib.metadata.version("stagewise")
    except importlib.metadata.PackageNotFoundError:
        own = "unknown"
    from stagewise.pipeline.imagefix import reencode_path

    return f"stagewise {own} ({pillow_flavour()}; {reencode_path()})"


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, _ = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # --help / --version / error for unknown commands
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub = OneLineParser(prog=f"pipeline {name}", description=help_text, allow_abbrev=False)
    module.add_arguments(sub)
    if "--debug" not in sub._option_string_actions:  # the trainer's own parser has it
        sub.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = sub.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except Exception as exc:  # noqa: BLE001 - report() re-raises all but a person's storage mistakes
        return report(sub.prog, exc, debug=debug_enabled(rest))


if __name__ == "__main__":
    sys.exit(main())

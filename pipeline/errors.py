"""A person's mistake as one line and exit status 2; a bug as a traceback. Shared by `pipeline` and the trainer.

A mistake is what the person can fix: a command-line flag (`OneLineParser`), a
config key or value (`ConfigError`), a storage error that `store.describe_error`
recognizes (S3 credentials, endpoint, bucket, key). Any other exception is a
bug and keeps its traceback. `--debug` or `STAGEWISE_DEBUG=1` shows the
traceback of a mistake too.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import NoReturn

from stagewise.shards.store import describe_error

DEBUG_ENV = "STAGEWISE_DEBUG"
USAGE_ERROR = 2  # argparse's exit status for a bad command line, kept for every mistake


def count(n: int, word: str) -> str:
    """`1 stage`, `4 stages`, `2 classes`: a number with its noun in the right number, for the lines people read."""
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith(('s', 'x', 'sh')) else 's'}"


def debug_enabled(argv: list[str] | None = None) -> bool:
    """`--debug` among the arguments, or STAGEWISE_DEBUG set to anything but '', '0'."""
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def user_message(exc: BaseException, mistakes: tuple[type[BaseException], ...] = ()) -> str | None:
    """The one line for `exc` when it is a person's mistake: one of `mistakes` (their own message), or a
    storage error; None for a bug."""
    described = describe_error(exc)
    if described is not None:
        return described
    if isinstance(exc, mistakes):
        return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError's str() quotes
    return None


def report(prog: str, exc: BaseException, mistakes: tuple[type[BaseException], ...] = (),
           debug: bool | None = None) -> int:
    """Print `exc` as `prog: error: ...` (a line per line of its message) and return 2; re-raise a bug, or
    anything under `debug` (None: `debug_enabled()`)."""
    message = user_message(exc, mistakes)
    if message is None or (debug_enabled() if debug is None else debug):
        raise exc
    for line in message.splitlines() or [type(exc).__name__]:
        print(f"{prog}: error: {line}", file=sys.stderr)
    return USAGE_ERROR


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (no usage dump) and an unknown flag gets a "did you mean"."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            message = "; ".join(self.unknown(a) for a in message.split(": ", 1)[1].split())
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (--help lists the options)\n")

    def unknown(self, arg: str) -> str:
        if not arg.startswith("-"):
            return f"unexpected argument {arg!r}: settings are --flags (a dataset, for one: --data DEST)"
        flag = arg.split("=", 1)[0]
        near = difflib.get_close_matches(flag, [o for o in self._option_string_actions if o.startswith("--")], n=1)
        return f"unknown option {flag!r}" + (f" (did you mean {near[0]!r}?)" if near else "")

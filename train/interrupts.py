"""Stopping a run without losing it: Ctrl-C (SIGINT) and a preemption notice (SIGTERM) become a request
that the loop honours at the next step boundary, on every rank at the same step.

A spot node's notice is SIGTERM, then SIGKILL about 30 s to 2 min later (torchrun's agent forwards
the signal to its workers and waits 30 s before its own SIGKILL). So the handler only records the
signal; the loop finishes the step in hand, all ranks agree on it (one small collective, which the
loop already makes for its divergence check), a checkpoint is written there, and the run exits
with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM) and one line that says how to
continue. A second Ctrl-C in a single process exits at once, without a checkpoint. Under torchrun
repeats are ignored: the agent forwards the signal the terminal already sent, and it escalates to
SIGKILL by itself.

A restart by torchrun's elastic agent (a lost or joining node) is a resume: `elastic_restart` tells.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint at `step`; `exit_code` is 128 + the signal."""

    def __init__(self, signum: int, step: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def elastic_restart(saved_run_id: str | None = None) -> bool:
    """Whether this worker is a restart of the same job by torchrun's elastic agent, so a resume.

    The agent counts restarts after failures (TORCHELASTIC_RESTART_COUNT > 0). A restart for a node
    that joins keeps the count at 0; it is recognised by the checkpoint's rendezvous id, which is this
    job's (torchrun's default id "none" names no job, so it never matches).
    """
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return True
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return run_id != "none" and saved_run_id == run_id


def resume_command() -> str:
    """The command that continues this run: the one typed, plus --resume."""
    if under_torchrun():
        return "the same torchrun command with --resume (a restart by the elastic agent resumes by itself)"
    argv = list(sys.orig_argv if "-m" in sys.orig_argv else sys.argv)  # python -m stagewise.train / pipeline train
    if not {"--resume", "--run.resume=true"} & set(argv):
        argv.append("--resume")
    return shlex.join(argv)


class StopSignals:
    """Once installed (in the main thread): SIGINT and SIGTERM set `requested` instead of killing the process.

    Outside the main thread (a test calling `train()` from a worker thread) signals cannot be caught,
    and nothing is installed.
    """

    def __init__(self) -> None:
        self.requested: int | None = None  # the first signal's number
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """The handlers found by `install`, back in place."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = signum
            again = "; Ctrl-C again exits at once, without one" if signum == signal.SIGINT and not under_torchrun() else ""
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets it: rank 0 says it
                _say(f"{name}: stopping after this step, with a checkpoint{again}")
        elif not under_torchrun() and signum == signal.SIGINT:
            _say(f"{name} again: exiting now, without a checkpoint")
            os._exit(128 + signum)  # noqa: SLF001 - "at once": no cleanup may block (loader threads, collectives)


def _say(line: str) -> None:
    os.write(sys.stderr.fileno(), f"{line}\n".encode())  # a signal handler: no buffered print

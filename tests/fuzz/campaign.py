"""Fuzz both C extensions under AddressSanitizer + UndefinedBehaviorSanitizer (`make fuzz`; a short run is a test).

Builds sanitizer copies of loaders/_cropdecode.c and pipeline/_jpegraw.c (gcc -fsanitize=address,undefined,
any report fatal) into tests/fuzz/build/, then runs tests/fuzz/targets.py in a child process with libasan
preloaded (python itself is not instrumented) for the time given, and watches it:

- a sanitizer report or any other death: the case it was on is kept;
- a hang: one case using more than --hang-s of CPU time (CPU, not wall time, so a busy machine does not make
  hangs), or ten times that of wall time;
- memory: the child's resident set over --rss-mb.

Each kept case goes to tests/fuzz/regressions/ (<target>-<kind>-<sha1>.jpg, with its arguments and the report
in a .json beside it); the child is restarted after it, and every later run replays them all first.

    python -m tests.fuzz.campaign --seconds 600 [--target cropdecode] [--seed N]
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.targets import HARNESS_ERROR, REPO, SOURCES, STATE_BYTES, TARGETS, read_state

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
REGRESSIONS = HERE / "regressions"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]
ASAN_OPTIONS = ":".join([
    "detect_leaks=0",                # CPython's own allocations at exit are not the extensions' leaks
    "allocator_may_return_null=1",   # a failed malloc is a path the C must handle, not a report
    "quarantine_size_mb=32",         # freed memory held back to catch use-after-free: 256 MB by default
    "handle_segv=1", "handle_abort=1", "exitcode=86",
])
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1:exitcode=87"


def compiler() -> str:
    return (sysconfig.get_config_var("CC") or "cc").split()[0]


@functools.lru_cache(maxsize=1)
def extensions_should_build() -> bool:
    """Whether `pip install` builds the C extensions here: a C compiler that finds libjpeg's headers (the
    Makefile's install needs both; without them the extensions are optional and skipped)."""
    try:
        return subprocess.run([compiler(), "-E", "-x", "c", "-", "-o", os.devnull],
                              input="#include <stdio.h>\n#include <jpeglib.h>\n", capture_output=True, text=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build(target: str) -> Path:
    """The sanitizer build of one extension, remade when its source is newer."""
    BUILD.mkdir(exist_ok=True)
    so, source = BUILD / f"_{target}-asan.so", SOURCES[target]
    if not so.exists() or so.stat().st_mtime < source.stat().st_mtime:
        subprocess.run([compiler(), "-shared", "-fPIC", *SANITIZE, f"-I{sysconfig.get_paths()['include']}",
                        str(source), "-ljpeg", "-o", str(so)], check=True)
    return so


def libasan() -> str:
    return subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True,
                          check=True).stdout.strip()


@dataclass
class Result:
    target: str
    mutated: int = 0      # mutated cases run to the end
    kept: int = 0         # replayed cases (seeds, hostile cases, regressions), each run
    seconds: float = 0.0  # wall time of the children
    peak_rss_mb: float = 0.0
    failures: list[str] = field(default_factory=list)  # what was kept, one line each


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)


def keep(target: str, kind: str, data: bytes, params: dict, report: str) -> str:
    """Save a failing case as a regression; its name."""
    REGRESSIONS.mkdir(exist_ok=True)
    name = f"{target}-{kind}-{hashlib.sha1(data).hexdigest()[:12]}"
    (REGRESSIONS / f"{name}.jpg").write_bytes(data)
    (REGRESSIONS / f"{name}.json").write_text(json.dumps({"target": target, "kind": kind, "params": params,
                                                          "report": report[-4000:]}, indent=1) + "\n")
    return name


def _report(log_stem: Path, stdout: str) -> str:
    """The sanitizer's report (its log files for this child), or the child's last output."""
    text = ""
    for log in sorted(log_stem.parent.glob(log_stem.name + "*")):
        text += log.read_text(errors="replace")
        log.unlink()
    return text or stdout


def run(target: str, seconds: float, seed: int = 0, hang_s: float = 2.0, rss_mb: float = 1024.0,
        replay: bool = True, max_failures: int = 20) -> Result:
    from tests.fuzz.corpus import write_corpus

    corpus = write_corpus(BUILD / "corpus")
    so, result = build(target), Result(target)
    state = BUILD / f"state-{target}-{os.getpid()}"
    log = BUILD / f"asan-{target}-{os.getpid()}"
    env = {**os.environ, "LD_PRELOAD": libasan(), "ASAN_OPTIONS": f"{ASAN_OPTIONS}:log_path={log}",
           "UBSAN_OPTIONS": f"{UBSAN_OPTIONS}:log_path={log}", "PYTHONPATH": str(REPO)}
    deadline, start, first = time.monotonic() + seconds, 0, True
    try:
        while len(result.failures) < max_failures:
            left = deadline - time.monotonic()
            if left <= 0 and not first:
                break
            state.write_bytes(bytes(STATE_BYTES))
            cmd = [sys.executable, "-m", "tests.fuzz.targets", "--corpus", str(corpus), "--target", target,
                   "--so", str(so), "--seed", str(seed), "--start", str(start), "--seconds", str(max(left, 0)),
                   "--state", str(state)]
            if first and replay:
                cmd += ["--fixed", "--replay", str(REGRESSIONS)]
            first = False
            began = time.monotonic()
            child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO)
            case, case_cpu, case_wall, why = None, 0.0, 0.0, None
            while child.poll() is None:
                time.sleep(0.1)
                try:
                    with open(state, "rb") as f:
                        now_case = f.read(8)  # cases begun
                    cpu, rss = _cpu_s(child.pid), _rss_mb(child.pid)
                except (OSError, StopIteration, ValueError):
                    continue
                result.peak_rss_mb = max(result.peak_rss_mb, rss)
                if now_case != case:
                    case, case_cpu, case_wall = now_case, cpu, time.monotonic()
                elif cpu - case_cpu > hang_s or time.monotonic() - case_wall > 10 * hang_s:
                    why = "hang"
                if rss > rss_mb:
                    why = "memory"
                if why:
                    child.send_signal(signal.SIGKILL)
            stdout = child.communicate()[0]
            result.seconds += time.monotonic() - began
            _, index, meta, data = read_state(str(state))
            summary = next((json.loads(line) for line in reversed(stdout.splitlines()) if line.startswith('{"kept"')),
                           None)
            if child.returncode == 0 and summary:
                result.mutated += summary["mutated"]
                result.kept += summary["kept"]
                break
            if child.returncode == HARNESS_ERROR:
                raise RuntimeError(f"the fuzz harness failed, not the extension:\n{stdout[-4000:]}")
            kind = why or {86: "asan", 87: "ubsan", 3: "property"}.get(child.returncode, f"exit{child.returncode}")
            name = keep(target, kind, data, meta.get("params", {}), _report(log, stdout))
            result.failures.append(f"{name}: case {index}")
            if index >= 0:  # a mutated case (not a replayed one): go on after it
                result.mutated += index - start
                start = index + 1
    finally:
        state.unlink(missing_ok=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="per target")
    ap.add_argument("--target", choices=TARGETS, action="append", help="default: both")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    ap.add_argument("--hang-s", type=float, default=2.0, help="CPU seconds one case may take")
    ap.add_argument("--rss-mb", type=float, default=1024.0, help="memory bound of the child")
    args = ap.parse_args(argv)
    failed = False
    for target in args.target or TARGETS:
        r = run(target, args.seconds, args.seed, args.hang_s, args.rss_mb)
        print(json.dumps({"target": target, "seed": args.seed, "mutated": r.mutated, "replayed": r.kept,
                          "seconds": round(r.seconds, 1), "per_s": round(r.mutated / max(r.seconds, 1e-9)),
                          "peak_rss_mb": round(r.peak_rss_mb), "failures": r.failures}), flush=True)
        failed |= bool(r.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

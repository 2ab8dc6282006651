"""A short fuzz run of both C decoders under ASan + UBSan, and every kept failure replayed in the normal build.

The long runs are `make fuzz` (tests/fuzz/campaign.py; docs/benchmarks.md has their counts). Here: the seeds,
the hostile cases and tests/fuzz/regressions/ first, then mutated cases for SECONDS per extension, with a fixed
seed so that a failure here is one anyone can replay. Measured on a busy 2-core machine: ~25 s with the
sanitizer builds cached, ~45 s with both built first.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fuzz import campaign
from tests.fuzz.corpus import write_corpus
from tests.fuzz.targets import REPO, TARGETS

SECONDS = 5.0  # mutated cases per extension: ~2,000-3,000 under the sanitizers on a busy 2-core machine

pytestmark = pytest.mark.skipif(not campaign.extensions_should_build(),
                                reason="no C compiler or libjpeg headers: the C extensions are not built here")


@pytest.mark.parametrize("target", TARGETS)
def test_a_short_sanitizer_run_finds_nothing(target):
    result = campaign.run(target, SECONDS, seed=0)
    assert result.kept > 0 and result.mutated > 0, result
    assert not result.failures, f"kept in tests/fuzz/regressions/: {result.failures}"
    assert result.peak_rss_mb < 1024, result


def test_every_kept_case_runs_in_the_normal_build():
    """The installed extensions (not the sanitizer copies) on the seeds, the hostile cases and every regression:
    in a child process, so that a crash fails this test instead of ending the run."""
    corpus = write_corpus(campaign.BUILD / "corpus")
    for target in TARGETS:
        child = subprocess.run([sys.executable, "-m", "tests.fuzz.targets", "--corpus", str(corpus), "--target",
                                target, "--fixed", "--replay", str(campaign.REGRESSIONS)],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        assert child.returncode == 0, (target, child.returncode, child.stdout[-2000:], child.stderr[-2000:])

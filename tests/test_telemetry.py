"""Progress in logs: a tqdm bar on a terminal, periodic plain lines when the output is not one (CI, nohup, clusters)."""
from __future__ import annotations

import io
import sys

from stagewise.train.telemetry import Telemetry


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _stage(tel: Telemetry, steps: int = 10) -> None:
    tel.open_bar("stage 1/2", steps, 0)
    for i in range(steps):
        tel.update_bar(1)
        if (i + 1) % 5 == 0:
            tel.bar_postfix(41.2, 2.4, 1.5)
    tel.close_bar()


def test_progress_is_plain_lines_without_carriage_returns_when_not_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: not a terminal
    tel = Telemetry(str(tmp_path), enabled=True, tensorboard=False, progress=True)
    tel.plain_every_s = 0.0  # every postfix may print
    _stage(tel)
    tel.close()
    out = capsys.readouterr().out
    assert tel.bar is None
    assert out.splitlines() == ["stage 1/2: step 5/10 (50%), 41 img/s, data wait 2%, loss 1.500",
                                "stage 1/2: step 10/10 (100%), 41 img/s, data wait 2%, loss 1.500"]
    assert "\r" not in out + sys.stderr.getvalue()


def test_plain_lines_are_periodic_and_every_stage_ends_with_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    tel = Telemetry(str(tmp_path), enabled=True, tensorboard=False, progress=True)
    tel.plain_every_s = 3600.0  # no postfix comes late enough: only the stage-end line
    _stage(tel)
    tel.close()
    assert capsys.readouterr().out.splitlines() == [
        "stage 1/2: step 10/10 (100%), 41 img/s, data wait 2%, loss 1.500"]


def test_a_terminal_gets_the_bar(tmp_path, monkeypatch, capsys):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    tel = Telemetry(str(tmp_path), enabled=True, tensorboard=False, progress=True)
    tel.plain_every_s = 0.0
    tel.open_bar("stage 1/2", 10, 0)
    assert tel.bar is not None
    tel.update_bar(10)
    tel.bar_postfix(41.2, 2.4, 1.5)
    tel.close_bar()
    tel.close()
    assert capsys.readouterr().out == ""  # no plain lines
    assert "\r" in term.getvalue() and "10/10" in term.getvalue()

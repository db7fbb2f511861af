"""Daemon logging (logsetup.py): journald gets priority prefixes and no timestamps, a
terminal or file gets timestamps; every line names its logger."""
from __future__ import annotations

import logging
import os

from srv6pipes import logsetup


def emit(stream_path, journald: bool, monkeypatch) -> str:
    with open(stream_path, "w") as stream:
        if journald:
            st = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        else:
            monkeypatch.setenv("JOURNAL_STREAM", "1:2")   # someone else's journal stream
        root = logging.getLogger()
        saved = (list(root.handlers), root.level)
        try:
            logsetup.setup("pipesd", "info", stream)
            logging.getLogger("srv6pipes.master").warning("worker %d died", 3)
            logging.getLogger("srv6pipes.capture").debug("not shown at info")
            logging.getLogger("srv6pipes.control").error("bad request")
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
    with open(stream_path) as handle:
        return handle.read()


def test_under_journald_lines_carry_priority_and_logger_but_no_time(tmp_path, monkeypatch):
    text = emit(tmp_path / "log", True, monkeypatch)
    assert text.splitlines() == ["<4>srv6pipes.master: worker 3 died",
                                 "<3>srv6pipes.control: bad request"]


def test_elsewhere_lines_carry_time_program_logger_and_level(tmp_path, monkeypatch):
    lines = emit(tmp_path / "log", False, monkeypatch).splitlines()
    assert len(lines) == 2
    date, clock, program, logger, level, *message = lines[0].split()
    assert date.count("-") == 2 and ":" in clock
    assert program == f"pipesd[{os.getpid()}]" and logger == "srv6pipes.master"
    assert level == "WARNING" and message == ["worker", "3", "died"]

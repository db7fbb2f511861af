"""Logging for the daemons (pipesd, pipes-controller, pipes-agent), set up once per process.

Every component logs through its own logger, ``srv6pipes.<component>`` (master, worker,
capture, control, admission, kernelsetup...), and each line names it.

Under systemd, stderr goes to the journal, which stamps every line with its own time and
the unit's process: lines then carry no timestamp of their own and start with the
``<N>`` syslog priority prefix that journald turns into the entry's PRIORITY (so
``journalctl -p warning`` works). Elsewhere (a terminal, a file), lines carry a timestamp
and the level in words.
"""
from __future__ import annotations

import logging
import os
import sys

# logging level -> syslog priority (sd-daemon(3): the "<N>" prefix journald reads)
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
JOURNAL_FORMAT = "<%(priority)d>%(name)s: %(message)s"
PLAIN_FORMAT = "%(asctime)s {program}[%(process)d] %(name)s %(levelname)s %(message)s"


def under_journald(stream=None) -> bool:
    """True when `stream` (stderr) is the journal's: $JOURNAL_STREAM names its device and
    inode (systemd.exec(5)); a redirected stderr no longer matches."""
    stream = stream if stream is not None else sys.stderr
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """Adds the syslog priority of the record's level as `priority`."""

    def format(self, record: logging.LogRecord) -> str:
        record.priority = SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < 30 else 3)
        return super().format(record)


def formatter_for(program: str, journald: bool) -> logging.Formatter:
    if journald:
        return JournalFormatter(JOURNAL_FORMAT)
    return logging.Formatter(PLAIN_FORMAT.format(program=program))


def setup(program: str, level: str, stream=None) -> None:
    """Called once by a daemon's main() before anything logs: one handler on the root
    logger, writing to `stream` (stderr). Replaces any earlier handler."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for(program, under_journald(stream)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
